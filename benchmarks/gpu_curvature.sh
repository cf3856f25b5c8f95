#!/usr/bin/env bash
# The curvature loss off the tuned scene (issue 21 item 2), one GPU, repo root, wheels in .whl/:
#   bash benchmarks/gpu_curvature.sh [SHAPE ...]     (default: bumpy rings3_plain)
# Each shape of robustness_scenes.py rendered at $VIEWS (48) views 640x480, exact masks and cameras,
# `default` preset (4000 steps), three runs: base, curvature_weight=0, curvature_fade_start=0.5.
# The runs of a call train side by side on the one GPU (they share it: their train seconds are
# not single-run times); one line per run in summary.txt, nvidia-smi samples in gpu_util.txt, the
# runs' JSON in curv_runs.tar.gz.
set -uo pipefail
source benchmarks/gpu_env.sh
echo "set up at ${SECONDS} s" | tee -a "$OUT/summary.txt"
SHAPES=${*:-bumpy rings3_plain}
SCENE="--preset default --views ${VIEWS:-48} --width 640 --height 480 --workdir /tmp/tq --mc-res 512"
for shape in $SHAPES; do   # one at a time: three side by side took over 7 minutes at 100 views 800x600
  python benchmarks/train_quality.py $SCENE --shape "$shape" --generate-only > "/tmp/gen_$shape.log" 2>&1
  echo "rendered $shape at ${SECONDS} s" | tee -a "$OUT/summary.txt"
done
declare -A RUNS=([base]="" [curv0]="--set train.curvature_weight=0" [fade50]="--set train.curvature_fade_start=0.5")
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 10 > "$OUT/gpu_util.txt" &
SMI=$!
PIDS=()
LEFT=$((570 - SECONDS))   # the device's 600 s per call, less the summary
for shape in $SHAPES; do
  for run in base curv0 fade50; do
    (OMP_NUM_THREADS=2 timeout -k 10 $LEFT python benchmarks/train_quality.py $SCENE --shape "$shape" ${RUNS[$run]} \
        --name "c_${shape}_$run" --fresh --out "/tmp/curv_${shape}_$run.json" > "/tmp/curv_${shape}_$run.log" 2>&1
     python - "/tmp/curv_${shape}_$run.json" "${shape}_$run" "$SECONDS" <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except OSError:
    sys.exit(f"{sys.argv[2]}: no result at {sys.argv[3]} s")
q = r["quality"]
print(sys.argv[2], "done at", sys.argv[3], "s; train_s %.1f" % r["train_seconds"], "steps", r["summary"]["iterations"],
      " ".join(f"{k}: cd {q[k]['chamfer_pct']:.3f} surf {q[k].get('surface_chamfer_pct', float('nan')):.3f} "
               f"F {q[k]['fscore']:.3f}/{q[k].get('surface_fscore', float('nan')):.3f}" for k in ("raw", "region")),
      "psnr %.2f/%s" % (r["train_psnr"], r["holdout_psnr"]))
PY
    ) &
    PIDS+=($!)
  done
done
wait "${PIDS[@]}"   # not nvidia-smi's
kill $SMI
tail -4 /tmp/curv_*.log /tmp/gen_*.log > "$OUT/tails.txt" 2>&1
(cd /tmp && tar czf "$OUT/curv_runs.tar.gz" curv_*.json)   # at most 8 files come back
