#!/usr/bin/env bash
# The curvature loss off the tuned scene (issue 21 item 2), one GPU, repo root, wheels in .whl/:
#   bash benchmarks/gpu_curvature.sh [SHAPE ...]     (default: bumpy mug_plain rings3_plain)
# Each shape of robustness_scenes.py rendered at 100 views 800x600, exact masks and cameras,
# `default` preset (4000 steps), three runs: base, curvature_weight=0, curvature_fade_start=0.5.
# The runs of a call train side by side on the one GPU (they share it: their train seconds are
# not single-run times); one line per run in summary.txt, nvidia-smi samples in gpu_util.txt, the
# runs' JSON in curv_runs.tar.gz.
set -uo pipefail
source benchmarks/gpu_env.sh
SHAPES=${*:-bumpy mug_plain rings3_plain}
SCENE="--preset default --views 100 --width 800 --height 600 --workdir /tmp/tq --mc-res 512"
for shape in $SHAPES; do
  python benchmarks/train_quality.py $SCENE --shape "$shape" --generate-only > "/tmp/gen_$shape.log" 2>&1 &
done
wait
declare -A RUNS=([base]="" [curv0]="--set train.curvature_weight=0" [fade50]="--set train.curvature_fade_start=0.5")
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 20 > "$OUT/gpu_util.txt" &
SMI=$!
LEFT=$((560 - SECONDS))   # the device's 600 s per call, less the summary
for shape in $SHAPES; do
  for run in base curv0 fade50; do
    timeout -k 10 $LEFT python benchmarks/train_quality.py $SCENE --shape "$shape" ${RUNS[$run]} --name "c_${shape}_$run" \
        --fresh --out "/tmp/curv_${shape}_$run.json" > "/tmp/curv_${shape}_$run.log" 2>&1 &
  done
done
wait
kill $SMI
for f in /tmp/curv_*.json; do
  python - "$f" <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
q = r["quality"]
print(sys.argv[1].rsplit("/", 1)[-1][5:-5], "train_s %.1f" % r["train_seconds"], "steps", r["summary"]["iterations"],
      " ".join(f"{k}: cd {q[k]['chamfer_pct']:.3f} surf {q[k].get('surface_chamfer_pct', float('nan')):.3f} "
               f"F {q[k]['fscore']:.3f}/{q[k].get('surface_fscore', float('nan')):.3f}" for k in ("raw", "region")),
      "psnr %.2f/%s" % (r["train_psnr"], r["holdout_psnr"]))
PY
done
tail -4 /tmp/curv_*.log /tmp/gen_*.log > "$OUT/tails.txt" 2>&1
(cd /tmp && tar czf "$OUT/curv_runs.tar.gz" curv_*.json)   # at most 8 files come back
