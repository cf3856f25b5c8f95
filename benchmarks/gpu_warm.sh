#!/usr/bin/env bash
# Compile warm-up across runs (issue 21), one GPU, repo root, wheels in .whl/:
#   bash benchmarks/gpu_warm.sh [ITERATIONS]
# Trains spot (default preset, 100 views 800x600) twice in fresh processes with one empty compile
# cache folder (cold, then warm), then the same with CUDA graphs on; each run's JSON has the
# training time, the timeline (seconds at each logged step) and the compile-cache hits/misses.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ITERS=${1:-2000}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 MESHPIPE_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
SCENE="--views 100 --width 800 --height 600 --workdir /tmp/tq"
python benchmarks/train_quality.py --generate-only $SCENE > "$OUT/generate.log" 2>&1
for graphs in off on; do
  export MESHPIPE_COMPILE_CACHE=/tmp/compile_cache_$graphs
  rm -rf "$MESHPIPE_COMPILE_CACHE"
  for run in cold warm; do
    timeout 200 python benchmarks/train_quality.py --preset default $SCENE --iterations "$ITERS" --mc-res 512 \
        --set train.cuda_graphs=$graphs --name "w_${graphs}_$run" --fresh --out "$OUT/warm_${graphs}_$run.json" \
        > "$OUT/warm_${graphs}_$run.log" 2>&1
    python - "$OUT/warm_${graphs}_$run.json" "$graphs $run" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); t = r["timeline"]; q = r["quality"]
print(sys.argv[2], "train_s %.1f first_log %s chamfer %s cache %s" % (r["train_seconds"], t[0] if t else None,
      q.get("raw", q), r.get("compile_cache")))
PY
  done
done 2>&1 | tee "$OUT/summary.txt"
