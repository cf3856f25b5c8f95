"""Kills and leftovers: temporary files of killed writes, a stage process that finished while its
parent died, ``gc``, and the fault-injection harness (benchmarks/faults.py) at CI size: SIGKILL
to the whole run inside sfm, inside train after a checkpoint, inside train after its last step,
and inside mesh after a block, then the same outputs as an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import panning_frames, run_cli
from pipeline import store
from pipeline.config import load_config
from pipeline.dag import Source
from pipeline.store import lock_file
from tasks.execute import run_stage

import faults  # noqa: E402


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "shots"
    folder.mkdir()
    for i, img in enumerate(panning_frames(n=4)):
        Image.fromarray(img).save(folder / f"{i}.jpg")
    return folder


def _frames_plan(photos: Path, *sets: str) -> dict:
    return store.make_plan("s", Source("images", str(photos)), load_config("fast_cpu", list(sets)), "frames")


def test_temp_files_of_killed_writes_are_removed_before_the_stage_resumes(photos, tmp_path):
    plan = _frames_plan(photos)
    final = store.stage_dir(tmp_path, "s", "frames", plan["keys"]["frames"])
    partial = store.partial_dir(final)
    (partial / "images").mkdir(parents=True)
    junk = [partial / ".frames.json.k3j2l1.tmp", partial / ".summary.json.x9y8.tmp",
            partial / "images" / ".000001.jpg.tmp", partial / "images" / "000001.jpg-luigi-tmp-1234"]
    for path in junk:
        path.write_bytes(b"half a write")
    run_stage(plan, "frames", tmp_path, {"progress": False})
    listed = store.load_manifest(final)["files"]
    assert sorted(listed) == ["config.json", "frames.json"] + [f"images/{i:06d}.jpg" for i in range(4)] + ["stage.log"]
    assert not [p for p in final.rglob("*") if "tmp" in p.name] and not partial.exists()


def test_stage_that_finished_before_its_parent_died_is_committed_not_rerun(photos, tmp_path, monkeypatch):
    """Killed after the stage process wrote ``.summary.json`` but before the manifest: the next
    run writes the manifest and renames; it does not start the stage again (it would fail)."""
    plan = _frames_plan(photos)
    run_stage(plan, "frames", tmp_path / "a", {"progress": False})
    done = store.stage_dir(tmp_path / "a", "s", "frames", plan["keys"]["frames"])
    final = store.stage_dir(tmp_path / "b", "s", "frames", plan["keys"]["frames"])
    partial = store.partial_dir(final)
    shutil.copytree(done, partial)
    summary = store.load_manifest(partial)["summary"]
    (partial / store.MANIFEST).unlink()
    (partial / "config.json").unlink()
    (partial / ".summary.json").write_text(json.dumps(summary))
    monkeypatch.setenv("PIPELINE_FAIL_STAGE", "frames")
    run_stage(plan, "frames", tmp_path / "b", {"progress": False})
    assert store.verify(final) == [] and store.load_manifest(final)["summary"] == summary
    assert store.load_manifest(final)["files"] == store.load_manifest(done)["files"]
    partial.mkdir()  # without a summary the stage really runs (and here fails as injected)
    shutil.rmtree(final)
    with pytest.raises(Exception, match="injected failure"):
        run_stage(plan, "frames", tmp_path / "b", {"progress": False})


def test_a_new_run_removes_temp_files_that_killed_runs_left_in_the_scene_folder(photos, tmp_path):
    plan = _frames_plan(photos)
    scene = store.scene_dir(tmp_path, "s")
    (scene / ".errors").mkdir(parents=True)
    old = [scene / ".plan.json.a1b2.tmp", scene / ".mesh.glb.c3d4.tmp", scene / ".errors" / ".sfm-x.json.e5.tmp"]
    young = scene / ".metrics.json.f6g7.tmp"  # maybe another run's write in flight: kept
    for path in [*old, young]:
        path.write_text("x")
    for path in old:
        os.utime(path, (time.time() - 120, time.time() - 120))
    store.save_plan(tmp_path, plan)
    assert [p for p in old if p.exists()] == [] and young.exists()


def test_gc_removes_old_temp_files_and_the_locks_of_removed_folders(photos, tmp_path):
    wd = tmp_path / "wd"
    for count in ("3", "4"):  # two keys; the second run's plan is the one kept
        plan = _frames_plan(photos, f"frames.target_count={count}")
        run_stage(plan, "frames", wd, {"progress": False})
    store.save_plan(wd, plan)
    old_key = _frames_plan(photos, "frames.target_count=3")["keys"]["frames"]
    scene = store.scene_dir(wd, "s")
    stale, fresh = scene / ".plan.json.abc123.tmp", scene / ".mesh.ply.def456.tmp"
    for path in (stale, fresh):
        path.write_text("x")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    result = run_cli("gc", "--workdir", str(wd))
    assert result.returncode == 0, result.stderr
    assert "gc: removed 1 folder(s), 1 temporary file(s)" in result.stdout
    assert not stale.exists() and fresh.exists()
    assert not lock_file(wd, "s", "frames", old_key).exists()
    assert lock_file(wd, "s", "frames", plan["keys"]["frames"]).exists()
    assert [p.name for p in scene.glob("frames-*")] == [f"frames-{plan['keys']['frames']}"]


def _checkpoint(step: int):
    return lambda partial: (partial / "checkpoints" / f"step_{step:08d}.pt").is_file()


CI_SETTINGS = faults.TINY + [f"--set={kv}" for kv in (
    "train.iterations=30", "train.checkpoint_every=10", "mesh.resolution=32", "mesh.block_res=16")]


def test_kills_in_sfm_train_and_mesh_end_with_the_uninterrupted_outputs(tmp_path, tmp_path_factory):
    setup = faults.make_scene(tmp_path_factory.getbasetemp() / "faults_scene")
    setup.until, setup.settings = "mesh", CI_SETTINGS
    log = tmp_path / "runs.log"
    ref = faults.reference_run(setup, tmp_path / "reference", log)
    assert ref["rc"] == 0, log.read_text()[-3000:]
    moments = [faults.Moment("sfm", 0.2, lambda p: (p / "_work" / "database.db").exists()),
               faults.Moment("train", 0.0, _checkpoint(10)),  # mid-training: resumes at step 10
               faults.Moment("train", 0.0, _checkpoint(30)),  # the last step is done: held-out views, model.pt
               faults.Moment("mesh", 0.0, lambda p: any((p / "blocks").glob("*.npz")))]
    result = faults.run_with_kills(setup, tmp_path / "killed", faults.scene_keys(tmp_path / "reference"),
                                   moments, log)
    text = log.read_text()
    assert [k["stage"] for k in result["kills"]] == ["sfm", "train", "train", "mesh"], result["kills"]
    assert all(k["survived"] for k in result["kills"]), result["kills"]
    assert result["final"]["rc"] == 0, text[-3000:]
    assert "train: resuming from step_00000010.pt" in text and "train: resuming from step_00000030.pt" in text
    assert result["final_problems"] == [] and result["final_leftovers"] == {"partial": 0, "tmp": 0, "luigi_tmp": 0}
    cmp = faults.compare(tmp_path / "reference", tmp_path / "killed")
    print("CI kills:", json.dumps(cmp))
    assert cmp["same_keys"] and cmp["differs"] == [] and cmp["missing"] == [] and cmp["extra"] == []
    assert not [f for f in cmp["run_records"] if f.endswith("model.pt")]  # the model is bitwise
    assert cmp["bitwise"] > 40 and cmp["mesh"][0] == cmp["mesh"][1] > 0


@pytest.mark.slow
def test_eight_random_kills_through_evaluate(tmp_path, tmp_path_factory):
    """The benchmark's own check at a smaller count: kills at random moments of every stage."""
    import random

    setup = faults.make_scene(tmp_path_factory.getbasetemp() / "faults_scene")
    log = tmp_path / "runs.log"
    ref = faults.reference_run(setup, tmp_path / "reference", log)
    assert ref["rc"] == 0, log.read_text()[-3000:]
    moments = faults.random_moments(8, ref["stage_seconds"], random.Random(1))
    result = faults.run_with_kills(setup, tmp_path / "killed", faults.scene_keys(tmp_path / "reference"),
                                   moments, log)
    result.update(reference=ref, total_wall_s=0.0, compare=faults.compare(tmp_path / "reference", tmp_path / "killed"))
    print(faults.report(result))
    assert faults.passed(result), faults.report(result)
