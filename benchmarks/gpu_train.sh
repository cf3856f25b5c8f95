#!/usr/bin/env bash
# GPU session part 2: SDF-step speed per backend, then training quality on the synthetic spot scene.
# Usage (device machine, repo root, wheels in .whl/): bash benchmarks/gpu_train.sh ITERATIONS [extra train_quality args]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ITERS=${1:-15000}; shift || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
( python benchmarks/train_quality.py --generate-only --views 100 --width 800 --height 600 --workdir /tmp/tq > "$OUT/generate.log" 2>&1 ) &
GEN=$!
timeout 150 python benchmarks/hashgrid.py --backends eager,compiled,triton --features 8 2 --repeats 5 --out "$OUT/sdf_step.json" 2>&1 | tail -16 | tee "$OUT/sdf_step.log"
wait $GEN
timeout ${TRAIN_TIMEOUT:-400} python benchmarks/train_quality.py --preset default --views 100 --width 800 --height 600 \
    --workdir /tmp/tq --iterations "$ITERS" --mc-res 512 --out "$OUT/train_default.json" "$@" 2>&1 \
    | grep -v "it/s]" | tail -30 | tee "$OUT/train_default.log"
