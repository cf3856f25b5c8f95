"""The CLI end to end on the frames stage: caching, resume after failures and kills, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, panning_frames, run_cli, write_video


def _manifests(workdir: Path) -> dict[str, float]:
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in workdir.glob("*/*/manifest.json")}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "stage.log")}  # records of the run, not results


def _run(video, workdir, *extra, env=None):
    return run_cli("run", "--video", str(video), "--workdir", str(workdir), "--until", "frames",
                   "--preset", "fast_cpu", "--no-progress", *extra, env=env)


def test_rerun_is_cached_and_parameter_change_reruns(tiny_video, tmp_path):
    wd = tmp_path / "wd"
    first = _run(tiny_video, wd)
    assert first.returncode == 0, first.stderr
    before = _manifests(wd)
    assert len(before) == 1
    second = _run(tiny_video, wd)
    assert second.returncode == 0, second.stderr
    assert _manifests(wd) == before
    assert "start" not in second.stderr
    third = _run(tiny_video, wd, "--set", "frames.target_count=10")
    assert third.returncode == 0, third.stderr
    after = _manifests(wd)
    assert len(after) == 2 and all(after[k] == v for k, v in before.items())
    status = json.loads(run_cli("status", "--workdir", str(wd), "--json").stdout)
    frames = status["scenes"]["clip"]["frames"]
    assert frames["state"] == "done" and Path(frames["dir"]).name in {Path(k).parent.name for k in after}
    gc = run_cli("gc", "--workdir", str(wd))
    assert gc.returncode == 0 and "removed 1 folder" in gc.stdout
    assert len(_manifests(wd)) == 1


def test_gc_after_a_failed_changed_run_keeps_the_last_finished_run(tiny_video, tmp_path):
    wd = tmp_path / "wd"
    assert _run(tiny_video, wd).returncode == 0
    finished = _manifests(wd)
    failed = _run(tiny_video, wd, "--set", "frames.target_count=10", env={"PIPELINE_FAIL_STAGE": "frames"})
    assert failed.returncode != 0
    gc = run_cli("gc", "--workdir", str(wd))
    assert gc.returncode == 0 and "removed 0 folder" in gc.stdout, gc.stdout
    assert _manifests(wd) == finished


def test_failing_stage_leaves_no_manifest_and_next_run_matches(tiny_video, tmp_path):
    wd, clean = tmp_path / "wd", tmp_path / "clean"
    bad = _run(tiny_video, wd, env={"PIPELINE_FAIL_STAGE": "frames"})
    assert bad.returncode == 1
    failed = [line for line in bad.stderr.splitlines() if "FAILED" in line]
    assert failed and "scene 'clip', stage 'frames'" in failed[0] and "injected failure" in failed[0]
    assert "Traceback" not in bad.stderr
    assert _manifests(wd) == {}
    assert _run(tiny_video, wd).returncode == 0
    assert _run(tiny_video, clean).returncode == 0
    (a,), (b,) = [list(w.glob("clip/frames-*")) for w in (wd, clean)]
    assert a.name == b.name and _tree(a) == _tree(b)


def test_sigkill_mid_write_then_resume(tmp_path):
    video = write_video(tmp_path / "long.mp4", panning_frames(n=150, w=320, h=240))
    wd, clean = tmp_path / "wd", tmp_path / "clean"
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "run", "--video", str(video), "--workdir", str(wd),
           "--until", "frames", "--preset", "fast_cpu", "--set", "frames.target_count=150", "--no-progress"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(wd.glob("long/frames-*.partial/images/*.jpg")):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(wd.glob("long/frames-*.partial")), "the kill should have caught the stage in flight"
    assert _manifests(wd) == {}
    resumed = run_cli(*cmd[2:])
    assert resumed.returncode == 0, resumed.stderr
    assert not list(wd.glob("long/*.partial"))
    fresh = run_cli(*[c if c != str(wd) else str(clean) for c in cmd[2:]])
    assert fresh.returncode == 0
    (a,), (b,) = [list(w.glob("long/frames-*")) for w in (wd, clean)]
    assert _tree(a) == _tree(b)


@pytest.mark.parametrize("case", ["missing", "empty", "text", "truncated", "empty_folder"])
def test_bad_input_names_the_file_and_keeps_the_workdir(case, tiny_video, tmp_path):
    wd = tmp_path / "wd"
    assert _run(tiny_video, wd).returncode == 0
    before = {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()}
    if case == "missing":
        bad = tmp_path / "nope.mp4"
    elif case == "empty":
        bad = tmp_path / "empty.mp4"
        bad.write_bytes(b"")
    elif case == "text":
        bad = tmp_path / "notes.mp4"
        bad.write_text("this is not a video\n" * 20)
    elif case == "truncated":
        bad = tmp_path / "cut.mp4"
        bad.write_bytes(tiny_video.read_bytes()[: tiny_video.stat().st_size // 10])
    else:
        bad = tmp_path / "nothing_here"
        bad.mkdir()
    flag = "--images" if case == "empty_folder" else "--video"
    result = run_cli("run", flag, str(bad), "--workdir", str(wd), "--until", "frames", "--scene", "clip",
                     "--preset", "fast_cpu", "--no-progress")
    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if "FAILED" in line or line.startswith("error:")]
    assert message and bad.name in message[0], result.stderr
    assert "Traceback" not in result.stderr
    after = {p: p.read_bytes() for p in wd.rglob("*") if p.is_file() and p.name != "plan.json"
             and ".errors" not in p.parts and ".locks" not in p.parts}
    assert {p: b for p, b in before.items() if p.name != "plan.json" and ".locks" not in p.parts} == after
