"""Hostile inputs (issue 9): each ends in one clear line, a non-zero exit and an untouched workdir;
inputs that are merely unusual (mixed sizes, EXIF, a 12000x9000 photo, odd paths) pass the frames
stage. Also: safety of loaders and subprocesses, and the free-disk estimate.

Items covered by other files and counted in the tally, not repeated here:
empty, truncated and text-as-.mp4 videos through the CLI (test_cli.py::test_bad_input_names_the_file_and_keeps_the_workdir),
symlink loops of single files (test_frames.py::test_non_images_skipped_with_warning), NaN / singular
cameras of every importer (test_importers.py), per-view points without pickle (test_sfm_points.py),
checkpoints loaded with weights_only=True (test_train.py).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, panning_frames, run_cli, write_video
from pipeline import disk, store
from pipeline.cameras import Cameras, look_at, save_transforms
from pipeline.config import PipelineConfig, load_config
from pipeline.dag import Source
from pipeline.errors import InputError, PipelineError, StageError

BOOKKEEPING = ("plan.json", ".locks", ".errors")  # rewritten by every run, by design


def snapshot(wd: Path) -> dict[str, str]:
    """sha256 of every file in the workdir except the run bookkeeping."""
    return {p.relative_to(wd).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(wd.rglob("*")) if p.is_file() and not set(p.relative_to(wd).parts) & set(BOOKKEEPING)}


@pytest.fixture(scope="module")
def seed_wd(tmp_path_factory) -> Path:
    """A workdir whose scene 'clip' holds a finished frames stage."""
    root = tmp_path_factory.mktemp("seed")
    video = write_video(root / "clip.mp4", panning_frames())
    result = frames_run("--video", video, root / "wd")
    assert result.returncode == 0, result.stderr
    return root / "wd"


@pytest.fixture
def wd(tmp_path, seed_wd) -> Path:
    shutil.copytree(seed_wd, tmp_path / "wd")
    return tmp_path / "wd"


def frames_run(flag: str, path, workdir: Path, *extra: str):
    return run_cli("run", flag, str(path), "--workdir", str(workdir), "--until", "frames", "--scene", "clip",
                   "--preset", "fast_cpu", "--no-progress", *extra)


def first_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith(("FAILED", "error:"))]
    assert lines, stderr
    return lines[0]


# ---------------------------------------------------------------- inputs made in the test

def photos(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(panning_frames(n=n, w=160, h=120, seed=3)):
        Image.fromarray(img).save(folder / f"p{i}.jpg", quality=95)
    return folder


def neuralangelo(root: Path, edit=None) -> Path:
    """A 3-view Neuralangelo scene (images/, transforms.json); ``edit`` spoils its JSON data."""
    (root / "images").mkdir(parents=True)
    frames = []
    for i, img in enumerate(panning_frames(n=3, w=64, h=48)):
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        frames.append({"file_path": f"images/{i}.png",
                       "transform_matrix": (look_at(np.array([0.3 * i, 0.0, -3.0]), np.zeros(3),
                                                    np.array([0.0, -1.0, 0.0]))).tolist()})
    data = {"fl_x": 60.0, "fl_y": 60.0, "cx": 32.0, "cy": 24.0, "w": 64, "h": 48, "frames": frames}
    if edit:
        edit(data)
    (root / "transforms.json").write_text(json.dumps(data))
    return root


SPOIL = {"file_path_escapes_root": lambda d: d["frames"][1].update(file_path="../../secret.png"),
         "nan_camera": lambda d: d["frames"][2].update(transform_matrix=[[float("nan")] * 4] * 4),
         "singular_camera": lambda d: d["frames"][0].update(transform_matrix=[[0.0] * 4] * 3 + [[0, 0, 0, 1.0]])}


def case_inputs(case: str, tmp: Path) -> tuple[list[str], int, str]:
    """(CLI input arguments, exit code, regex of the first error line) of one hostile case."""
    if case == "one_frame_video":
        return ["--video", str(write_video(tmp / "one.mp4", panning_frames(n=1)))], 1, \
            r"stage 'frames': one\.mp4: fewer than 2 usable frames \(1 decoded\); film"
    if case == "all_black_video":
        video = write_video(tmp / "black.mp4", [np.zeros((120, 160, 3), np.uint8)] * 12)
        return ["--video", str(video)], 1, r"black\.mp4: no usable \(textured\) frames; all 12 decoded frames are blank"
    if case == "photo_folder_symlink_loop":
        folder = photos(tmp / "shots")
        (folder / "sub").mkdir()
        (folder / "sub" / "loop").symlink_to("..")
        return ["--images", str(folder)], 2, r"^error: .*shots/sub/loop: symbolic link loop inside .*shots$"
    if case == "file_path_escapes_root":
        Image.fromarray(panning_frames(n=1, w=64, h=48)[0]).save(tmp / "secret.png")
        return ["--dataset", str(neuralangelo(tmp / "data" / "scene", SPOIL[case])), "--format", "neuralangelo"], 1, \
            r"transforms\.json: file_path '\.\./\.\./secret\.png' points outside the dataset folder"
    if case in ("nan_camera", "singular_camera"):
        root = neuralangelo(tmp / "scene", SPOIL[case])
        return ["--dataset", str(root), "--format", "neuralangelo"], 1, \
            r"transforms\.json: (a camera matrix contains NaN|the camera matrix of frame 0 is singular)"
    if case == "dataset_json_invalid":
        root = neuralangelo(tmp / "scene")
        (root / "transforms.json").write_text('{"frames": [')
        return ["--dataset", str(root), "--format", "neuralangelo"], 1, r"scene/transforms\.json: not valid JSON"
    if case == "dataset_npz_is_text":
        root = tmp / "dtu"
        shutil.copytree(neuralangelo(tmp / "src") / "images", root / "image")
        (root / "cameras_sphere.npz").write_text("world_mat_0 = identity\n")
        return ["--dataset", str(root), "--format", "neus"], 1, r"cameras_sphere\.npz: not an \.npz archive"
    video = write_video(tmp / "clip.mp4", panning_frames())
    preset = tmp / "preset.yaml"
    if case == "preset_yaml_invalid":
        preset.write_text("base: fast_cpu\nframes: {target_count: [3\n")
        return ["--video", str(video), "--preset", str(preset)], 2, \
            r"^error: .*preset\.yaml: not valid YAML at line 3, column 1"
    assert case == "preset_not_text"
    preset.write_bytes(bytes(range(128, 256)) * 4)
    return ["--video", str(video), "--preset", str(preset)], 2, r"^error: .*preset\.yaml: not a UTF-8 text file"


CLI_CASES = ["one_frame_video", "all_black_video", "photo_folder_symlink_loop", "file_path_escapes_root",
             "nan_camera", "singular_camera", "dataset_json_invalid", "dataset_npz_is_text",
             "preset_yaml_invalid", "preset_not_text"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_hostile_input_fails_in_one_line_and_keeps_the_workdir(case, wd, tmp_path):
    args, code, pattern = case_inputs(case, tmp_path)
    before = snapshot(wd)
    result = run_cli("run", *args, "--workdir", str(wd), "--until", "frames", "--scene", "clip",
                     *([] if "--preset" in args else ["--preset", "fast_cpu"]), "--no-progress")
    assert result.returncode == code, result.stderr
    assert re.search(pattern, first_error(result.stderr)), result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(wd) == before  # no partial data, no new stage folder, the finished one untouched
    assert len(list(wd.glob("*/*/manifest.json"))) == 1


# ---------------------------------------------------------------- inputs that are fine


def test_mixed_sizes_and_exif_orientations_pass(tmp_path):
    from test_frames import texture, write_photo

    folder = tmp_path / "mixed"
    folder.mkdir()
    img = texture(6)[:160, :120].copy()  # stored 120 wide x 160 high, shown turned 90 deg clockwise
    img[:, :12] = (255, 0, 0)  # red on the stored left: on top once turned
    write_photo(folder / "a.jpg", texture(1)[:120, :160].copy())
    write_photo(folder / "b.jpg", img, orientation=6)
    write_photo(folder / "c.png", texture(3)[:240, :320].copy())
    write_photo(folder / "d.jpg", texture(4)[:120, :200].copy(), orientation=3)
    result = frames_run("--images", folder, tmp_path / "wd")
    assert result.returncode == 0, result.stderr
    (frames_dir,) = (tmp_path / "wd" / "clip").glob("frames-*")
    meta = json.loads((frames_dir / "frames.json").read_text())
    assert [f["source_file"] for f in meta["frames"]] == ["a.jpg", "b.jpg", "c.png", "d.jpg"]
    sizes = {Image.open(frames_dir / f["file"]).size for f in meta["frames"]}
    assert sizes == {(160, 120)}
    turned = np.asarray(Image.open(frames_dir / "images" / "000001.jpg"))
    assert turned[:8, :, 0].mean() > 200 and turned[:8, :, 1].mean() < 60


def test_huge_photo_is_downscaled_with_little_memory(tmp_path):
    folder = tmp_path / "huge"
    folder.mkdir()
    make = ("import sys, numpy as np; from PIL import Image; rng = np.random.default_rng(0); "
            "Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))"
            ".resize((12000, 9000), Image.NEAREST).save(sys.argv[1], quality=80)")
    subprocess.run([sys.executable, "-c", make, str(folder / "a.jpg")], check=True)  # not in this process
    shutil.copyfile(folder / "a.jpg", folder / "b.jpg")
    measure = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, "
               "text=True); print(json.dumps([r.returncode, r.stderr, "
               "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "run", "--images", str(folder), "--workdir",
           str(tmp_path / "wd"), "--until", "frames", "--preset", "fast_cpu", "--no-progress"]
    out = subprocess.run([sys.executable, "-c", measure, *cmd], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    rc, stderr, peak_kb = json.loads(out.stdout)
    assert rc == 0, stderr
    (frames_dir,) = (tmp_path / "wd" / "huge").glob("frames-*")
    assert Image.open(frames_dir / "images" / "000000.jpg").size == (640, 480)
    assert peak_kb < 200_000, f"peak {peak_kb / 1024:.0f} MB; one full 12000x9000 RGB decode is 309 MB"


def test_png_too_large_to_decode_is_skipped(tmp_path, caplog):
    """A 20000x20000 PNG header (a few hundred bytes) must not make PIL allocate 1.2 GB."""
    import struct
    import zlib

    from test_frames import run_stage

    folder = photos(tmp_path / "shots")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                                      chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    summary, _ = run_stage(tmp_path, "images", folder)
    assert summary["num_frames"] == 2
    assert "skipped bomb.png: 20000x20000 PNG is too large to decode in memory" in caplog.text


def test_paths_with_spaces_and_non_ascii(tmp_path):
    folder = tmp_path / "dir with spaces" / "日本 ü"
    folder.mkdir(parents=True)
    video = write_video(folder / "my vidéo ü.mp4", panning_frames())
    wd = tmp_path / "work dir é"
    result = run_cli("run", "--video", str(video), "--workdir", str(wd), "--until", "frames", "--preset",
                     "fast_cpu", "--no-progress")
    assert result.returncode == 0, result.stderr
    (frames_dir,) = (wd / "my_vidéo_ü").glob("frames-*")
    assert len(list((frames_dir / "images").glob("*.jpg"))) == 24 and store.is_done(frames_dir)


# ---------------------------------------------------------------- masks (through the stage runner)

def committed(wd: Path, stage: str, key: str, fill) -> None:
    partial = store.partial_dir(store.stage_dir(wd, "clip", stage, key))
    partial.mkdir(parents=True)
    fill(partial)
    store.write_manifest(partial, stage, key, {}, {}, 0.0)
    store.commit(partial, store.stage_dir(wd, "clip", stage, key))


def mask_workdir(wd: Path, value: int) -> dict:
    """Finished frames (with dataset masks all ``value``) and sfm folders; returns the plan."""
    n, w, h = 4, 64, 48
    views = panning_frames(n=n, w=w, h=h)
    names = [f"images/{i:06d}.png" for i in range(n)]

    def frames(folder: Path) -> None:
        (folder / "images").mkdir()
        (folder / "masks").mkdir()
        for name, img in zip(names, views):
            Image.fromarray(img).save(folder / name)
            Image.fromarray(np.full((h, w), value, np.uint8)).save(folder / "masks" / Path(name).name)

    def sfm(folder: Path) -> None:
        frames(folder)
        shutil.rmtree(folder / "masks")
        c2w = np.stack([look_at(np.array([np.cos(a), 0.2, np.sin(a)]) * 3, np.zeros(3), np.array([0, -1.0, 0]))
                        for a in np.linspace(0, 2, n)])
        K = np.tile(np.array([[60.0, 0, 32], [0, 60, 24], [0, 0, 1]]), (n, 1, 1))
        save_transforms(folder / "transforms.json", Cameras(names, K, c2w, w, h))

    keys = {"frames": "aaaaaaaaaaaa", "sfm": "bbbbbbbbbbbb", "masks": "cccccccccccc"}
    committed(wd, "frames", keys["frames"], frames)
    committed(wd, "sfm", keys["sfm"], sfm)
    return {"scene": "clip", "keys": keys, "config": PipelineConfig().to_dict(), "source": None}


@pytest.mark.parametrize("value,message", [(0, "all 4 masks are empty"),
                                           (255, "all 4 masks cover the whole image")])
def test_masks_all_empty_or_all_full(tmp_path, value, message):
    from tasks.execute import run_stage

    wd = tmp_path / "wd"
    plan = mask_workdir(wd, value)
    before = snapshot(wd)
    with pytest.raises(PipelineError) as err:
        run_stage(plan, "masks", wd, {"progress": False, "device": "cpu"})
    assert str(err.value).startswith(f"scene 'clip', stage 'masks': masks: {message} (the dataset's masks, in ")
    assert "masks.method=grabcut" in str(err.value) and "\n" not in str(err.value)
    assert snapshot(wd) == before and not list((wd / "clip").glob("masks-*"))


def test_computed_masks_that_separate_nothing_are_a_stage_error(tmp_path):
    from stages.masks import check_usable

    empty, full, good = np.zeros((48, 64), bool), np.ones((48, 64), bool), np.zeros((48, 64), bool)
    good[10:30, 20:40] = True
    with pytest.raises(StageError, match=r"of 3 masks, 1 are empty and 1 cover the whole image \(grabcut found"):
        check_usable([empty, full, good], "grabcut", tmp_path)
    check_usable([empty, good, good], "grabcut", tmp_path)  # one failed frame is only flagged


# ---------------------------------------------------------------- disk space

def test_disk_full_mid_stage_keeps_the_partial_and_resumes(wd, tmp_path):
    video = write_video(tmp_path / "clip.mp4", panning_frames(seed=5))
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "gt.json").write_text("{}")
    plan = store.make_plan("clip", Source("video", str(video), gt=str(gt)), load_config("fast_cpu"), "frames")
    partial = store.partial_dir(store.stage_dir(wd, "clip", "frames", plan["keys"]["frames"]))
    (partial / "gt").mkdir(parents=True)
    (partial / "gt" / "gt.json").symlink_to("/dev/full")  # copied after the frames: a real ENOSPC
    before = snapshot(wd)
    result = frames_run("--video", video, wd, "--gt", str(gt))
    assert result.returncode == 1, result.stderr
    line = first_error(result.stderr)
    assert line.startswith(f"FAILED scene 'clip', stage 'frames': frames: no space left on device while writing "
                           f"{partial / 'gt' / 'gt.json'} (")
    assert line.endswith(f"free); free some space and rerun: the finished part in {partial.name} is kept and "
                         "the stage resumes")
    assert "Traceback" not in result.stderr
    assert {k: v for k, v in snapshot(wd).items() if not k.startswith(f"clip/{partial.name}/")} == before
    assert len(list((partial / "images").glob("*.jpg"))) == 24  # kept for the resume
    assert not (partial / "manifest.json").exists() and not (partial / ".space_reserve").exists()
    (partial / "gt" / "gt.json").unlink()  # space is back
    assert frames_run("--video", video, wd, "--gt", str(gt)).returncode == 0
    final = store.stage_dir(wd, "clip", "frames", plan["keys"]["frames"])
    assert (final / "gt" / "gt.json").read_text() == "{}" and store.is_done(final) and not partial.exists()


def test_space_errors_are_recognised():
    import errno

    with pytest.raises(OSError) as full:
        with open("/dev/full", "wb") as f:
            f.write(b"x")
    assert disk.space_error_path(full.value) == ""  # a real ENOSPC from write(): no file name
    assert disk.space_error_path(OSError(errno.EDQUOT, "Disk quota exceeded", "/w/a.png")) == "/w/a.png"
    try:
        try:
            raise full.value
        except OSError as exc:
            raise RuntimeError("writing the model failed") from exc
    except RuntimeError as wrapped:
        assert disk.space_error_path(wrapped) == ""
    assert disk.space_error_path(OSError(errno.EACCES, "Permission denied", "/w/a.png")) is None
    assert disk.space_error_path(shutil.Error([("/a", "/w/b", "[Errno 13] Permission denied")])) is None


def job_file(tmp_path: Path, video: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    section = PipelineConfig().to_dict()["frames"]
    job = {"stage": "frames", "scene": "t", "out_dir": str(out), "inputs": {}, "section": section,
           "source": {"kind": "video", "path": str(video), "format": "", "gt": ""}, "progress": False}
    (out / ".job.json").write_text(json.dumps(job))
    return out / ".job.json"


def test_free_disk_estimate_refuses_to_start(tmp_path, monkeypatch):
    from stages.__main__ import main

    job = job_file(tmp_path, write_video(tmp_path / "clip.mp4", panning_frames()))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=1 << 40, used=0, free=50 << 20))
    assert main(str(job)) == 3
    err = json.loads((job.parent / ".error.json").read_text())
    count = PipelineConfig().frames.target_count  # frames kept x JPEG bytes at 1600 px
    need = int(count * 1600 * 1200 * 0.5 * disk.MARGIN) + disk.HEADROOM
    assert err["kind"] == "StageError" and err["message"] == (
        f"frames: needs ~{disk.human(need)} free in {tmp_path}, has 50.0 MB; free some space or use a --workdir "
        "on a larger disk")
    assert sorted(p.name for p in job.parent.iterdir()) == [".error.json", ".job.json"]  # nothing started


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -rm to mount a private tmpfs")
def test_free_disk_estimate_on_a_small_real_disk(tmp_path):
    video = write_video(tmp_path / "clip.mp4", panning_frames())
    mnt = tmp_path / "small"
    mnt.mkdir()
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "run", "--video", str(video), "--workdir",
           str(mnt / "wd"), "--until", "frames", "--preset", "fast_cpu", "--no-progress"]
    script = f"mount -t tmpfs -o size=2m tmpfs '{mnt}' && " + " ".join(f"'{c}'" for c in cmd) + \
        f"; rc=$?; ls -A '{mnt}/wd/clip' > '{tmp_path}/listing'; exit $rc"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert result.returncode == 1, result.stderr
    line = first_error(result.stderr)
    need = disk.human(int(40 * disk.frame_bytes(640) * disk.MARGIN) + disk.HEADROOM)  # fast_cpu: 40 frames
    assert line.startswith(f"FAILED scene 'clip', stage 'frames': frames: needs ~{need} free in "
                           f"{mnt / 'wd' / 'clip'}, has "), line
    assert line.endswith(" MB; free some space or use a --workdir on a larger disk")
    assert "manifest" not in (tmp_path / "listing").read_text()


def test_estimates_follow_the_config():
    from stages.train.hashgrid import GridSpec

    for preset in ("fast_cpu", "default", "neuralangelo"):
        t = load_config(preset).train
        rows = GridSpec(t.grid_levels, t.grid_features, t.grid_log2_table, t.grid_base_res, t.grid_max_res).sizes()
        assert disk.hashgrid_params(vars(t)) == pytest.approx(int(rows.sum()) * t.grid_features, rel=0.05, abs=3e5)
    train = {p: disk.estimate_bytes("train", vars(load_config(p).train), {}, None) for p in ("fast_cpu", "neuralangelo")}
    assert train["fast_cpu"] < 50 << 20 and train["neuralangelo"] > 10 << 30
    assert disk.estimate_bytes("mesh", {"resolution": 2048}, {}, None) == 1 << 30
    assert disk.human(1536 << 20) == "1.5 GB" and disk.human(999) == "999 B"


# ---------------------------------------------------------------- safety

def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            yield name, {k.arg: getattr(k.value, "value", None) for k in node.keywords}


def test_no_shell_pickle_or_unsafe_loads_in_the_code():
    bad = []
    files = [ROOT / "run_pipeline.py"] + sorted(f for p in ("pipeline", "stages", "tasks", "benchmarks")
                                                for f in (ROOT / p).rglob("*.py"))
    assert len(files) > 50
    for file in files:
        for name, kw in _calls(ast.parse(file.read_text())):
            where = f"{file.relative_to(ROOT)}: {name}"
            if kw.get("shell") is True or name in ("os.system", "os.popen", "pickle.load", "pickle.loads",
                                                   "yaml.load", "yaml.unsafe_load", "eval", "exec"):
                bad.append(where)
            if name == "torch.load" and kw.get("weights_only") is not True:
                bad.append(where + " without weights_only=True")
            if name == "np.load" and kw.get("allow_pickle") is True:
                bad.append(where + " with allow_pickle=True")
    assert bad == []


def test_luigid_binds_to_loopback_by_default():
    import inspect

    import run_pipeline
    from tasks import scheduler

    args = run_pipeline.parser().parse_args(["scheduler", "start", "--workdir", "x"])
    assert args.address == "127.0.0.1"
    assert inspect.signature(scheduler.start).parameters["address"].default == "127.0.0.1"


@pytest.mark.parametrize("rel", ["../../x.png", "/etc/passwd", "images/../../x.png", "images/../../data/x.png"])
def test_dataset_paths_stay_inside_the_root(tmp_path, rel):
    from stages.frames.importers.common import resolve_inside

    root = tmp_path / "data"
    with pytest.raises(InputError, match="points outside the dataset folder"):
        resolve_inside(root / "scene", root / "scene", rel, root / "scene" / "transforms.json")
    assert resolve_inside(root, root, "images/../images/a.png", root) == root / "images" / "a.png"
