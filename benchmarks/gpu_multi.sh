#!/usr/bin/env bash
# Two GPUs: DDP training of one scene (1 vs 2 GPUs: ms/step, samples/s, Chamfer-L1, F-score),
# meshing split over both cards (identical mesh?), and two scenes at once, one per GPU, vs one alone.
# Usage (2-GPU device machine, repo root, wheels in .whl/): bash benchmarks/gpu_multi.sh [ITERATIONS] [extra multi_gpu.py args]
# About 7 minutes on 2 H100s with the defaults (spot, 60 views 640x480, default preset, 1500 steps).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ITERS=${1:-1500}; shift || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1  # NVLink or PCIe between the cards: the all-reduce's speed
timeout ${MULTI_TIMEOUT:-540} python benchmarks/multi_gpu.py --iterations "$ITERS" --views 60 --width 640 --height 480 \
    --mc-res 512 --workdir /tmp/multi_gpu --out "$OUT/multi_gpu.json" "$@" 2>&1 \
    | grep -v "it/s]" | tee "$OUT/multi_gpu.log" | tail -40
