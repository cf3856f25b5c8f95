"""Masks stage: rembg end to end with a tiny ONNX model, fast failure without a model, grabcut
IoU against ground truth on a synthetic scene, provided masks, post-processing, and resume
after a kill."""
from __future__ import annotations

import dataclasses
import json
import re
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import MaskConfig
from pipeline.dag import Context
from pipeline.errors import InputError, StageError
from stages import masks
from stages.masks import post as masks_post, rembg as masks_rembg

ROOT = Path(__file__).resolve().parents[1]


def _ctx() -> Context:
    return Context(scene="t", progress=False, log=logging.getLogger("pipeline"))


def _run(sfm: Path, out: Path, frames: Path | None = None, **cfg) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"sfm": sfm, "frames": frames if frames is not None else sfm.parent / "frames"}
    return masks.run(inputs, dataclasses.replace(MaskConfig(), **cfg), out, _ctx())


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------- tiny rembg model


def tiny_u2net(path: Path) -> Path:
    """A 1x1 conv + sigmoid with u2net's signature: bright pixels -> foreground."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((1, 3, 1, 1), 2.0, np.float32), "w")
    b = numpy_helper.from_array(np.zeros(1, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "w", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["1959"])],
        "tiny_u2net",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 320, 320])],
        [helper.make_tensor_value_info("1959", TensorProto.FLOAT, [1, 1, 320, 320])],
        initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def disk_images(folder: Path, n: int = 4, size: tuple[int, int] = (96, 128)) -> list[np.ndarray]:
    """Bright disks on a dark noisy background; returns the true masks."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    truth = []
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        m = (yy - h / 2 - 3 * i) ** 2 + (xx - w / 2 + 4 * i) ** 2 < (h / 4 + 2 * i) ** 2
        img = rng.integers(0, 40, (h, w, 3)).astype(np.uint8)
        img[m] = 230
        cv2.imwrite(str(folder / "images" / f"{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 98])
        truth.append(m)
    return truth


@pytest.fixture
def rembg_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "rembg_home"
    monkeypatch.setenv("U2NET_HOME", str(home))
    monkeypatch.delenv("REMBG_HOME", raising=False)
    return home


def test_rembg_custom_model_outside_home_end_to_end(tmp_path, rembg_home, caplog):
    sfm = tmp_path / "sfm"
    truth = disk_images(sfm)
    model = tiny_u2net(tmp_path / "elsewhere" / "tiny.onnx")
    caplog.set_level(logging.INFO, logger="pipeline")
    summary = _run(sfm, tmp_path / "out", method="rembg", model_path=str(model))
    assert summary["method"] == "rembg" and summary["computed"] == 4
    assert summary["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert "ONNX Runtime provider" in caplog.text
    for i, m in enumerate(truth):
        got = masks_post.mask_or_none(tmp_path / "out" / "masks" / f"{i:06d}.png", m.shape)
        assert masks_post.iou(got, m) > 0.95
    assert os.environ["U2NET_HOME"] == str(rembg_home)  # the private home was undone
    assert not rembg_home.exists()  # nothing written into the user's rembg home
    meta = _read_json(tmp_path / "out" / "masks.json")
    assert meta["method"] == "rembg" and len(meta["frames"]) == 4
    assert all(0.05 < f["coverage"] < 0.6 for f in meta["frames"])


def test_rembg_missing_model_fails_fast_offline(tmp_path, rembg_home, monkeypatch):
    import rembg  # noqa: F401  (import outside the timed part: slow the first time)

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens: the download fails at once
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    sfm = tmp_path / "sfm"
    disk_images(sfm, n=1)
    t0 = time.perf_counter()
    with pytest.raises(StageError) as err:
        _run(sfm, tmp_path / "out", method="rembg", model="isnet-general-use")
    elapsed = time.perf_counter() - t0
    msg = str(err.value)
    assert elapsed < 5.0, elapsed
    expected = rembg_home / "models" / "isnet-general-use" / "isnet-general-use.onnx"
    assert "isnet-general-use" in msg and str(expected) in msg
    assert "masks.method=grabcut" in msg and "masks.model_path" in msg
    assert not (rembg_home / "models" / "isnet-general-use").exists()  # empty folder cleaned up


def test_auto_method_choice(tmp_path, rembg_home, caplog):
    frames = tmp_path / "frames"
    frames.mkdir()
    cfg = MaskConfig()
    log = logging.getLogger("pipeline")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert masks.resolve_method(cfg, frames, log) == "grabcut"
    assert str(masks_rembg.model_file(cfg.model)) in caplog.text
    target = masks_rembg.model_file(cfg.model)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"onnx")
    assert masks.resolve_method(cfg, frames, log) == "rembg"
    (frames / "masks").mkdir()
    cv2.imwrite(str(frames / "masks" / "000000.png"), np.zeros((4, 4), np.uint8))
    assert masks.resolve_method(cfg, frames, log) == "provided"
    with pytest.raises(InputError, match="masks.method=grabcut"):
        masks.resolve_method(dataclasses.replace(cfg, method="provided"), tmp_path, log)


def test_rembg_is_imported_only_when_it_runs(tmp_path):
    """``import rembg`` is slow (numba): choosing a method and running grabcut never import it."""
    sfm = tmp_path / "sfm"
    disk_images(sfm, n=3)
    code = ("import sys, dataclasses, logging; from pathlib import Path; from pipeline.config import MaskConfig; "
            "from pipeline.dag import Context; from stages import masks; "
            f"masks.run({{'sfm': Path({str(sfm)!r}), 'frames': Path({str(tmp_path / 'frames')!r})}}, "
            "dataclasses.replace(MaskConfig(), grabcut_rounds=1), "
            f"Path({str(tmp_path / 'out')!r}), Context(scene='t', progress=False)); "
            "assert 'rembg' not in sys.modules and 'onnxruntime' not in sys.modules, 'rembg was imported'")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "U2NET_HOME": str(tmp_path / "empty_home")}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "using grabcut" in res.stderr  # auto fell back to grabcut with its warning
    assert _read_json(tmp_path / "out" / "masks.json")["method"] == "grabcut"


def test_method_none_writes_only_masks_json(tmp_path):
    summary = _run(tmp_path / "sfm", tmp_path / "out", method="none")
    assert summary["method"] == "none"
    assert _read_json(tmp_path / "out" / "masks.json")["method"] == "none"
    assert not (tmp_path / "out" / "masks").exists()


def test_post_processing():
    m = np.zeros((40, 40), bool)
    m[5:25, 5:25] = True
    m[10:14, 10:14] = False  # a small hole (4 % of the mask): a speckle, filled
    m[30:33, 30:33] = True  # a speck
    out = masks_post.clean_mask(m, keep_components=1, fill=True, dilate_px=0)
    assert out[12, 12] and not out[31, 31] and out.sum() == 400
    ring = np.zeros((40, 40), bool)
    ring[5:35, 5:35] = True
    ring[12:28, 12:28] = False  # the hole of a ring (40 % of the mask) stays open
    assert masks_post.clean_mask(ring, 1, True, 0).sum() == ring.sum()
    assert masks_post.clean_mask(m, 2, False, 0)[31, 31]
    assert masks_post.clean_mask(m, 1, True, 2).sum() > 400 + 4 * 20


# ---------------------------------------------------------------- synthetic scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict:
    """16 views 320x240 of Spot over the textured ground and dome, with a GT-built sfm/."""
    from benchmarks.masks import gt_sfm_folder
    from pipeline.synthetic import SceneSpec, generate

    root = tmp_path_factory.mktemp("masks_scene")
    res = generate(root / "scene", SceneSpec(num_views=16, width=320, height=240, output="images", seed=3))
    gt_sfm_folder(res.gt_dir, root / "sfm", seed=3, object_points=400)
    return {"root": root, "gt": res.gt_dir / "masks", "sfm": root / "sfm"}


@pytest.fixture(scope="module")
def grabcut_out(scene) -> Path:
    out = scene["root"] / "grabcut"
    _run(scene["sfm"], out, method="grabcut")
    return out


def _stems(sfm: Path) -> list[str]:
    return [p.stem for p in sorted((sfm / "images").glob("*.png"))]


def test_grabcut_reaches_iou_on_textured_background(scene, grabcut_out):
    ious = [masks_post.iou(masks_post.mask_or_none(grabcut_out / "masks" / f"{s}.png"),
                           masks_post.mask_or_none(scene["gt"] / f"{s}.png")) for s in _stems(scene["sfm"])]
    print(f"grabcut mean IoU {np.mean(ious):.4f} (min {np.min(ious):.4f}) over {len(ious)} views")
    assert np.mean(ious) >= 0.9
    meta = _read_json(grabcut_out / "masks.json")
    assert meta["method"] == "grabcut" and meta["computed"] == 16 and meta["seed_points"] > 50
    assert not (grabcut_out / masks.WORK_DIR).exists()


def test_provided_masks_equal_source(scene, tmp_path):
    frames = tmp_path / "frames"
    (frames / "masks").mkdir(parents=True)
    for p in scene["gt"].glob("*.png"):
        (frames / "masks" / p.name).write_bytes(p.read_bytes())
    summary = _run(scene["sfm"], tmp_path / "out", frames=frames, method="auto")
    assert summary["method"] == "provided" and summary["flagged"] == []
    for s in _stems(scene["sfm"]):
        got = cv2.imread(str(tmp_path / "out" / "masks" / f"{s}.png"), cv2.IMREAD_UNCHANGED)
        src = cv2.imread(str(scene["gt"] / f"{s}.png"), cv2.IMREAD_UNCHANGED)
        assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 255}
        np.testing.assert_array_equal(got, src)


