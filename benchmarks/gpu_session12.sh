#!/usr/bin/env bash
# Twelfth session's GPU call, one GPU, repo root, wheels in .whl/:  bash benchmarks/gpu_session12.sh
# 1. camera refinement: benchmarks/refine_cameras.py (spot, 60 views 640x480, 1500 steps, cameras
#    turned 2 deg and moved 2 % of the radius; noisy vs noisy + refinement);
# 2. the curvature ablation on a shape the method was not tuned on (bumpy, exact masks and cameras,
#    1500 steps: what a short call allows).
set -uo pipefail
source benchmarks/gpu_env.sh
SCENE="--preset default --views 60 --width 640 --height 480"
timeout -k 10 140 python benchmarks/refine_cameras.py $SCENE --iterations 1500 --mc-res 384 --runs noisy --runs noisy_refine \
    --workdir /tmp/rc --fresh --out "$OUT/refine_cameras.json" > /tmp/refine.log 2>&1
tail -8 /tmp/refine.log | tee -a "$OUT/summary.txt"
for run in base no_curvature; do
  extra=""; [ "$run" = no_curvature ] && extra="--set train.curvature_weight=0"
  timeout -k 10 90 python benchmarks/train_quality.py $SCENE --shape bumpy --iterations 1500 --mc-res 384 --workdir /tmp/tq $extra \
      --name "bumpy_$run" --fresh --out "$OUT/bumpy_$run.json" > /tmp/bumpy_$run.log 2>&1
  echo "bumpy $run: $(grep '^| raw\|^| region' /tmp/bumpy_$run.log | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
done
tail -5 /tmp/refine.log /tmp/bumpy_*.log > "$OUT/tails.txt" 2>&1
