"""Start, stop and query a real Luigi central scheduler (``luigid``) kept under a workdir.

Everything lives in ``<workdir>/.luigid/``: ``luigid.pid``, ``state.pickle`` (luigid's own
state file), ``logs/``, ``luigi.cfg`` and the SQLite task history ``history.db`` (when
SQLAlchemy is installed). It binds to loopback unless another address is asked for.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import PipelineError


def _folder(workdir: Path) -> Path:
    return Path(workdir).resolve() / ".luigid"


def _pid(folder: Path) -> int | None:
    try:
        pid = int((folder / "luigid.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def ping(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when a luigid answers its task-list API at host:port."""
    url = f"http://{host}:{port}/api/task_list?data=" + urllib.request.quote(json.dumps({"status": "RUNNING"}))
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _config(folder: Path) -> Path:
    cfg = folder / "luigi.cfg"
    lines = ["[scheduler]", f"state_path = {folder / 'state.pickle'}"]
    try:
        import sqlalchemy  # noqa: F401  (task history needs it)
        lines += ["record_task_history = true", "", "[task_history]",
                  f"db_connection = sqlite:///{folder / 'history.db'}"]
    except ImportError:
        pass
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def start(workdir: Path, port: int = 8082, address: str = "127.0.0.1", wait: float = 30.0) -> dict:
    folder = _folder(workdir)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    # luigid unpickles state.pickle at start: on a shared workdir nobody else may write here
    os.chmod(folder, 0o700)
    if (pid := _pid(folder)) is not None:
        raise PipelineError(f"luigid already runs for {workdir} (pid {pid}); stop it first")
    with socket.socket() as s:
        if s.connect_ex((address if address != "0.0.0.0" else "127.0.0.1", port)) == 0:
            raise PipelineError(f"port {port} on {address} is already in use")
    exe = shutil.which("luigid") or str(Path(sys.executable).with_name("luigid"))
    env = dict(os.environ, LUIGI_CONFIG_PATH=str(_config(folder)))
    cmd = [exe, "--background", "--address", address, "--port", str(port),
           "--pidfile", str(folder / "luigid.pid"), "--logdir", str(folder / "logs"),
           "--state-path", str(folder / "state.pickle")]
    subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60)
    (folder / "address.json").write_text(json.dumps({"address": address, "port": port}))
    deadline = time.time() + wait
    host = "127.0.0.1" if address in ("0.0.0.0", "") else address
    while time.time() < deadline:
        if ping(host, port):
            return status(workdir)
        time.sleep(0.2)
    raise PipelineError(f"luigid did not answer on {address}:{port} within {wait:.0f} s; see {folder / 'logs'}")


def status(workdir: Path) -> dict:
    folder = _folder(workdir)
    try:
        where = json.loads((folder / "address.json").read_text())
    except (OSError, ValueError):
        where = {"address": None, "port": None}
    pid = _pid(folder)
    host = "127.0.0.1" if where["address"] in ("0.0.0.0", None) else where["address"]
    answering = bool(pid and where["port"] and ping(host, where["port"]))
    return {"running": pid is not None, "answering": answering, "pid": pid, **where, "folder": str(folder)}


def stop(workdir: Path, wait: float = 15.0) -> dict:
    folder = _folder(workdir)
    pid = _pid(folder)
    if pid is None:
        return {"stopped": False, "reason": "not running"}
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + wait
    while time.time() < deadline and _pid(folder) is not None:
        time.sleep(0.1)
    if _pid(folder) is not None:
        os.kill(pid, signal.SIGKILL)
    (folder / "luigid.pid").unlink(missing_ok=True)
    return {"stopped": True, "pid": pid}
