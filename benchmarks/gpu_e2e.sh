#!/usr/bin/env bash
# GPU session: video -> mesh end to end (1080p, 150 frames, default preset) on GPU 0 while
# benchmarks/train_speed.py measures time-to-target on GPU 1. The GPU machine has no pymeshlab,
# so the pipeline stops after `mesh` and the raw mesh is scored like `evaluate` would
# (benchmarks/score_mesh.py). PyAV must already be in /tmp/site (a previous call on the warm
# machine: pip install --target /tmp/site .whl_av/*.whl), it does not fit next to pycolmap.
# Usage (2-GPU device machine, repo root, wheels in .whl/): bash benchmarks/gpu_e2e.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import av, pycolmap, luigi, trimesh" || { echo "missing wheels"; exit 3; }
( timeout ${SPEED_TIMEOUT:-520} python benchmarks/train_speed.py --iterations 1000,2000,3000 --gpus 1 \
    --out "$OUT/train_speed.json" > "$OUT/train_speed.log" 2>&1 ) &
SPEED=$!
export CUDA_VISIBLE_DEVICES=0
timeout ${E2E_TIMEOUT:-480} python benchmarks/e2e.py --until mesh --workdir /tmp/e2e --out "$OUT/e2e.json" \
    > "$OUT/e2e.log" 2>&1
timeout 60 python benchmarks/score_mesh.py --workdir /tmp/e2e/work --scene spot --out "$OUT/e2e_score.json" \
    > "$OUT/e2e_score.log" 2>&1 || ls -R /tmp/e2e | head -30 >> "$OUT/e2e_score.log"
wait $SPEED
tail -n 25 "$OUT/e2e.log" "$OUT/e2e_score.log" "$OUT/train_speed.log"
