#!/bin/bash
# One prepared run on a lent H200 (device tool): the GPU benchmarks of stages 4, 2 and 3, in that
# order, each under its own time limit, every figure written under $OUT. About 7 minutes.
#   device run:  bash bench/gpu_all.sh      (carry .whl: diffusers, open_clip and friends as wheels)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/selma-gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers, transformers, peft; print(torch.__version__, diffusers.__version__, transformers.__version__, peft.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
timeout 220 python3 bench/gpu_train.py --json "$OUT/gpu_train.json" > "$OUT/gpu_train.log" 2>&1; echo "gpu_train rc=$?"
grep '^{' "$OUT/gpu_train.log" | cut -c1-600
timeout 150 python3 bench/gpu_render.py --arch sd15 --batches 1 16 --steps 50 --compile off --json "$OUT/gpu_render.json" > "$OUT/gpu_render.log" 2>&1; echo "gpu_render rc=$?"
grep '^{' "$OUT/gpu_render.log" | cut -c1-400
timeout 90 python3 bench/gpu_clip.py --json "$OUT/gpu_clip.json" > "$OUT/gpu_clip.log" 2>&1; echo "gpu_clip rc=$?"
tail -5 "$OUT/gpu_clip.log"
