"""Hostile command lines (issue 9, second part): out-of-range settings, scene names that leave the
workdir, files where folders belong, a read-only workdir, damaged plan files, Ctrl-C, bad counts,
a bad --gt and file names that would fake a log line. Each ends in one clear line and the right
exit code (0, 1, 2 or 130) with the workdir as it was."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, panning_frames, run_cli, write_video
from pipeline import store
from pipeline.config import (SECTIONS, PipelineConfig, apply_overrides, load_config, numeric_fields, preset_names,
                             section_from_dict)
from pipeline.errors import ConfigError, InputError, OneLineFormatter, one_line
from test_hostile import first_error, frames_run, seed_wd, snapshot, wd  # noqa: F401  (its fixtures)


@pytest.fixture
def video(seed_wd) -> Path:
    """The video of the ``wd`` fixture's finished frames stage: a rerun on it has the same plan."""
    return seed_wd.parent / "clip.mp4"


def full_state(wd: Path) -> dict[str, tuple]:
    """Every entry under the workdir, bookkeeping included: (kind, size, mtime_ns) of each."""
    return {p.relative_to(wd).as_posix(): (p.is_dir(), p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in [wd, *wd.rglob("*")]}


# ---------------------------------------------------------------- 1. ranges of numeric settings

RANGE_CASES = [
    ("frames.max_side=0", r"frames\.max_side=0: must be in \[16, 65536\]"),
    ("frames.max_side=-1", r"frames\.max_side=-1: must be in \[16, 65536\]"),
    ("frames.jpeg_quality=1000", r"frames\.jpeg_quality=1000: must be in \[1, 100\]"),
    ("frames.dedup_threshold=nan", r"frames\.dedup_threshold=nan: must be a finite number in \[0, 1\]"),
    ("frames.dedup_threshold=.nan", r"frames\.dedup_threshold=nan: must be a finite number in \[0, 1\]"),
    ("train.iterations=0", r"train\.iterations=0: must be >= 1"),
    ("train.iterations=-5", r"train\.iterations=-5: must be >= 1"),
    ("train.lr=nan", r"train\.lr=nan: must be a finite number in \(0, 10\]"),
    ("train.lr=.inf", r"train\.lr=inf: must be a finite number in \(0, 10\]"),
    ("train.batch_rays=0", r"train\.batch_rays=0: must be in \[1, 67108864\]"),
    ("evaluate.fscore_thresholds=[0.01, 2]", r"evaluate\.fscore_thresholds\[1\]=2: must be in \(0, 1\]"),
    ("train.seed=" + "9" * 400, r"train\.seed: 9{20}\.\.\. is too large a number"),
]


@pytest.mark.parametrize("item,message", RANGE_CASES, ids=[c[0][:40] for c in RANGE_CASES])
def test_out_of_range_setting_is_refused(item, message):
    with pytest.raises(ConfigError, match=rf"^--set: {message}$"):
        load_config("fast_cpu", [item])


def _outside(bounds, integer: bool) -> list[float]:
    """Values just outside ``bounds`` (none on an infinite end), plus NaN for a float (an integer
    field refuses NaN as a type error)."""
    step = 1 if integer else 1e-6
    out = [] if integer else [math.nan]
    if math.isfinite(bounds.lo):
        out.append(bounds.lo if bounds.lo_open else bounds.lo - step * max(1.0, abs(bounds.lo)))
    if math.isfinite(bounds.hi):
        out.append(bounds.hi if bounds.hi_open else bounds.hi + step * max(1.0, abs(bounds.hi)))
    return out


def test_every_numeric_field_has_a_range_that_the_defaults_and_presets_meet():
    defaults, checked = PipelineConfig(), 0
    for section in SECTIONS:
        for name, bounds in numeric_fields(section).items():
            assert bounds is not None, f"{section}.{name} declares no range (opt(..., bounds='[lo, hi]'))"
            default = getattr(defaults.section(section), name)
            integer = isinstance(default, int) or isinstance(default, tuple) and isinstance(default[0], int)
            def setting(value):
                value = int(value) if integer and math.isfinite(value) else value
                return {section: {name: [value] if isinstance(default, tuple) else value}}

            for value in _outside(bounds, integer):
                with pytest.raises(ConfigError, match=rf"{section}\.{name}(\[0\])?=\S+: must be "):
                    apply_overrides(defaults, setting(value), source="test")
                checked += 1
            for edge, is_open in ((bounds.lo, bounds.lo_open), (bounds.hi, bounds.hi_open)):
                if math.isfinite(edge) and not is_open:  # a closed end is allowed
                    apply_overrides(defaults, setting(edge), source="test")
    assert checked > 150  # about 100 numeric fields: below, above, NaN
    for preset in preset_names():
        load_config(preset)  # the presets and the defaults they start from are all in range
    with pytest.raises(ConfigError, match=r"train\.iterations=0: must be >= 1"):
        section_from_dict("train", {"iterations": 0})  # what a stage process reads back is checked too


@pytest.mark.parametrize("how", ["set", "preset"])
def test_out_of_range_setting_fails_on_the_command_line(how, wd, tmp_path, video):
    if how == "set":
        extra, pattern = ["--set", "train.iterations=0"], r"^error: --set: train\.iterations=0: must be >= 1$"
    else:
        preset = tmp_path / "mine.yaml"
        preset.write_text("base: fast_cpu\nframes:\n  max_side: 0\n")
        extra, pattern = ["--preset", str(preset)], rf"^error: {re.escape(str(preset))}: frames\.max_side=0: must be in"
    before = snapshot(wd)
    result = run_cli("run", "--video", str(video), "--workdir", str(wd), "--until", "frames", "--scene", "clip",
                     *(["--preset", "fast_cpu"] if how == "set" else []), "--no-progress", *extra)
    assert result.returncode == 2, result.stderr
    assert re.search(pattern, first_error(result.stderr)), result.stderr
    assert "Traceback" not in result.stderr and snapshot(wd) == before


# ---------------------------------------------------------------- 2. scene names stay in the workdir

@pytest.mark.parametrize("name", ["/abs/x", "../../x", "..", ".", "a/b", ".luigid", "", "a\nb"])
def test_scene_name_must_be_one_plain_folder_name(name):
    with pytest.raises(InputError, match=r"^scene name '.*': must be one plain folder name"):
        store.check_scene_name(name)
    store.check_scene_name("my scene é-1.2")  # spaces, non-ASCII letters, dots inside: fine


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_scene_outside_the_workdir_is_refused(kind, wd, tmp_path, video):
    target = tmp_path / "outside" if kind == "absolute" else wd / ".." / ".." / "escaped"
    scene = str(target) if kind == "absolute" else "../../escaped"
    before = snapshot(wd)
    result = frames_run("--video", video, wd, "--scene", scene)
    assert result.returncode == 2, result.stderr
    assert first_error(result.stderr) == f"error: scene name '{scene}': must be one plain folder name (no '/', " \
        "not '.' or '..', not starting with '.', no control characters, at most 200 bytes)"
    assert not target.exists() and snapshot(wd) == before


# ---------------------------------------------------------------- 3. a file where a folder belongs

@pytest.mark.parametrize("case", ["workdir_is_a_file", "workdir_parent_is_a_file", "scene_folder_is_a_file"])
def test_file_where_a_folder_belongs(case, wd, tmp_path, video):
    blocker = tmp_path / "notes.txt" if case != "scene_folder_is_a_file" else wd / "other"
    blocker.write_text("keep me\n")
    workdir = {"workdir_is_a_file": blocker, "workdir_parent_is_a_file": blocker / "wd"}.get(case, wd)
    pattern = {"workdir_is_a_file": "the workdir is a file, not a folder",
               "workdir_parent_is_a_file": f"a parent of the workdir {re.escape(str(workdir))} is a file",
               "scene_folder_is_a_file": "the folder of scene 'other' is a file"}[case]
    before = snapshot(wd)
    result = run_cli("run", "--video", str(video), "--workdir", str(workdir), "--until", "frames",
                     "--scene", "other" if case == "scene_folder_is_a_file" else "clip", "--preset", "fast_cpu")
    assert result.returncode == 2, result.stderr
    assert re.search(rf"^error: {re.escape(str(blocker))}: {pattern}", first_error(result.stderr)), result.stderr
    assert "Traceback" not in result.stderr
    assert blocker.read_text() == "keep me\n" and snapshot(wd) == before


# ---------------------------------------------------------------- 4. a read-only workdir

def test_rerun_with_nothing_to_do_writes_nothing(wd, video):
    """What makes a read-only workdir work: the no-op run (even as root) changes no entry."""
    before = full_state(wd)
    time.sleep(0.01)
    result = frames_run("--video", video, wd)
    assert result.returncode == 0, result.stderr
    assert full_state(wd) == before


def _read_only_mode(tmp: Path) -> str:
    """'mount' (a read-only bind mount in a private namespace: read-only for root too), 'chmod', or ''."""
    probe = tmp / "probe"
    probe.mkdir()
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && ! touch "$0/x" 2>/dev/null'
    try:
        if subprocess.run(["unshare", "-rm", "sh", "-c", script, str(probe)], capture_output=True,
                          timeout=10).returncode == 0:
            return "mount"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "chmod" if os.geteuid() != 0 else ""


def read_only_run(mode: str, wd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if mode == "mount":
        script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(wd), *cmd], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=300)
    folders = [wd, *[p for p in wd.rglob("*") if p.is_dir()]]
    for folder in folders:
        folder.chmod(0o555)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    finally:
        for folder in folders:
            folder.chmod(0o755)


