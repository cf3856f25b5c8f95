"""Small file helpers: atomic writes, hashing, locks, clean-up of killed writers' temporary files."""
from __future__ import annotations

import contextlib
import fcntl
import filecmp
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: readers see the old file or the whole new one.
    It is a temporary file beside ``path``, renamed into place when the block ends and removed
    when it raises. ``durable``: fsync the file and the folder (off for cheap, re-creatable
    files). Mode 0644: results are meant to be shared (mkstemp makes 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, _json_text(obj))


def json_unchanged(path: Path, obj: Any) -> bool:
    """True when ``path`` already holds exactly what ``atomic_write_json(path, obj)`` would write
    (so a rerun with nothing to do need not write, e.g. in a read-only workdir)."""
    try:
        return Path(path).read_bytes() == _json_text(obj).encode("utf-8")
    except OSError:
        return False


def same_content(a: Path, b: Path) -> bool:
    """True when both are regular files with the same bytes."""
    try:
        return Path(b).is_file() and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def atomic_copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as source, atomic_file(dst, durable=False) as f:
        shutil.copyfileobj(source, f, 1 << 20)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def lock_holder(path: Path) -> str:
    """What a lock file says about its last holder ("pid 12 on host h since ..."), for messages."""
    try:
        return Path(path).read_text().strip() or "unknown holder"
    except OSError:
        return "unknown holder"


def _open_locked(path: Path, blocking: bool, on_wait: Callable[[str], None] | None) -> int | None:
    """Open ``path`` and flock it; None when ``blocking`` is False and someone holds it.

    The lock belongs to the open file description, so the kernel drops it when the last process
    holding that descriptor dies (SIGKILL included): there are no stale locks to break. If the
    file was unlinked or replaced while we waited (``gc`` removes lock files it holds), the lock
    we got guards nothing and we try again on the file now at ``path``.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    os.close(fd)
                    return None
                if on_wait is not None:
                    on_wait(lock_holder(path))
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True,
              on_wait: Callable[[str], None] | None = None) -> Iterator[int | None]:
    """An exclusive advisory lock (flock) on ``path``, held for the block.

    Yields the locked file descriptor, or None when ``blocking`` is False and another process
    holds the lock. ``on_wait(holder)`` is called once before blocking. The file records the
    holder's pid and host (diagnostics only: the kernel, not this text, decides who holds it).
    A child process that inherits the descriptor (``pass_fds``) keeps the lock until it ends.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path, blocking, on_wait)
    if fd is None:
        yield None
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


def remove_stale_temp_files(root: Path, older_than: float = 0.0, recursive: bool = True) -> list[Path]:
    """Delete temporary files that killed writers leave behind in ``root`` (and below it):
    our atomic writes' ``.<name>.<random>.tmp`` (and ``.<name>.tmp``) and Luigi's
    ``*-luigi-tmp-*``. Only files untouched for ``older_than`` seconds go, so a writer that is
    still running keeps its file."""
    removed, now = [], time.time()
    for dirpath, dirs, files in os.walk(root):
        if not recursive:
            dirs.clear()
        for name in files:
            if not (name.startswith(".") and name.endswith(".tmp")) and "-luigi-tmp-" not in name:
                continue
            path = Path(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime >= older_than:
                    path.unlink()
                    removed.append(path)
    return removed
