"""Shared fixtures: tiny inputs made inside the tests, and a CLI runner."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# CI has no network beyond package registries: never wait on a model download (the tests of
# downloads clear it, against a local server)
os.environ.setdefault("MESHPIPE_OFFLINE", "1")
# compiled graphs of the tests go to a folder of this run, not the user's cache (~/.cache/meshpipe)
os.environ.setdefault("MESHPIPE_COMPILE_CACHE", tempfile.mkdtemp(prefix="meshpipe_compile_"))

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # benchmark harnesses that tests drive at CI size
    sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(autouse=True)
def _restore_pipeline_logger():
    """A test that runs a CLI or stage entry point in-process sets up the "pipeline" logger
    (own handler, no propagation); put it back so later tests' caplog still sees its records."""
    log = logging.getLogger("pipeline")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    """Encode RGB uint8 frames (H, W, 3) with libx264."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def panning_frames(n: int = 24, w: int = 160, h: int = 120, seed: int = 0) -> list[np.ndarray]:
    """A camera panning over a random texture: every frame differs and is sharp."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, size=(h // 4, (w + 4 * n) // 4, 3), dtype=np.uint8)
    texture = np.kron(coarse, np.ones((4, 4, 1), dtype=np.uint8))
    return [np.ascontiguousarray(texture[:h, 4 * i:4 * i + w]) for i in range(n)]


@pytest.fixture
def tiny_video(tmp_path) -> Path:
    return write_video(tmp_path / "clip.mp4", panning_frames())


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *args], capture_output=True,
                          text=True, env=full_env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one thread is as fast, and immune to a busy machine (spinning workers)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def deterministic():
    """torch's deterministic algorithms for one test (bit-identical resumes)."""
    import torch

    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
