#!/usr/bin/env bash
# GPU session on one card (the H100 the issues name): a full default-preset training run on
# the spot scene (benchmarks/train_speed.py, 4000 steps), its model meshed at 2048
# (benchmarks/mesh.py, the issue-6 target), then where a step's time goes
# (benchmarks/step_profile.py: tap layouts) and the SDF-step/hash-grid kernels
# (benchmarks/hashgrid.py). Each part has its own time limit so a slow one cannot eat the next.
# Also: "tests" (the triton kernels against their torch twin, on the GPU) and "check"
# (benchmarks/hashgrid_triton_check.py: points layouts, atomics, bandwidth floor).
# Usage (repo root, wheels in .whl/): [PARTS="train mesh profile kernels"] bash benchmarks/gpu_h100.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 
PARTS=${PARTS:-"train mesh profile kernels"}
ITERS=${ITERS:-4000}
WORK=/tmp/train_speed
log() { grep -v "it/s]\|s/it]" "$1" | tail -n "${2:-12}"; }

for part in $PARTS; do
  case $part in
    train)
      timeout ${TRAIN_TIMEOUT:-300} python benchmarks/train_speed.py --iterations "$ITERS" --workdir $WORK \
          --out "$OUT/train_speed.json" > "$OUT/train.log" 2>&1; echo "train rc=$?"; log "$OUT/train.log" ;;
    mesh)
      MODEL=$WORK/speed_default_$ITERS
      ( while sleep 20; do nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader; done ) \
          > /tmp/mesh_smi.log 2>&1 &
      SMI=$!
      timeout ${MESH_TIMEOUT:-240} python benchmarks/mesh.py --model "$MODEL" --resolutions 512,2048 --device cuda \
          --progress --out "$OUT/mesh_trained.json" > "$OUT/mesh.log" 2>&1; echo "mesh rc=$?"
      kill $SMI; log "$OUT/mesh.log" 16; tail -n 4 /tmp/mesh_smi.log ;;
    profile)
      timeout ${PROFILE_TIMEOUT:-200} python benchmarks/step_profile.py --workdir $WORK --warmup 600 --steps 150 \
          ${VARIANTS:---variant now:cuda_graphs=on --variant no_cuda_graphs:cuda_graphs=off --variant no_level_skip:skip=0} \
          --out "$OUT/step_profile.json" \
          > "$OUT/profile.log" 2>&1; echo "profile rc=$?"; log "$OUT/profile.log" 50 ;;
    tests)
      TRITON_INTERPRET=0 timeout ${TESTS_TIMEOUT:-200} python -m pytest -q -p no:cacheprovider \
          tests/test_hashgrid_triton.py > "$OUT/tests.log" 2>&1; echo "tests rc=$?"; log "$OUT/tests.log" 5 ;;
    check)
      timeout ${CHECK_TIMEOUT:-240} python benchmarks/hashgrid_triton_check.py --features 8,2 --iters 10 \
          --out "$OUT/check.json" > "$OUT/check.log" 2>&1; echo "check rc=$?"; log "$OUT/check.log" 30 ;;
    kernels)
      timeout ${KERNEL_TIMEOUT:-300} python benchmarks/hashgrid.py --backends ${KERNEL_BACKENDS:-compiled,triton,compiled_step,triton_step} --features 8 2 \
          --taps tetra4 --repeats 5 ${KERNEL_ARGS:-} --out "$OUT/hashgrid.json" > "$OUT/kernels.log" 2>&1; echo "kernels rc=$?"
      log "$OUT/kernels.log" 10 ;;
  esac
done
