"""``meshpipe --version``, ``config`` (the resolved config as YAML) and ``plan`` / ``run --dry-run``
(keys, states and what would run, with nothing run or written), from the checkout."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import ROOT, run_cli
from pipeline import dryrun
from pipeline.config import field_docs, load_config, load_preset
from pipeline.dag import STAGES
from pipeline.version import _pyproject_version


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under ``folder`` with its mtime and (for files) its bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


def _plan(video: Path, workdir: Path, *extra: str) -> dict:
    out = run_cli("plan", "--video", str(video), "--workdir", str(workdir), "--preset", "fast_cpu", "--json", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_version_is_the_pyproject_version():
    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"meshpipe {_pyproject_version(ROOT / 'pyproject.toml')}\n"
    assert "meshpipe" in run_cli("--help").stdout.splitlines()[0]


def test_config_prints_every_key_under_its_doc_and_reads_back(tmp_path):
    out = run_cli("config", "--preset", "fast_cpu", "--set", "train.iterations=7")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    at = lines.index("  iterations: 7")
    assert lines[at - 1].startswith(f"  # {field_docs('train')['iterations']}")
    assert "default: 4000" in lines[at - 1]
    keys, section = {}, None
    for above, line in zip(lines, lines[1:]):
        if not line.startswith(" "):
            section = line.removesuffix(":")
        elif not line.startswith("  #"):
            key = line.strip().partition(":")[0]
            assert above.startswith(f"  # {field_docs(section)[key]}"), line
            keys.setdefault(section, []).append(key)
    assert keys == {s: list(field_docs(s)) for s in STAGES}
    saved = tmp_path / "resolved.yaml"
    saved.write_text(out.stdout)
    assert load_preset(str(saved)) == load_config("fast_cpu", ["train.iterations=7"])


def test_config_with_a_bad_key_or_value_fails_like_run(tiny_video, tmp_path):
    for bad in ("train.iteratons=5", "train.iterations=0", "masks.method=magic"):
        config = run_cli("config", "--set", bad)
        run = run_cli("run", "--video", str(tiny_video), "--workdir", str(tmp_path / "wd"), "--set", bad)
        assert config.returncode == run.returncode == 2
        assert config.stdout == ""
        assert len(config.stderr.splitlines()) == 1 and config.stderr == run.stderr
        assert bad.partition("=")[0] in config.stderr and config.stderr.startswith("error: --set: ")
    assert "did you mean 'iterations'" in run_cli("config", "--set", "train.iteratons=5").stderr
    assert not (tmp_path / "wd").exists()


def test_plan_on_a_fresh_workdir_says_pending_and_writes_nothing(tiny_video, tmp_path):
    wd = tmp_path / "wd"
    plan = _plan(tiny_video, wd)
    assert [r["stage"] for r in plan["stages"]] == list(STAGES)
    assert all(r["state"] == "pending" and r["action"] == "run" for r in plan["stages"])
    assert plan["would_run"] == list(STAGES) and plan["scene"] == "clip"
    assert not wd.exists()
    wd.mkdir()
    text = run_cli("plan", "--video", str(tiny_video), "--workdir", str(wd), "--preset", "fast_cpu", "--until", "sfm")
    assert text.returncode == 0, text.stderr
    assert [line.split()[2] for line in text.stdout.splitlines()[2:4]] == ["pending", "pending"]
    assert "would run 2 of 2 stage(s): frames, sfm" in text.stdout
    assert list(wd.iterdir()) == []


def test_plan_on_a_half_done_workdir(tiny_video, tmp_path):
    wd = tmp_path / "wd"
    first = run_cli("run", "--video", str(tiny_video), "--workdir", str(wd), "--until", "frames",
                    "--preset", "fast_cpu", "--no-progress")
    assert first.returncode == 0, first.stderr
    (frames_dir,) = wd.glob("clip/frames-*")
    before = _snapshot(wd)
    plan = _plan(tiny_video, wd)
    rows = {r["stage"]: r for r in plan["stages"]}
    assert rows["frames"]["state"] == "done" and rows["frames"]["action"] == "cached"
    assert Path(rows["frames"]["dir"]) == frames_dir.resolve() and frames_dir.name == f"frames-{rows['frames']['key']}"
    assert all(rows[s]["state"] == "pending" and rows[s]["action"] == "run" for s in STAGES[1:])
    assert plan["would_run"] == list(STAGES[1:])
    dry = run_cli("run", "--dry-run", "--video", str(tiny_video), "--workdir", str(wd), "--preset", "fast_cpu")
    text = run_cli("plan", "--video", str(tiny_video), "--workdir", str(wd), "--preset", "fast_cpu")
    assert dry.returncode == 0 and dry.stdout == text.stdout
    assert f"frames       {rows['frames']['key']}  done     cached" in dry.stdout
    changed = _plan(tiny_video, wd, "--set", "frames.target_count=10")
    assert changed["stages"][0]["state"] == "pending" and changed["stages"][0]["key"] != rows["frames"]["key"]
    assert _snapshot(wd) == before  # nothing written: no plan.json, no stage folder, no lock
    (frames_dir / "manifest.json").unlink()
    frames_dir.rename(frames_dir.with_name(frames_dir.name + ".partial"))
    killed = _plan(tiny_video, wd, "--until", "sfm")
    assert [(r["state"], r["action"]) for r in killed["stages"]] == [("partial", "resume"), ("pending", "run")]


def test_plan_bad_input_is_one_line(tmp_path):
    out = run_cli("plan", "--video", str(tmp_path / "nope.mp4"), "--workdir", str(tmp_path / "wd"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "nope.mp4" in out.stderr


def test_what_would_run_follows_luigi_from_the_last_stage(tmp_path):
    keys = {"frames": "a" * 12, "sfm": "b" * 12, "masks": "c" * 12}
    (tmp_path / "s" / f"sfm-{keys['sfm']}").mkdir(parents=True)
    (tmp_path / "s" / f"sfm-{keys['sfm']}" / "manifest.json").write_text('{"files": {}}')
    (tmp_path / "s" / f"masks-{keys['masks']}.partial").mkdir()
    rows = dryrun.stage_states(tmp_path, {"scene": "s", "until": "masks", "keys": keys})
    assert [(r["stage"], r["state"], r["action"]) for r in rows] == [
        ("frames", "pending", "run"), ("sfm", "done", "cached"), ("masks", "partial", "resume")]
    rows = dryrun.stage_states(tmp_path, {"scene": "s", "until": "sfm", "keys": {s: keys[s] for s in ("frames", "sfm")}})
    assert [(r["state"], r["action"]) for r in rows] == [("pending", "not needed"), ("done", "cached")]


def test_masks_key_follows_the_model_found_on_disk(tmp_path, monkeypatch):
    """auto without a model makes GrabCut masks: installing (or replacing) the model must make new
    masks, and nothing upstream changes; grabcut and a model_path do not look at rembg's cache."""
    from pipeline import store
    from pipeline.dag import Source
    from stages.masks.rembg import model_file

    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "home"))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"not decoded by planning")
    source = Source("images", str(tmp_path / "photos"))

    def keys(*sets: str) -> dict:
        return store.make_plan("s", source, load_config("fast_cpu", list(sets)), "masks")["keys"]

    absent, grabcut = keys(), keys("masks.method=grabcut")
    model = model_file(load_config("fast_cpu").masks.model)
    model.parent.mkdir(parents=True)
    model.write_bytes(b"model one")
    installed = keys()
    model.write_bytes(b"model two")
    replaced = keys()
    assert len({absent["masks"], installed["masks"], replaced["masks"]}) == 3
    assert all(k["sfm"] == absent["sfm"] and k["frames"] == absent["frames"] for k in (installed, replaced))
    assert keys("masks.method=grabcut") == grabcut != absent
    custom = tmp_path / "custom.onnx"
    custom.write_bytes(b"custom")
    with_path = keys(f"masks.model_path={custom}")
    model.unlink()
    assert keys(f"masks.model_path={custom}") == with_path
