#!/usr/bin/env bash
# GPU session part 3: the ablation table of the train stage on one synthetic spot scene.
# Usage (device machine, repo root, wheels in .whl/): bash benchmarks/gpu_ablation.sh ITERATIONS
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ITERS=${1:-2000}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
ARGS="--preset default --views 60 --width 640 --height 480 --workdir /tmp/abl --iterations $ITERS --mc-res 384"
python benchmarks/train_quality.py $ARGS --generate-only > "$OUT/generate.log" 2>&1
for ab in none no_mask_loss no_sfm analytic_gradients no_c2f no_masks; do
    extra=""; [ "$ab" != none ] && extra="--ablation $ab"
    timeout 150 python benchmarks/train_quality.py $ARGS $extra --fresh --out "$OUT/ablation_$ab.json" 2>&1 \
        | grep -v "it/s" | tail -4 | tee -a "$OUT/ablation.log"
done
