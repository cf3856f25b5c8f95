#!/usr/bin/env bash
# GPU session on a 2-GPU machine: issue 5/6/8 numbers, one card per job line, in parallel.
#   GPU 0: default preset on spot (100 views 800x600) -> mesh.resolution 2048 of that trained model
#   GPU 1: scene mode (no masks) -> the triton hash-grid backend in a full run -> kernel benchmark
# Usage (device machine, repo root, wheels in .whl/): bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
SCENE="--views 100 --width 800 --height 600 --workdir /tmp/tq"
TQ="python benchmarks/train_quality.py --preset default $SCENE --mc-res 512"
quiet() { grep -v "it/s]" | tail -"$1"; }
CUDA_VISIBLE_DEVICES=0 python benchmarks/train_quality.py --generate-only $SCENE > "$OUT/generate.log" 2>&1
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 300 $TQ --name default --out "$OUT/train_default.json" 2>&1 | quiet 12 > "$OUT/train_default.log"
  timeout 150 python benchmarks/mesh.py --model /tmp/tq/default --resolutions 1024,2048 --device cuda \
      --out "$OUT/mesh_trained.json" 2>&1 | tail -6 > "$OUT/mesh_trained.log"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 300 $TQ --name scene_mode --ablation no_masks --out "$OUT/train_scene_mode.json" 2>&1 \
      | quiet 12 > "$OUT/train_scene_mode.log"
  timeout 240 $TQ --name triton --set train.grid_backend=triton --out "$OUT/train_triton.json" 2>&1 \
      | quiet 12 > "$OUT/train_triton.log"
) &
wait
CUDA_VISIBLE_DEVICES=0 timeout 100 python benchmarks/hashgrid.py --backends eager,compiled,triton --features 8 2 \
    --repeats 5 --out "$OUT/hashgrid.json" 2>&1 | tail -16 > "$OUT/hashgrid.log"
tail -n 12 "$OUT"/*.log