def test_read_only_workdir(wd, tmp_path, video):
    mode = _read_only_mode(tmp_path)
    if not mode:
        pytest.skip("running as root without unshare: nothing makes a folder read-only for this process")
    args = ["run", "--video", str(video), "--workdir", str(wd), "--until", "frames", "--scene", "clip",
            "--preset", "fast_cpu", "--no-progress"]
    before = full_state(wd)
    noop = read_only_run(mode, wd, *args)
    assert noop.returncode == 0, noop.stderr
    assert "done: scene 'clip'" in noop.stdout
    work = read_only_run(mode, wd, *args, "--set", "frames.target_count=5")
    assert work.returncode == 2, work.stderr
    assert re.search(rf"^error: {re.escape(str(wd / 'clip'))}: not writable \(read-only file system or no write "
                     r"permission\), and this run has stages to compute", first_error(work.stderr)), work.stderr
    assert "Traceback" not in work.stderr
    assert full_state(wd) == before


# ---------------------------------------------------------------- 5. damaged plan files

@pytest.mark.parametrize("name,text", [("plan.json", "[]"), ("plan.json", "{}"), ("plan.json", "{not json"),
                                       ("plan.json", '{"keys": {"frames": "../../etc"}}'), ("plan_done.json", "[]")])
def test_status_and_gc_on_a_damaged_plan(name, text, wd):
    path = wd / "clip" / name
    path.write_text(text)
    before = snapshot(wd)
    status = run_cli("status", "--workdir", str(wd), "--json")
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    scenes = json.loads(status.stdout)["scenes"]
    if name == "plan.json":
        assert scenes == {}
        assert re.search(rf"^warning: {re.escape(str(path))}: not (valid JSON|a valid plan) .*; scene skipped$",
                         status.stderr.strip()), status.stderr
    else:
        assert scenes["clip"]["frames"]["state"] == "done"
    gc = run_cli("gc", "--workdir", str(wd))
    assert gc.returncode == 2, gc.stderr
    assert re.search(rf"^error: {re.escape(str(path))}: not (valid JSON|a valid plan)", first_error(gc.stderr))
    assert "Traceback" not in gc.stderr and snapshot(wd) == before  # gc removed nothing