def test_consistency_flags_a_wrong_mask(scene, tmp_path):
    """A mask shifted sideways lies outside the consensus of the others and is named."""
    frames = tmp_path / "frames"
    (frames / "masks").mkdir(parents=True)
    for p in scene["gt"].glob("*.png"):
        m = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if p.stem == "000005":
            m = np.roll(m, 40, axis=1)
        cv2.imwrite(str(frames / "masks" / p.name), m)
    summary = _run(scene["sfm"], tmp_path / "out", frames=frames, method="provided")
    assert summary["flagged"] == ["000005"]


def test_kill_and_rerun_recomputes_only_missing(scene, grabcut_out, tmp_path, monkeypatch):
    """Kill a grabcut run in a subprocess mid-way, rerun: only the frames without a saved mask
    are segmented again, and the result equals the uninterrupted run's."""
    import stages.masks.grabcut as masks_grabcut

    out = tmp_path / "out"
    out.mkdir()
    code = ("import dataclasses; from pathlib import Path; "
            "from pipeline.config import MaskConfig; from pipeline.dag import Context; from stages import masks; "
            f"masks.run({{'sfm': Path({str(scene['sfm'])!r}), 'frames': Path({str(tmp_path / 'frames')!r})}}, "
            "dataclasses.replace(MaskConfig(), method='grabcut'), "
            f"Path({str(out)!r}), Context(scene='t', progress=False))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pass0 = out / masks.WORK_DIR / "pass0"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(pass0.glob("*.png"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.stem for p in pass0.glob("*.png")}
    assert 3 <= len(done) < 16, f"kill came too late or too early: {len(done)} frames segmented"
    stems = _stems(scene["sfm"])
    calls: list[str] = []
    real = masks_grabcut._seed_mask

    def counting(i, *args, **kwargs):
        calls.append(stems[i])
        return real(i, *args, **kwargs)

    monkeypatch.setattr(masks_grabcut, "_seed_mask", counting)
    summary = _run(scene["sfm"], out, method="grabcut")
    assert sorted(calls) == sorted(set(stems) - done) and summary["computed"] == 16
    for s in stems:  # same result as the uninterrupted run
        np.testing.assert_array_equal(masks_post.mask_or_none(out / "masks" / f"{s}.png"),
                                      masks_post.mask_or_none(grabcut_out / "masks" / f"{s}.png"))
    # A deleted and a corrupt final mask are recomputed; the other 14 are reused untouched.
    before = {s: (out / "masks" / f"{s}.png").stat().st_mtime_ns for s in stems}
    (out / "masks" / "000002.png").unlink()
    (out / "masks" / "000007.png").write_bytes(b"not a png")
    calls.clear()
    summary = _run(scene["sfm"], out, method="grabcut")
    assert sorted(calls) == ["000002", "000007"]
    assert summary["reused"] == 14 and summary["computed"] == 2
    assert _read_json(out / "masks.json")["reused"] == 14
    assert all((out / "masks" / f"{s}.png").stat().st_mtime_ns == t for s, t in before.items()
               if s not in ("000002", "000007"))


def test_provided_mask_resampled_and_alpha(tmp_path):
    """An RGBA mask at twice the size becomes a 0/255 mask of the image size (alpha > 127)."""
    m = np.zeros((60, 80), bool)
    m[10:40, 20:70] = True
    big = cv2.resize(m.astype(np.uint8) * 255, (160, 120), interpolation=cv2.INTER_NEAREST)
    rgba = np.dstack([np.full((120, 160, 3), 77, np.uint8), big])
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    got = masks.load_provided(tmp_path / "a.png", (60, 80))
    assert got.shape == (60, 80) and masks_post.iou(got, m) > 0.97


def test_grabcut_seed_reaches_down_to_the_supporting_plane():
    """SfM finds points on the ground and on the top of an object only (a white body gives none
    lower down): the seed region spans down to the plane, so legs are not cut off."""
    import stages.masks.grabcut as masks_grabcut
    from train_inputs import orbit

    rng = np.random.default_rng(0)
    ground = np.c_[rng.uniform(-1.5, 1.5, (3000, 2)), np.zeros(3000)]
    top = np.c_[rng.uniform(-0.2, 0.2, (200, 2)), rng.uniform(0.45, 0.5, 200)]
    cams = orbit(24, 320, 240, 2.5, np.array([0.0, 0.0, 0.25]))
    obj, span = masks_grabcut.select_object_points(np.concatenate([ground, top]), cams)
    assert len(obj) >= 150 and obj[:, 2].min() > 0.4  # the ground is left out of the object points
    assert len(span) == 2 * len(obj) and abs(span[:, 2].min()) < 0.02  # ... but the seed reaches it
    tri = masks_grabcut.seed_trimap(obj, cams, 0, (240, 320), span)
    foot = cams.K[0] @ (np.linalg.inv(cams.c2w[0]) @ np.array([0.0, 0.0, 0.02, 1.0]))[:3]
    u, v = (foot[:2] / foot[2]).astype(int)
    assert tri[v, u] == masks_grabcut.GC_PR_FGD  # the object's foot is probable foreground
    assert masks_grabcut.seed_trimap(obj, cams, 0, (240, 320))[v, u] != masks_grabcut.GC_PR_FGD


def test_implausible_computed_masks_fail_or_fall_back_to_scene_mode(scene, tmp_path, monkeypatch):
    """Computed masks that disagree across the orbit (a box in a random place in each view) fail
    the stage in one line, or with masks.implausible=scene are set aside for a scene-mode run:
    never an object-mode run on masks that are wrong. The same masks given by the user are kept."""
    import stages.masks.grabcut as masks_grabcut

    rng = np.random.default_rng(1)
    boxes = {}
    for s in _stems(scene["sfm"]):
        m = np.zeros((240, 320), bool)
        y, x = rng.integers(0, 160), rng.integers(0, 240)
        m[y:y + 80, x:x + 80] = True
        boxes[s] = m

    def random_boxes(stems, load, shapes, cams, obj, cfg, work, final, finish, *args, **kwargs):
        for s in stems:
            finish(s, boxes[s], clean=False)
        return {}

    monkeypatch.setattr(masks_grabcut, "compute", random_boxes)
    with pytest.raises(StageError, match=r"masks: the grabcut masks are implausible \((no silhouette consensus|"
                                         r".* frames disagree).*masks.implausible=scene"):
        _run(scene["sfm"], tmp_path / "fail", method="grabcut")
    summary = _run(scene["sfm"], tmp_path / "out", method="grabcut", implausible="scene")
    meta = _read_json(tmp_path / "out" / "masks.json")
    assert summary["method"] == meta["method"] == "none"
    assert meta["fallback"]["from"] == "grabcut"
    assert re.search("no silhouette consensus|frames disagree", meta["fallback"]["reason"])
    assert not (tmp_path / "out" / "masks").exists()
    assert len(list((tmp_path / "out" / masks.REJECTED_DIR).glob("*.png"))) == len(boxes)
    frames = tmp_path / "frames"
    (frames / "masks").mkdir(parents=True)
    for s, m in boxes.items():
        cv2.imwrite(str(frames / "masks" / f"{s}.png"), m.astype(np.uint8) * 255)
    given = _run(scene["sfm"], tmp_path / "given", frames=frames, method="provided")
    assert given["method"] == "provided" and "fallback" not in _read_json(tmp_path / "given" / "masks.json")
    assert len(list((tmp_path / "given" / "masks").glob("*.png"))) == len(boxes)
