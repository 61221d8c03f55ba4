#!/usr/bin/env bash
# The one-command GPU check: speed, memory and FLOPs utilisation of both entry points at the plan's
# per-GPU batch (global 256 on 4 GPUs: 64 per GPU), 30x30 ARC-AGI-1 data, bf16 (the default on CUDA),
# eager beside torch.compile in one process (scripts/bench.py --compare). Writes JSON and markdown
# tables to $OUT (default gpu-check/); the tables go into BENCHMARKS.md with the device and date.
#
#     bash scripts/gpu_check.sh
#
# EXTRA adds overrides to every configuration, STEPS sets the timed steps (CPU smoke test:
# EXTRA="device=cpu arch.hidden_size=64 arch.num_heads=2 global_batch_size=2" STEPS=1 COMPILE=false).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
steps=${STEPS:-20}
mkdir -p "$out"
{ date -u; python -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"; } | tee "$out/device.txt"
compare=()
if [ "${COMPILE:-true}" = true ]; then compare=(--compare compile=true); fi
# 8 augmented versions per task: the step's shapes are those of the full data, the build takes minutes, not hours.
common=(data.max_grid_size=30 data.num_augmentations=8 global_batch_size=64 --steps "$steps" --warmup 5 ${EXTRA:-})
python scripts/bench.py experiment=E0v2 "${common[@]}" "${compare[@]}" --json "$out/E0v2.json" --markdown "$out/E0v2.md" | tee "$out/E0v2.txt"
python scripts/bench.py --entry encoder experiment=E1v2 "${common[@]}" "${compare[@]}" --json "$out/E1v2.json" --markdown "$out/E1v2.md" | tee "$out/E1v2.txt"
echo "tables in $out/"
