#!/bin/bash
# Step time with DistributedDataParallel against the hand all-reduce (ddp=true / false): 2 ranks
# (gloo, one thread each) training E1v2 at the CPU preset for 80 steps, three times each, alternating.
# Usage: bash scripts/bench_ddp.sh   (OUT=folder for the runs, default /tmp/benchddp)
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/benchddp}; mkdir -p "$out"
export WANDB_MODE=disabled OMP_NUM_THREADS=1
for i in 1 2 3; do
  for ddp in false true; do
    d=$out/$ddp-$i; rm -rf "$d"
    python -m torch.distributed.run --nproc-per-node 2 pretrain_encoder.py experiment=E1v2 preset=cpu max_steps=80 \
      eval_interval=null log_interval=10 early_stop=[] eval.reliance=false ddp=$ddp run_dir=$d > $d.log 2>&1
    python - $d $ddp <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
ms = [r["timing/step_ms"] for r in rows if "timing/step_ms" in r][1:]  # the first window warms up
print(f"ddp={sys.argv[2]} median step_ms {statistics.median(ms):.1f} ({len(ms)} windows of 10 steps)")
PY
  done
done
