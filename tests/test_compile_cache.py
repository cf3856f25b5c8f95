"""The compile cache (stages/train/compile_cache.py): where it lives, and that a second training
process of the same shapes loads every compiled graph instead of compiling it (inductor's C++
backend on the CPU here; the same caches hold the CUDA kernels on a GPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import TINY  # noqa: E402
from train_inputs import analytic_scene  # noqa: E402

from stages.train import compile_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import json, logging, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from pipeline.config import TrainConfig
from pipeline.dag import Context
from stages import train
job = json.loads(sys.argv[1])
inputs = {k: Path(v) for k, v in job["inputs"].items()}
ctx = Context(scene="t", device="cpu", progress=False, log=logging.getLogger("t"))
train.run(inputs, TrainConfig(**job["cfg"]), Path(job["out"]), ctx)
"""


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.cache_root() == tmp_path / "mine"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_root() is None and compile_cache.configure() is None
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_root() == tmp_path / "xdg" / "meshpipe" / "compile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.cache_root() == tmp_path / "home" / ".cache" / "meshpipe" / "compile"


def test_configure_keeps_the_users_folders_and_refuses_an_unwritable_one(monkeypatch, tmp_path, caplog):
    import logging

    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert compile_cache.configure() == tmp_path / "c"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "users")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "c" / "triton")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "file" / "below"))
    with caplog.at_level(logging.WARNING):
        assert compile_cache.configure(logging.getLogger("t")) is None
    assert "not writable" in caplog.text and str(tmp_path / "file" / "below") in caplog.text


def test_a_second_run_compiles_nothing_new(tmp_path):
    """Two training processes (fresh interpreters, as two CLI runs are) with compile on and one
    cache folder: the first compiles its graphs into the folder, the second loads all of them
    (no FX-graph or AOTAutograd miss) and trains to the same losses."""
    inputs, _ = analytic_scene(tmp_path / "scene", views=8, width=32, height=24)
    cfg = {**TINY, "iterations": 3, "compile": "on", "holdout_eval_views": 0, "checkpoint_every": 100}
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.update({compile_cache.ENV: str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)})
    runs = []
    for name in ("first", "second"):
        job = {"inputs": {k: str(v) for k, v in inputs.items()}, "cfg": cfg, "out": str(tmp_path / name)}
        proc = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(job)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads((tmp_path / name / "train.json").read_text()))
    first, second = (r["compile_cache"] for r in runs)
    assert first["dir"] == str(tmp_path / "cache" / "inductor")
    assert first["fx_graph_misses"] >= 1 and first["autograd_misses"] >= 1
    assert second["fx_graph_misses"] == 0 and second["autograd_misses"] == 0, second
    assert second["fx_graph_hits"] >= first["fx_graph_misses"] and second["autograd_hits"] >= 1
    assert any((tmp_path / "cache" / "inductor" / "fxgraph").iterdir())
    assert [h["loss"] for h in runs[1]["history"]] == pytest.approx([h["loss"] for h in runs[0]["history"]],
                                                                  rel=1e-6)