# ---------------------------------------------------------------- 6. Ctrl-C

@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_prints_one_line_and_the_rerun_finishes(workers, tmp_path):
    # long enough (a few seconds) that the poll below sees the stage in flight on a busy machine too
    video = write_video(tmp_path / "long.mp4", panning_frames(n=300, w=640, h=480))
    wd = tmp_path / "wd"
    args = ["run", "--video", str(video), "--workdir", str(wd), "--until", "frames", "--preset", "fast_cpu",
            "--set", "frames.target_count=300", "--no-progress", "--workers", workers]
    # A foreground command gets Ctrl-C even when this test runs in the background (nohup, `&` in a
    # script), where SIGINT is inherited as ignored and Python would then keep ignoring it.
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), *args], start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not any(wd.glob("long/frames-*.partial/images/*.jpg")):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.strip().splitlines()[-1] == ("interrupted: finished stages are kept and the stage in flight "
                                               "resumes; rerun the same command to continue")
    assert not list(wd.glob("long/*/manifest.json")), "the interrupt should have caught the stage in flight"
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert store.is_done(next(wd.glob("long/frames-*"))) and not list(wd.glob("long/*.partial"))


# ---------------------------------------------------------------- 7. counts on the command line

@pytest.mark.parametrize("args,message", [
    (["run", "--workers", "0"], r"argument --workers: must be an integer >= 1, got '0'"),
    (["run", "--workers", "-2"], r"argument --workers: must be an integer >= 1, got '-2'"),
    (["batch", "--limit", "-1"], r"argument --limit: must be an integer >= 0, got '-1'"),
    (["run", "--scheduler-port", "70000"], r"argument --scheduler-port: must be an integer from 1 to 65535"),
])
def test_bad_counts_are_usage_errors(args, message, wd, video):
    command, *rest = args
    source = ["--video", str(video), "--until", "frames", "--preset", "fast_cpu"] if command == "run" else \
        ["--root", str(wd), "--format", "omniobject3d"]
    before = snapshot(wd)
    result = run_cli(command, *source, "--workdir", str(wd), *rest)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and re.search(rf"^error: {message}", result.stderr), result.stderr
    assert snapshot(wd) == before


