#!/usr/bin/env bash
# Object isolation on the GPU machine (repo root, wheels in .whl/): robustness scenes at 100 views
# 640x480, `default` preset, offline (no rembg model), photos -> raw mesh (that machine has no
# pymeshlab, so no cleanup), the raw mesh scored like evaluate would (benchmarks/score_mesh.py).
#   bash benchmarks/gpu_robustness.sh spot,torus_plain      (about 4 minutes per scene on one H200)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 MESHPIPE_OFFLINE=1  # no network there
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for s in ${1//,/ }; do
  python benchmarks/robustness.py --scenes "$s" --views 100 --width 640 --height 480 --preset default \
      --device cuda --until mesh --workdir /tmp/rgpu --timeout "${PER_SCENE:-290}" --out "$OUT/rob_$s.json" \
      > "$OUT/rob_$s.log" 2>&1
  timeout 90 python benchmarks/score_mesh.py --workdir /tmp/rgpu/runs --scene "$s" --out "$OUT/score_$s.json" \
      >> "$OUT/rob_$s.log" 2>&1
  cat /tmp/rgpu/runs/logs/"$s".log >> "$OUT/rob_$s.log" 2>/dev/null  # the CLI's log, after the harness's
  tail -3 "$OUT/rob_$s.log"
done
