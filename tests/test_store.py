"""Cache keys and the artifact store: what changes a key, what does not, atomic commits."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from pipeline import store
from pipeline.config import load_config
from pipeline.dag import Source
from tasks.execute import run_stage


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(bytes([i]) * 100)
    return folder


def _plan(source, cfg, until="frames"):
    return store.make_plan("s", source, cfg, until)


def test_key_changes_with_significant_parameter(photos):
    src = Source("images", str(photos))
    a = _plan(src, load_config("default"))
    b = _plan(src, load_config("default", ["frames.target_count=7"]))
    assert a["keys"]["frames"] != b["keys"]["frames"]
    assert len(a["keys"]["frames"]) == store.KEY_LEN


def test_downstream_keys_follow_upstream(photos):
    if "sfm" not in store.available_stages():
        pytest.skip("sfm stage not present")
    src = Source("images", str(photos))
    a = _plan(src, load_config("default"), "sfm")
    b = _plan(src, load_config("default", ["sfm.matcher=exhaustive"]), "sfm")
    c = _plan(src, load_config("default", ["frames.max_side=800"]), "sfm")
    assert a["keys"]["frames"] == b["keys"]["frames"] and a["keys"]["sfm"] != b["keys"]["sfm"]
    assert a["keys"]["frames"] != c["keys"]["frames"] and a["keys"]["sfm"] != c["keys"]["sfm"]


def test_key_ignores_path_and_mtime_but_not_content(photos, tmp_path):
    cfg = load_config("default")
    key = _plan(Source("images", str(photos)), cfg)["keys"]["frames"]
    moved = tmp_path / "elsewhere" / "other_name"
    shutil.copytree(photos, moved)
    assert _plan(Source("images", str(moved)), cfg)["keys"]["frames"] == key
    (moved / "1.jpg").write_bytes(b"changed")
    assert _plan(Source("images", str(moved)), cfg)["keys"]["frames"] != key


def test_operational_options_are_not_in_the_key(photos, tmp_path):
    """The key is fixed by the plan; device, progress, workers only travel in ``op``."""
    src = Source("images", str(photos))
    plan = _plan(src, load_config("default"))
    assert "device" not in json.dumps(plan["config"])
    from tasks.stages import task_for
    t1 = task_for("frames", str(tmp_path), plan, json.dumps({"device": "cpu", "progress": False}))
    t2 = task_for("frames", str(tmp_path), plan, json.dumps({"device": "cuda", "progress": True}))
    assert t1.task_id == t2.task_id


def test_unavailable_stage_is_refused(photos):
    from pipeline.errors import PipelineError
    missing = [s for s in store.STAGES if s not in store.available_stages()]
    if not missing:
        pytest.skip("every stage is present")
    with pytest.raises(PipelineError, match="not available"):
        _plan(Source("images", str(photos)), load_config("default"), missing[-1])


def test_manifest_and_commit(tmp_path):
    final = tmp_path / "s" / "frames-abc"
    partial = store.partial_dir(final)
    partial.mkdir(parents=True)
    (partial / "a.txt").write_text("hello")
    (partial / ".job.json").write_text("{}")
    assert not store.is_done(partial)
    store.write_manifest(partial, "frames", "abc", {"x": 1}, {"n": 1}, 1.0)
    store.commit(partial, final)
    manifest = store.load_manifest(final)
    assert set(manifest["files"]) == {"a.txt"}
    assert manifest["files"]["a.txt"]["size"] == 5
    assert not partial.exists() and not (final / ".job.json").exists()


def test_corrupt_manifest_is_not_done(tmp_path):
    (tmp_path / "manifest.json").write_text('{"files": ')
    assert not store.is_done(tmp_path)


def test_partial_with_manifest_is_committed_not_recomputed(tmp_path, photos):
    """A kill between writing the manifest and the rename: the next run just renames."""
    plan = _plan(Source("images", str(photos)), load_config("default"))
    final = store.stage_dir(tmp_path, "s", "frames", plan["keys"]["frames"])
    partial = store.partial_dir(final)
    partial.mkdir(parents=True)
    (partial / "marker").write_text("x")
    store.write_manifest(partial, "frames", plan["keys"]["frames"], plan["config"], {}, 0.0)
    run_stage(plan, "frames", tmp_path, {"progress": False})
    assert (final / "marker").read_text() == "x"


def test_model_path_is_keyed_by_content_not_path(photos, tmp_path):
    src = Source("images", str(photos))
    a, b = tmp_path / "a" / "m.onnx", tmp_path / "b" / "other.onnx"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"model-bytes")
    key = lambda p: store.key_section(load_config("default", [f"masks.model_path={p}"]), "masks")  # noqa: E731
    assert key(a) == key(b) and str(a) not in json.dumps(key(a))
    b.write_bytes(b"other-model")
    assert key(a) != key(b)
    from pipeline.errors import InputError
    with pytest.raises(InputError, match="missing.onnx"):
        key(tmp_path / "missing.onnx")