# ---------------------------------------------------------------- 8. --gt checked first

@pytest.mark.parametrize("case", ["file", "missing"])
def test_bad_gt_fails_before_any_stage(case, wd, tmp_path, video):
    gt = tmp_path / ("gt.json" if case == "file" else "no_gt")
    if case == "file":
        gt.write_text("{}")
    before = snapshot(wd)
    result = frames_run("--video", video, wd, "--gt", str(gt))
    assert result.returncode == 2, result.stderr
    what = "is a file, not a folder" if case == "file" else "no such folder"
    assert first_error(result.stderr) == f"error: --gt {gt}: {what}; give the ground-truth folder (gt.json, " \
        "gt_mesh.ply, ...)"
    assert "start" not in result.stderr and snapshot(wd) == before


# ---------------------------------------------------------------- 9. one message, one line

def test_one_line_escapes_control_characters():
    assert one_line("a\nFAILED b\r\x1b[2K\u2028c\td") == "a\\nFAILED b\\r\\x1b[2K\\u2028c\\td"
    assert one_line("plain é ü 日本") == "plain é ü 日本"
    record = logging.LogRecord("pipeline", logging.INFO, __file__, 1, "kept %s", ("v\nFAILED x",), None)
    assert OneLineFormatter("%(levelname)s %(message)s").format(record) == "INFO kept v\\nFAILED x"


def test_file_name_with_a_newline_cannot_fake_a_failed_line(tmp_path):
    bad = tmp_path / "a\nFAILED scene 'x'.mp4"
    bad.write_text("not a video\n" * 10)
    result = run_cli("run", "--video", str(bad), "--workdir", str(tmp_path / "wd"), "--until", "frames",
                     "--preset", "fast_cpu", "--no-progress")
    assert result.returncode == 1, result.stderr
    failed = [ln for ln in result.stderr.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 1, result.stderr
    assert failed[0].startswith("FAILED scene 'a_FAILED_scene_x', stage 'frames': ")
    assert "a\\nFAILED scene 'x'.mp4" in failed[0]
    assert not [ln for ln in result.stderr.splitlines() if "FAILED scene 'x'" in ln and "a\\n" not in ln]
    named = run_cli("run", "--video", str(bad), "--workdir", str(tmp_path / "wd"), "--scene", "s\nFAILED x",
                    "--until", "frames")
    assert named.returncode == 2 and named.stderr.startswith("error: scene name 's\\nFAILED x': ")
    assert named.stderr.count("\n") == 1


def test_log_lines_of_a_stage_escape_the_file_name(tmp_path):
    video = write_video(tmp_path / "clip.mp4", panning_frames())
    named = video.rename(tmp_path / "v\nFAILED scene 'x'.mp4")
    result = run_cli("run", "--video", str(named), "--workdir", str(tmp_path / "wd"), "--until", "frames",
                     "--preset", "fast_cpu", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert not [ln for ln in result.stderr.splitlines() if ln.startswith("FAILED")], result.stderr
    assert "of v\\nFAILED scene 'x'.mp4" in result.stderr
