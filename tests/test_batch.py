"""``run_pipeline.py batch`` over tiny synthetic scenes in OmniObject3D's layouts: against a real
luigid with a worker killed mid-run and a rerun that redoes nothing finished; a broken scene that
fails alone; GPU slots (``--gpus 0,1``) that never run more than two GPU stages at once, each on its
own card (no CUDA needed: the stages fall back to the CPU but still hold a slot).

The tests share one dataset root and one workdir (module fixtures), so a later test reuses the
stage folders an earlier one finished; each also passes alone, computing what it needs.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli
from omni_fixtures import make_synthetic, write_blender_render, write_raw_scan, write_video_scene

from faults import stage_job  # noqa: E402  (the fault harness's /proc reader of stage jobs)

GOOD = ["toy_000", "toy_001", "toy_002", "toy_003"]
FAST = ["--preset", "fast_cpu", "--no-progress"]
TINY_TRAIN = [f"--set=train.{kv}" for kv in (
    "iterations=2", "batch_rays=64", "samples_per_ray=8", "ray_candidates=32", "occ_resolution=16",
    "grid_levels=4", "c2f_init_levels=2", "grid_log2_table=10", "grid_max_res=64", "sdf_hidden=16",
    "color_hidden=16", "color_layers=1", "feature_dim=8", "holdout_eval_views=0", "views_per_batch=2")]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """4 video scenes + 1 broken one, 3 blender renders, raw scans for the good ones."""
    base = tmp_path_factory.mktemp("omni_batch")
    root = base / "OmniObject3D"
    video = make_synthetic(base, 12, 160, 120)  # the textured backdrop gives SIFT enough to match
    render = make_synthetic(base, 24, 128, 96, noisy_texture=True, background=False, radius=1.5, fov_deg=35.0)
    for obj in GOOD:
        write_raw_scan(video, root, "toy", obj)
        write_video_scene(video, root, "toy", obj)
    for obj in GOOD[:3]:
        write_blender_render(render, root, "toy", obj)
    broken = write_video_scene(video, root, "toy", "broken_000", sparse=None)
    (broken / "poses_bounds.npy").write_bytes(b"\x93NUMPY garbage, not an array")
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("omni_wd")


def batch_args(root: Path, workdir: Path, split: str, *extra: str) -> list[str]:
    return ["batch", "--root", str(root), "--format", "omniobject3d", "--split", split,
            "--workdir", str(workdir), *FAST, *extra]


def manifests(workdir: Path) -> dict[str, int]:
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in workdir.glob("*/*/manifest.json")}


def summary_rows(workdir: Path) -> dict[str, dict]:
    with open(workdir / "batch_summary.csv", newline="") as f:
        return {row["scene"]: row for row in csv.DictReader(f)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- process tree (no psutil)

def children(pid: int) -> list[int]:
    out = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(x) for x in f.read_text().split()]
        except OSError:
            pass
    return out


def kill_worker_mid_stage(batch: subprocess.Popen, workdir: Path, stages: tuple[str, ...],
                          timeout: float = 240) -> dict:
    """SIGKILL the Luigi task process (a forked child of the batch command) that runs one of
    ``stages``, once some stage has finished, and its stage process with it (a dead worker)."""
    deadline = time.time() + timeout
    while time.time() < deadline and batch.poll() is None:
        if manifests(workdir):
            for worker in children(batch.pid):
                for proc in children(worker):
                    job = stage_job(proc)
                    if job and job["stage"] in stages:
                        for pid in (worker, proc):  # the worker first: it can no longer commit
                            try:
                                os.kill(pid, signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                        return job
        time.sleep(0.05)
    raise AssertionError("no worker was caught running a stage: the batch ended or stalled")


# ---------------------------------------------------------------- tests

def test_luigid_kill_worker_then_rerun_finishes_without_recompute(root, workdir, tmp_path):
    workdir = tmp_path / "wd" if manifests(workdir) else workdir  # another test went first: start afresh
    port = str(free_port())
    sched = tmp_path / "scheduler"
    started = run_cli("scheduler", "start", "--workdir", str(sched), "--port", port)
    assert started.returncode == 0, started.stderr
    luigid = ["--scheduler-host", "127.0.0.1", "--scheduler-port", port, "--workers", "2", "--until", "sfm_points"]
    batch = None
    try:
        args = batch_args(root, workdir, "video", *luigid)
        batch = subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), *args], cwd=ROOT,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killed = kill_worker_mid_stage(batch, workdir, ("sfm", "masks", "sfm_points"))
        _, err = batch.communicate(timeout=600)
        assert batch.returncode == 1, err
        killed_dir = Path(killed["out_dir"])  # <stage>-<key>.partial
        assert not (killed_dir.with_name(killed_dir.name.removesuffix(".partial")) / "manifest.json").exists()
        assert summary_rows(workdir)[killed["scene"]]["status"] == "incomplete"
        before = manifests(workdir)
        assert before

        again = run_cli(*args)
        rows = summary_rows(workdir)
        assert again.returncode == 1, again.stderr  # the broken scene still fails
        assert all(rows[s]["status"] == "done" for s in GOOD), rows
        after = manifests(workdir)
        assert {k: after.get(k) for k in before} == before  # nothing finished was recomputed
        assert len(after) == 4 * len(GOOD)  # frames, sfm, masks, sfm_points of every good scene
        broken = rows["broken_000"]
        assert broken["status"] == "failed" and broken["failed_stage"] == "frames"
        assert "poses_bounds.npy" in broken["reason"] and "cannot read" in broken["reason"]
        assert "FAILED scene 'broken_000', stage 'frames'" in again.stderr

        renders = run_cli(*batch_args(root, workdir / "blender", "blender", *luigid))
        assert renders.returncode == 0, renders.stderr
        assert [r["status"] for r in summary_rows(workdir / "blender").values()] == ["done"] * 3
    finally:
        if batch is not None and batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)
        stopped = run_cli("scheduler", "stop", "--workdir", str(sched))
    assert json.loads(stopped.stdout)["stopped"] is True


def test_imported_ground_truth_in_each_split(root, workdir):
    """The blender renders' cameras are in the scan frame (aligned), the videos' are not."""
    for split, folder, aligned in (("video", workdir, False), ("blender", workdir / "blender", True)):
        result = run_cli(*batch_args(root, folder, split, "--include", "toy_000", "--until", "frames"))
        assert result.returncode == 0, result.stderr
        (frames,) = (folder / "toy_000").glob("frames-*/")
        gt = json.loads((frames / "gt" / "gt.json").read_text())
        assert gt["aligned"] is aligned and (frames / "gt" / "gt_mesh.ply").is_file()


def test_gpu_slots_two_cards_four_scenes(root, workdir, tmp_path):
    trace = tmp_path / "trace.jsonl"
    result = run_cli(*batch_args(root, workdir, "video", "--include", "toy_*", "--until", "train", "--workers", "4",
                                 "--gpus", "0,1", "--device", "auto", *TINY_TRAIN),
                     env={"PIPELINE_TRACE_FILE": str(trace)})
    assert result.returncode == 0, result.stderr
    runs = [json.loads(line) for line in trace.read_text().splitlines()]
    train = [r for r in runs if r["stage"] == "train"]
    assert sorted(r["scene"] for r in train) == GOOD and all(r["rc"] == 0 for r in train)
    assert {r["cuda_visible_devices"] for r in train} <= {"0", "1"}
    events = sorted([(r["start"], 1, r) for r in train] + [(r["end"], -1, r) for r in train],
                    key=lambda e: (e[0], e[1]))
    running, peak = [], 0
    for _, step, r in events:
        if step > 0:
            assert r["cuda_visible_devices"] not in {o["cuda_visible_devices"] for o in running}, (r, running)
            running.append(r)
        else:
            running.remove(r)
        peak = max(peak, len(running))
    assert peak == 2  # two cards busy at once, never three
    for scene in GOOD:
        (train_dir,) = (workdir / scene).glob("train-*/")
        assert json.loads((train_dir / "train.json").read_text())["device"] == "cpu"
    assert np.all([r["end"] > r["start"] for r in train])
