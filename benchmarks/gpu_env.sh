# Sourced by the GPU scripts (repo root, wheels in .whl/): $OUT made, the carried wheels installed
# into /tmp/site, the project on PYTHONPATH, offline, one compile cache for the call; gpu.txt names the card.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MESHPIPE_OFFLINE=1 MESHPIPE_COMPILE_CACHE=/tmp/compile_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
