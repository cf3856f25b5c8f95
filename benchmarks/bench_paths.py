"""Imported first by every benchmark script (``python benchmarks/<name>.py``): puts the project
root, ``tests/`` (scene builders such as ``train_inputs``) and ``benchmarks/`` on ``sys.path``."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "benchmarks", ROOT / "tests", ROOT):
    if str(folder) in sys.path:
        sys.path.remove(str(folder))
    sys.path.insert(0, str(folder))
