"""Checkpoints: step-numbered, written atomically, the last ``keep`` kept, loadable with
``torch.load(weights_only=True)`` (RNG states are stored as tensors and plain types)."""
from __future__ import annotations

import contextlib
import random
import re
from pathlib import Path

import numpy as np
import torch

from pipeline.fsutil import atomic_file

NAME = re.compile(r"^step_(\d{8,})\.pt$")


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]), "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4]),
        "python_version": int(py_version), "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
    }
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"].cpu())
    np.random.set_state(("MT19937", state["numpy_keys"].cpu().numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss"]))
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"].cpu(), device)


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_file(path) as f:
        torch.save(obj, f)


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def save(ckpt_dir: Path, step: int, payload: dict, keep: int = 2) -> Path:
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step:08d}.pt"
    atomic_torch_save(payload, path)
    for _, old in list_checkpoints(ckpt_dir)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return path


def latest(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint; also removes temporary files left by a write that was killed."""
    if Path(ckpt_dir).is_dir():
        for tmp in Path(ckpt_dir).glob(".step_*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def load(path: Path, device: torch.device | str = "cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=True)
