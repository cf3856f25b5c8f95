"""GPU slots on this host: one flock per GPU, so no two stage processes share a card.

Luigi's resource pool is global across machines, so the resource name carries the host name;
the pool only bounds how many GPU stages run at once, and the lock here picks *which* card.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
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


@contextlib.contextmanager
def gpu_slot(gpus: list[str], poll: float = 0.5) -> Iterator[str]:
    """Hold one free GPU of ``gpus`` (its id, for CUDA_VISIBLE_DEVICES) for the block."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    while True:
        for gpu in gpus:
            fd = os.open(LOCK_DIR / f"gpu{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                continue
            try:
                yield gpu
            finally:
                os.close(fd)
            return
        time.sleep(poll)
