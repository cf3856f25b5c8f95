#!/usr/bin/env bash
# What holds spot at ~0.22 % Chamfer-L1 (issue 21 item 2), one GPU, repo root, wheels in .whl/:
#   bash benchmarks/gpu_plateau.sh [RUN ...]      (default: every run below, in this order)
# Spot, 100 views 800x600, `default` preset; each run scored with the point-sample Chamfer (as
# before) and the point-to-surface one (no sampling floor). One line per run in summary.txt.
set -uo pipefail
source benchmarks/gpu_env.sh
SCENE="--preset default --views 100 --width 800 --height 600 --workdir /tmp/tq"
python benchmarks/train_quality.py --generate-only $SCENE > "$OUT/generate.log" 2>&1
declare -A RUNS=(
  [base]="--mc-res 512"
  [base_mc1024]="--mc-res 1024"                      # same model as base (resumed), finer marching cubes
  [no_curvature]="--mc-res 512 --set train.curvature_weight=0"
  [eps_end_1]="--mc-res 512 --set train.eps_end_cells=1.0"
  [steps_8000]="--mc-res 512 --iterations 8000"
  [grid_4096]="--mc-res 512 --set train.grid_max_res=4096 --set train.grid_log2_table=21"
  [mask_0]="--mc-res 512 --set train.mask_weight=0"
)
ORDER=${*:-base base_mc1024 no_curvature eps_end_1 grid_4096 steps_8000 mask_0}
for run in $ORDER; do
  name=$run; fresh=--fresh
  [ "$run" = base_mc1024 ] && { name=base; fresh=; }
  timeout -k 10 300 python benchmarks/train_quality.py $SCENE ${RUNS[$run]} --name "p_$name" $fresh \
      --out "$OUT/plateau_$run.json" > /tmp/plateau_$run.log 2>&1
  python - "$OUT/plateau_$run.json" "$run" <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except OSError:
    sys.exit(f"{sys.argv[2]}: no result")
q = r["quality"]
print(sys.argv[2], "train_s %.1f" % r["train_seconds"], "steps", r["summary"]["iterations"],
      " ".join(f"{k}: cd {q[k]['chamfer_pct']:.3f} surf {q[k].get('surface_chamfer_pct', float('nan')):.3f} "
               f"F {q[k]['fscore']:.3f}/{q[k].get('surface_fscore', float('nan')):.3f}" for k in ("raw", "region")),
      "psnr %.2f/%s" % (r["train_psnr"], r["holdout_psnr"]))
PY
done
tail -5 /tmp/plateau_*.log > "$OUT/tails.txt" 2>&1
