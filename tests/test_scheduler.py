"""A real luigid started on loopback and a free port: start, run against it, status, stop."""
import json
import socket

from conftest import run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_luigid_lifecycle_and_run(tiny_video, tmp_path):
    wd, port = tmp_path / "wd", str(_free_port())
    started = run_cli("scheduler", "start", "--workdir", str(wd), "--port", port)
    assert started.returncode == 0, started.stderr
    try:
        info = json.loads(started.stdout)
        assert info["answering"] and info["address"] == "127.0.0.1"
        assert (wd / ".luigid").stat().st_mode & 0o777 == 0o700  # luigid unpickles its state file
        run = run_cli("run", "--video", str(tiny_video), "--workdir", str(wd), "--until", "frames",
                      "--preset", "fast_cpu", "--no-progress", "--scheduler-host", "127.0.0.1",
                      "--scheduler-port", port)
        assert run.returncode == 0, run.stderr
        assert list(wd.glob("clip/frames-*/manifest.json"))
        again = run_cli("scheduler", "start", "--workdir", str(wd), "--port", port)
        assert again.returncode == 2 and "already runs" in again.stderr
    finally:
        stopped = run_cli("scheduler", "stop", "--workdir", str(wd))
    assert json.loads(stopped.stdout)["stopped"] is True
    status = run_cli("scheduler", "status", "--workdir", str(wd))
    assert status.returncode == 1 and json.loads(status.stdout)["running"] is False
    down = run_cli("run", "--video", str(tiny_video), "--workdir", str(wd), "--until", "frames",
                   "--scheduler-host", "127.0.0.1", "--scheduler-port", port)
    assert down.returncode == 2 and "cannot reach the Luigi scheduler" in down.stderr
