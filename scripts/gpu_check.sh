#!/usr/bin/env bash
# The one-command GPU check: the GPU tests (compiled vs eager loss), then speed, memory and FLOPs
# utilisation of both entry points at the plan's per-GPU batch (global 256 on 4 GPUs: 64 per GPU),
# 30x30 ARC-AGI-1 data, bf16 autocast, each pair of configurations alternating in one process
# (scripts/bench.py --compare):
#   1. puzzle embedding (E0v2): eager vs torch.compile
#   2. compiled: puzzle embedding (E0v2) vs demonstration encoder (E1v2): the encoder's cost
#   3. encoder (E1v2), eager: packed vs padded demonstrations
#   4. puzzle embedding (E0v2), eager: autocast over float32 weights vs bfloat16 weights
#
#     bash scripts/gpu_check.sh
#
# Writes $OUT (default gpu-check/): summary.md (device, test result, one table per comparison: the
# figures for BENCHMARKS.md), results.json (every measurement) and log.txt. STEPS sets the timed
# steps, LIMIT the seconds allowed to each part (a part that overruns is reported, the rest runs),
# PARTS the parts to run (default: all of tests eager_vs_compiled embedding_vs_encoder
# packed_vs_padded autocast_vs_bf16_weights),
# EXTRA adds overrides to every configuration (a CPU smoke test:
# EXTRA="device=cpu arch.hidden_size=64 arch.num_heads=2 global_batch_size=4 data.max_grid_size=10" STEPS=2
# PARTS="eager_vs_compiled packed_vs_padded").
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
steps=${STEPS:-20}
limit=${LIMIT:-300}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
parts=$(mktemp -d)
summary="$out/summary.md"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} | tee "$summary"

parts_wanted=" ${PARTS:-tests eager_vs_compiled embedding_vs_encoder packed_vs_padded autocast_vs_bf16_weights} "
want() { [[ "$parts_wanted" == *" $1 "* ]]; }

if want tests; then
  echo -e "\n## pytest -m gpu\n" >>"$summary"
  timeout "$limit" python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$parts/tests.txt"
  echo "exit status ${PIPESTATUS[0]}: $(tail -n 1 "$parts/tests.txt")" >>"$summary"
fi

common=(data.max_grid_size=30 data.num_augmentations=8 global_batch_size=64 --steps "$steps" --warmup 5 ${EXTRA:-})
bench() {  # name, title, bench arguments...
  local name=$1 title=$2
  shift 2
  want "$name" || return 0
  echo -e "\n## $title\n" >>"$summary"
  timeout "$limit" python scripts/bench.py "${common[@]}" "$@" --json "$parts/$name.json" --markdown "$parts/$name.md"
  local status=$?
  if [ $status -eq 0 ]; then cat "$parts/$name.md" >>"$summary"; else echo "failed or timed out (exit $status)" >>"$summary"; fi
}
bench eager_vs_compiled "E0v2: eager (A) vs compiled (B)" experiment=E0v2 compile=false --compare compile=true
bench embedding_vs_encoder "compiled: E0v2 puzzle embedding (A) vs E1v2 encoder (B)" \
  experiment=E0v2 compile=true --compare experiment=E1v2 --compare-entry encoder
bench packed_vs_padded "E1v2, eager: packed (A) vs padded (B) demonstrations" \
  --entry encoder experiment=E1v2 compile=false --compare arch.encoder_packing=false
bench autocast_vs_bf16_weights "E0v2, eager: autocast over float32 weights (A) vs bfloat16 weights (B)" \
  experiment=E0v2 compile=false --compare --bf16-weights

python - "$parts" "$out/results.json" <<'EOF'
import json, sys
from pathlib import Path
parts = {p.stem: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))}
Path(sys.argv[2]).write_text(json.dumps(parts, indent=2))
EOF
echo "summary: $summary"
