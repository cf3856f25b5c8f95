"""Two runs on one workdir and scene, and locks of killed processes.

The per-stage lock is a flock: the kernel drops it when the process holding it dies, so a
SIGKILLed run leaves nothing to break. The lock file names its holder (pid, host) for messages.
Every stage process appends a line to ``$PIPELINE_TRACE_FILE`` as it ends, so the tests count
how often each stage was computed.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline import store
from pipeline.fsutil import file_lock, lock_holder

import faults  # noqa: E402

HOLD = "import sys, time; from pathlib import Path; from pipeline.fsutil import file_lock\n" \
       "with file_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)\n"


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_of_a_sigkilled_process_is_free_at_once(tmp_path):
    path = tmp_path / "locks" / "a.lock"
    proc = _holder(path)
    with file_lock(path, blocking=False) as fd:
        assert fd is None
    assert f"pid {proc.pid} on host " in lock_holder(path)
    proc.kill()
    proc.wait()
    with file_lock(path, blocking=False) as fd:
        assert fd is not None
    assert f"pid {os.getpid()} on host " in lock_holder(path)


def test_waiter_on_an_unlinked_lock_file_locks_the_new_one(tmp_path):
    """gc unlinks a lock file while holding it; a process already waiting on the old file must
    not think it holds the lock: it takes the file now at the path."""
    path = tmp_path / "a.lock"
    proc = _holder(path)
    blocked, waited = [], []

    def waiter():
        with file_lock(path, on_wait=waited.append):
            with file_lock(path, blocking=False) as other:  # a newcomer, via the path
                blocked.append(other is None)
    thread = threading.Thread(target=waiter)
    thread.start()
    deadline = time.time() + 10
    while not waited and time.time() < deadline:
        time.sleep(0.01)
    assert waited and f"pid {proc.pid}" in waited[0]
    path.unlink()
    proc.kill()
    proc.wait()
    thread.join(10)
    assert blocked == [True]  # had the waiter kept the unlinked file, the newcomer would hold a lock too


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> faults.Setup:
    s = faults.make_scene(tmp_path_factory.getbasetemp() / "faults_scene")
    s.until = "masks"
    return s


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _start(setup: faults.Setup, workdir: Path, trace: Path, log: Path) -> subprocess.Popen:
    return faults.start(setup, workdir, log, env={"PIPELINE_TRACE_FILE": str(trace)})


def test_two_runs_at_once_compute_every_stage_once(setup, tmp_path):
    wd, trace = tmp_path / "wd", tmp_path / "trace.jsonl"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    runs = [_start(setup, wd, trace, log) for log in logs]
    codes = [p.wait(timeout=300) for p in runs]
    text = "".join(log.read_text() for log in logs)
    assert codes == [0, 0], text[-3000:]
    lines = _trace(trace)
    assert Counter(t["stage"] for t in lines) == {"frames": 1, "sfm": 1, "masks": 1}, lines
    assert all(t["rc"] == 0 for t in lines)
    waits = [line for line in text.splitlines() if ": waiting for " in line]  # one run waited for the other
    # each wait names the holder (the pid of whichever process of the other run took the lock),
    # or says it is unknown when the holder had not yet written its name into the lock file
    assert waits and all(re.search(r"\((pid \d+ on host \S+ since \d{4}-.*|unknown holder)\)$", w)
                         for w in waits), waits
    assert faults.check_store(wd) == [] and not list(store.scene_dir(wd, faults.SCENE).glob("*.partial"))


def test_run_killed_holding_a_stage_lock_does_not_block_the_next(setup, tmp_path):
    wd, trace, log = tmp_path / "wd", tmp_path / "trace.jsonl", tmp_path / "run.log"
    run = _start(setup, wd, trace, log)
    deadline, lock = time.time() + 120, None
    while time.time() < deadline and lock is None and run.poll() is None:
        lock = next(iter(store.scene_dir(wd, faults.SCENE).glob(".locks/sfm-*.lock")), None)
        time.sleep(0.02)
    assert lock is not None, log.read_text()
    with file_lock(lock, blocking=False) as fd:
        assert fd is None  # the run holds it while sfm runs
    assert f"pid {run.pid} on host " in lock_holder(lock)
    faults.kill_group(run)
    with file_lock(lock, blocking=False) as fd:
        assert fd is not None  # freed by the kernel: nothing stale to detect or break
    again = _start(setup, wd, trace, log)
    assert again.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "waiting for" not in text
    assert Counter(t["stage"] for t in _trace(trace) if t["rc"] == 0) == {"frames": 1, "sfm": 1, "masks": 1}


def test_stage_process_orphaned_by_a_killed_run_keeps_the_lock(setup, tmp_path):
    """Only the run_pipeline process dies (kill PID, not the group): its stage process goes on
    in ``.partial``. A second run must wait for it, not compute the stage again beside it; the
    orphan's finished work (``.summary.json``) is then committed without a rerun."""
    wd, trace, log = tmp_path / "wd", tmp_path / "trace.jsonl", tmp_path / "run.log"
    run = _start(setup, wd, trace, log)
    deadline, jobs = time.time() + 120, []
    while time.time() < deadline and not jobs and run.poll() is None:
        jobs = [j for j in faults.running_jobs(run.pid) if j["stage"] == "masks"]
        time.sleep(0.02)
    assert jobs, log.read_text()
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    again = _start(setup, wd, trace, log)
    try:
        assert again.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        faults.kill_group(run)
    masks = [t for t in _trace(trace) if t["stage"] == "masks"]
    assert len(masks) == 1 and masks[0]["rc"] == 0, masks
    assert "masks: waiting for" in log.read_text()
    assert faults.check_store(wd) == []
