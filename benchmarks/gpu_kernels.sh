#!/usr/bin/env bash
# GPU session part 1: Triton hash-grid correctness + speed, torch hash-grid baselines, meshing.
# Run on the device machine from the repo root with the wheels in .whl/ (see benchmarks/RESULTS.md).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
TRITON_INTERPRET=0 timeout 240 python -m pytest tests/test_hashgrid_triton.py -q -x 2>&1 | tail -5 | tee "$OUT/triton_tests.log"
timeout 300 python benchmarks/hashgrid_triton_check.py --out "$OUT/hashgrid_triton.json" 2>&1 | tee "$OUT/hashgrid_triton.log" | tail -40
timeout 200 python benchmarks/mesh.py --resolutions 512,1024,2048 --sdf bumpy --device cuda --out "$OUT/mesh_bumpy.json" 2>&1 | tail -12 | tee "$OUT/mesh.log"
