#!/usr/bin/env bash
# GPU session (2-GPU machine): video -> mesh end to end (1080p, 150 frames, default preset) on
# GPU 0 and CPU cores 0-15 (the 16 cores of the one-GPU machine); on GPU 1 and cores 16-31 either
# benchmarks/train_speed.py (SECOND=speed, the default) or a second end-to-end run with other
# settings (SECOND="--set train.iterations=8000", say). The GPU machine has no pymeshlab, so the
# pipeline stops after `mesh` and the raw mesh is scored like `evaluate` would
# (benchmarks/score_mesh.py); then the first run's model is meshed at 512 and 2048 (benchmarks/mesh.py).
# Needs, from earlier calls on the warm machine: PyAV in /tmp/site (pip install --target
# /tmp/site .whl_av/*.whl; it does not fit next to pycolmap) and, optionally, the rendered input
# in /tmp/e2e/input_video_150_1920x1080 (else it is rendered here, minutes of CPU).
# Usage (repo root, wheels in .whl/): [SECOND=...] bash benchmarks/gpu_e2e.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import av, pycolmap, luigi, trimesh" || { echo "missing wheels"; exit 3; }
SECOND=${SECOND:-speed}

e2e() {  # e2e GPU CORES WORKDIR NAME [e2e.py args]: the pipeline up to mesh, then the raw mesh's score
  local gpu=$1 cores=$2 work=$3 name=$4; shift 4
  CUDA_VISIBLE_DEVICES=$gpu taskset -c "$cores" timeout ${E2E_TIMEOUT:-450} python benchmarks/e2e.py --until mesh \
      --workdir "$work" --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  taskset -c "$cores" timeout 90 python benchmarks/score_mesh.py --workdir "$work/work" --scene spot \
      --out "$OUT/${name}_score.json" >> "$OUT/$name.log" 2>&1
}

if [ "$SECOND" = speed ]; then
  ( taskset -c 16-31 timeout ${SPEED_TIMEOUT:-500} python benchmarks/train_speed.py --iterations ${SPEED_ITERS:-1000,2000,3000} \
      --gpus 1 --out "$OUT/train_speed.json" > "$OUT/train_speed.log" 2>&1 ) &
else
  mkdir -p /tmp/e2e_b && cp -r /tmp/e2e/input_video_* /tmp/e2e_b/ 2>/dev/null
  e2e 1 16-31 /tmp/e2e_b e2e_b $SECOND &
fi
e2e 0 0-15 /tmp/e2e e2e
MODEL=$(dirname "$(find /tmp/e2e/work -name model.pt | head -1)")
taskset -c 0-15 timeout 120 python benchmarks/mesh.py --model "$MODEL" --resolutions 512,2048 --device cuda \
    --out "$OUT/mesh_trained.json" > "$OUT/mesh_trained.log" 2>&1
wait
tail -n 22 "$OUT"/e2e*.log; tail -n 6 "$OUT/mesh_trained.log" "$OUT"/train_speed.log 2>/dev/null
