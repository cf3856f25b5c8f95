#!/usr/bin/env bash
# GPU check of one session's changes, in two calls on the one-GPU machine (repo root, wheels in .whl/):
#   bash benchmarks/gpu_check.sh tests   CUDA tests (train, triton grid), then 2000 training steps on spot
#   bash benchmarks/gpu_check.sh cli     the CLI from spot photos to the raw mesh (default preset), scored
#                                        like evaluate would (the GPU machine has no pymeshlab: no cleanup)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0  # else the Triton tests interpret on the CPU
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
SCENE="--views 100 --width 800 --height 600 --workdir /tmp/tq"
( python benchmarks/train_quality.py --generate-only $SCENE > "$OUT/generate.log" 2>&1 ) &
GEN=$!
if [ "${1:-tests}" = tests ]; then
  timeout 200 python -m pytest -q -p no:cacheprovider tests/test_hashgrid_triton.py \
      tests/test_train.py::test_cuda_graph_step_equals_the_compiled_step_and_recovers > "$OUT/gpu_tests.log" 2>&1
  tail -4 "$OUT/gpu_tests.log"
  wait $GEN
  timeout 240 python benchmarks/train_quality.py --preset default $SCENE --iterations 2000 --mc-res 512 \
      --name default_2000 --out "$OUT/train_2000.json" 2>&1 | grep -v "it/s]" | tail -14 | tee "$OUT/train_2000.log"
else
  wait $GEN
  IMG=$(ls -d /tmp/tq/spot_*/images | head -1)
  timeout 420 python run_pipeline.py run --images "$IMG" --gt "$(dirname "$IMG")/gt" --workdir /tmp/wd --scene spot \
      --until mesh --no-progress > "$OUT/cli.log" 2>&1
  echo "exit code $?" | tee -a "$OUT/cli.log"
  timeout 90 python benchmarks/score_mesh.py --workdir /tmp/wd --scene spot --out "$OUT/cli_score.json" \
      >> "$OUT/cli.log" 2>&1
  grep -E "WARNING|FAILED|error|done|sphere|masks:|train: [0-9]+ steps" "$OUT/cli.log" | tail -25
  tail -4 "$OUT/cli.log"
fi
