#!/usr/bin/env bash
# Fourteenth session's GPU calls on the one-GPU machine (repo root; wheels in .whl/; .skull/ holds the
# skull photos and their frames..sfm_points stage folders from a CPU run of the default preset):
#   bash benchmarks/gpu_session14.sh 1   CUDA tests (appearance codes, camera refinement, CUDA graphs,
#                                        triton grid) beside the skull trained with and without
#                                        appearance codes (default preset)
#   bash benchmarks/gpu_session14.sh 2   the quality preset's curve on spot (benchmarks/train_curve.py)
#   bash benchmarks/gpu_session14.sh 3   the skull with the quality preset (codes as call 1 decided: DIM=)
#   bash benchmarks/gpu_session14.sh 4   camera refinement on spot at full size (100 views 800x600, 4000 steps)
set -uo pipefail
source benchmarks/gpu_env.sh
export TRITON_INTERPRET=0
SPOT="--views 100 --width 800 --height 600 --workdir .tq"  # .tq/ (ignored) survives a warm machine between calls
skull() {  # name, then --set overrides
  local name=$1; shift
  timeout -k 10 "${SKULL_S:-170}" python run_pipeline.py run --images .skull/images --workdir .skull/wd --scene skull \
      --until train --no-progress --device cuda "$@" > "$OUT/skull_$name.log" 2>&1
  echo "skull $name: exit $? $(grep -h 'train: [0-9]* steps in' "$OUT/skull_$name.log")" | tee -a "$OUT/summary.txt"
  cp "$(ls -td .skull/wd/skull/train-*/ | head -1)/train.json" "$OUT/skull_$name.train.json" 2>/dev/null
}
case "${1:-1}" in
1)
  ( python benchmarks/train_quality.py --generate-only $SPOT > "$OUT/generate.log" 2>&1 ) & GEN=$!
  ( timeout -k 10 400 python -m pytest -q -p no:cacheprovider tests/test_appearance.py \
      tests/test_refine_cameras.py::test_compiled_and_graph_steps_refine_as_the_eager_step \
      tests/test_train.py::test_cuda_graph_step_equals_the_compiled_step_and_recovers \
      tests/test_hashgrid_triton.py > "$OUT/gpu_tests.log" 2>&1 ) & TESTS=$!
  SKULL_S=330 skull codes0 --set train.appearance_dim=0  # reruns masks and sfm_points (VERSIONs moved)
  skull codes16 --set train.appearance_dim=16
  wait $TESTS; echo "tests: $(tail -1 "$OUT/gpu_tests.log")" | tee -a "$OUT/summary.txt"
  wait $GEN; tail -1 "$OUT/generate.log"
  ;;
4)
  timeout -k 10 $((${REFINE_S:-300} - SECONDS)) python benchmarks/refine_cameras.py --preset default $SPOT --mc-res 512 --runs noisy \
      --runs noisy_refine --fresh --out "$OUT/refine_cameras.json" > "$OUT/refine.log" 2>&1
  grep -v "it/s" "$OUT/refine.log" | tail -8 | tee -a "$OUT/summary.txt"
  ;;
2)
  ( python benchmarks/train_quality.py --generate-only $SPOT > "$OUT/generate.log" 2>&1 ) ; tail -1 "$OUT/generate.log"
  timeout -k 10 $((585 - SECONDS)) python benchmarks/train_curve.py --preset quality $SPOT --every "${EVERY:-5000}" --mc-res 512 \
      --out "$OUT/curve_quality.json" > "$OUT/curve.log" 2>&1
  grep -v "it/s" "$OUT/curve.log" | tail -12 | tee -a "$OUT/summary.txt"
  ;;
3)
  SKULL_S=560 skull quality --preset quality --set train.appearance_dim="${DIM:-16}"
  ;;
esac
