#!/usr/bin/env bash
# GPU session (2-GPU machine): video -> mesh end to end (1080p, 150 frames, default preset) on
# GPU 0 and CPU cores 0-15 (the 16 cores of the one-GPU machine), while benchmarks/train_speed.py
# measures time-to-target on GPU 1 and cores 16-31. The GPU machine has no pymeshlab, so the
# pipeline stops after `mesh` and the raw mesh is scored like `evaluate` would
# (benchmarks/score_mesh.py); then the trained model is meshed at 2048 (benchmarks/mesh.py).
# Needs, from earlier calls on the warm machine: PyAV in /tmp/site (pip install --target
# /tmp/site .whl_av/*.whl; it does not fit next to pycolmap) and, optionally, the rendered input
# in /tmp/e2e/input_video_150_1920x1080 (else it is rendered here, minutes of CPU).
# Usage (repo root, wheels in .whl/): bash benchmarks/gpu_e2e.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import av, pycolmap, luigi, trimesh" || { echo "missing wheels"; exit 3; }
( taskset -c 16-31 timeout ${SPEED_TIMEOUT:-500} python benchmarks/train_speed.py --iterations ${SPEED_ITERS:-1000,2000,3000} \
    --gpus 1 --out "$OUT/train_speed.json" > "$OUT/train_speed.log" 2>&1 ) &
SPEED=$!
export CUDA_VISIBLE_DEVICES=0
taskset -c 0-15 timeout ${E2E_TIMEOUT:-450} python benchmarks/e2e.py --until mesh --workdir /tmp/e2e --out "$OUT/e2e.json" \
    > "$OUT/e2e.log" 2>&1
taskset -c 0-15 timeout 90 python benchmarks/score_mesh.py --workdir /tmp/e2e/work --scene spot --out "$OUT/e2e_score.json" \
    > "$OUT/e2e_score.log" 2>&1 || ls -R /tmp/e2e/work | head -30 >> "$OUT/e2e_score.log"
MODEL=$(dirname "$(ls /tmp/e2e/work/spot/train/*/model.pt | head -1)")
taskset -c 0-15 timeout 120 python benchmarks/mesh.py --model "$MODEL" --resolutions 512,2048 --device cuda \
    --out "$OUT/mesh_trained.json" > "$OUT/mesh_trained.log" 2>&1
wait $SPEED
tail -n 30 "$OUT/e2e.log"; tail -n 8 "$OUT/e2e_score.log" "$OUT/mesh_trained.log" "$OUT/train_speed.log"
