"""GPU slots on this host: one flock per GPU, so no two stage processes share a card.

Luigi's resource pool is global across machines, so the resource name carries the host name;
the pool only bounds how many GPU stages run at once, and the locks here pick *which* cards.
A stage whose config section asks for ``gpus: N`` (train with DDP, mesh split over cards)
takes N slots at once and counts N units of the resource.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

LOCK_DIR = Path(tempfile.gettempdir()) / "meshpipe-gpu-locks"


def resource_name() -> str:
    return f"gpu@{socket.gethostname()}"


def parse_gpus(text: str | None) -> list[str]:
    return [g.strip() for g in (text or "").split(",") if g.strip()]


def gpus_wanted(section: dict | None) -> int:
    """How many GPUs a stage's config section asks for (its ``gpus`` field; 1 when it has none)."""
    return max(1, int((section or {}).get("gpus", 1) or 1))


def resource_units(section: dict | None, gpus: list[str]) -> int:
    """Luigi resource units for a GPU stage: the GPUs it asks for, at most the host's pool (a
    task asking for more still runs, and its stage process then fails with a clear message)."""
    return max(1, min(gpus_wanted(section), len(gpus)))


def _try_lock(gpu: str) -> int | None:
    fd = os.open(LOCK_DIR / f"gpu{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return None
    return fd


@contextlib.contextmanager
def gpu_slot(gpus: list[str], count: int = 1, poll: float = 0.5) -> Iterator[str]:
    """Hold ``count`` free GPUs of ``gpus`` for the block; yields their ids joined by commas
    (for CUDA_VISIBLE_DEVICES). All or none: a partial set is released before waiting again,
    so two stages that each need two cards never hold one each forever."""
    if count > len(gpus):
        raise ValueError(f"{count} GPUs asked for, but only {len(gpus)} given ({','.join(gpus) or 'none'})")
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    while True:
        held: list[tuple[str, int]] = []
        for gpu in gpus:
            fd = _try_lock(gpu)
            if fd is not None:
                held.append((gpu, fd))
                if len(held) == count:
                    break
        if len(held) == count:
            try:
                yield ",".join(gpu for gpu, _ in held)
            finally:
                for _, fd in held:
                    os.close(fd)
            return
        for _, fd in held:
            os.close(fd)
        time.sleep(poll * (0.5 + random.random()))  # jitter: rivals for the same cards fall out of step
