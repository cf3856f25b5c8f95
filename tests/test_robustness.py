"""benchmarks/robustness.py: its measures on inputs whose answers are known (no pipeline run).

A tiny generated scene (flat background, 12 views 160x120) stands in for a pipeline run: its GT
cameras moved by a known similarity play the SfM cameras, its GT masks the pipeline's masks,
a sphere 1.5 times the GT one (moved alike) the bounds; the harness must see through the
similarity and report IoU 1, ratio 1.5, centre error 0.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

import robustness as rb  # benchmarks/ is on sys.path (conftest)


def _rotation(rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_mask_iou_identity_shift_and_scale():
    ref = np.zeros((40, 60), np.uint8)
    ref[10:30, 10:30] = 255
    assert rb.mask_iou(ref, ref) == 1.0
    shifted = np.roll(ref, 10, axis=1)  # overlap 20x10 of a 20x30 union
    assert rb.mask_iou(shifted, ref) == pytest.approx(10 / 30)
    assert rb.mask_iou(np.zeros_like(ref), ref) == 0.0
    half = cv2.resize(ref, (30, 20), interpolation=cv2.INTER_NEAREST)  # same mask at half resolution
    assert rb.mask_iou(half, ref, np.diag([2.0, 2.0, 1.0])) == pytest.approx(1.0, abs=0.02)
    # a crop by one pixel on each side (as undistortion does): the uncovered border is not counted
    crop = ref[1:-1, 1:-1]
    shift = np.array([[1.0, 0, 1], [0, 1, 1], [0, 0, 1]])
    assert rb.mask_iou(crop, ref, shift) == 1.0


def test_alignment_recovers_a_known_similarity_and_sphere_errors():
    rng = np.random.default_rng(1)
    gt = rng.normal(size=(20, 3)) * 2.0
    s, R, t = 0.37, _rotation(rng), np.array([3.0, -1.0, 0.5])
    est = ((gt - t) @ R) / s  # gt = s R est + t
    s2, R2, t2, rms = rb.align(est, gt)
    assert s2 == pytest.approx(s) and np.allclose(R2, R) and np.allclose(t2, t) and rms < 1e-9
    gt_c, gt_r = np.array([0.1, 0.2, 0.3]), 0.5
    est_c = R.T @ (gt_c - t) / s
    assert rb.sphere_errors(est_c, 2 * gt_r / s, (s, R, t), gt_c, gt_r) == pytest.approx((0.0, 2.0))
    off = R.T @ (gt_c + [0.25, 0, 0] - t) / s  # half a GT radius away
    err, ratio = rb.sphere_errors(off, gt_r / s, (s, R, t), gt_c, gt_r)
    assert err == pytest.approx(0.5) and ratio == pytest.approx(1.0)


def test_classify():
    ok = {"rc": 0, "iou_mean": 0.95, "radius_ratio": 1.2, "centre_err": 0.05}
    assert rb.classify(ok) == ("OK", [])
    assert rb.classify({**ok, "rc": 1, "first_error": "FAILED x"}) == ("FAIL", ["FAILED x"])
    assert rb.classify({**ok, "iou_mean": 0.5})[0] == "WRONG"
    assert rb.classify({**ok, "radius_ratio": 0.1})[0] == "WRONG"
    assert rb.classify({**ok, "radius_ratio": 2.5})[0] == "WRONG"
    assert rb.classify({**ok, "centre_err": 0.3})[0] == "WRONG"
    assert rb.classify({"rc": 0})[0] == "OK"  # nothing measured: no evidence against


def test_recipe_silhouette_closes_dark_gaps():
    img = np.zeros((120, 120, 3), np.uint8)
    cv2.circle(img, (60, 60), 40, (200, 180, 160), -1)
    img[58:62, 30:90] = 10  # a dark shadow line across the object
    sil = rb.recipe_silhouette(img)
    ref = np.zeros((120, 120), np.uint8)
    cv2.circle(ref, (60, 60), 40, 255, -1)
    assert sil[60, 60] and not sil[5, 5]  # the shadow is closed, the background stays out
    grown = np.zeros_like(ref)
    cv2.circle(grown, (60, 60), 43, 255, -1)  # dilate 10, erode 7: the silhouette grows by 3 px
    assert rb.mask_iou(sil.astype(np.uint8), grown) > 0.95


def test_shapes_are_closed_or_renderable():
    for name, make in rb.SHAPES.items():
        mesh = make()
        assert len(mesh.faces) > 100 and np.ptp(mesh.vertices, axis=0).min() > 0.1, name
    frame = rb.SHAPES["frame"]()
    assert frame.is_watertight and frame.euler_number == 0  # genus 1: a box with a hole


def _fake_run(folder: Path, run_dir: Path, s: float, R: np.ndarray, t: np.ndarray) -> None:
    """A run folder as the stages write it, from the GT: SfM world = GT world moved by inv(s, R, t);
    masks = GT masks; sphere = the GT sphere grown 1.5 times."""
    from pipeline.cameras import Cameras, load_transforms, save_transforms

    gt = load_transforms(folder / "gt" / "transforms.json")
    info = json.loads((folder / "gt" / "gt.json").read_text())
    keys = {st: "k" + st for st in ("frames", "sfm", "masks", "sfm_points")}
    dirs = {st: run_dir / f"{st}-{k}" for st, k in keys.items()}
    for d in dirs.values():
        d.mkdir(parents=True)
        (d / "manifest.json").write_text("{}")
    (run_dir / "plan.json").write_text(json.dumps({"keys": keys}))
    order = list(range(len(gt)))[::-1]  # SfM views in another order and with other names
    frames = [{"file": f"images/{k:06d}.jpg", "source_file": Path(gt.names[i]).name} for k, i in enumerate(order)]
    (dirs["frames"] / "frames.json").write_text(json.dumps({"width": gt.width, "height": gt.height, "frames": frames}))
    c2w = gt.c2w[order].copy()
    c2w[:, :3, :3] = R.T @ c2w[:, :3, :3]
    c2w[:, :3, 3] = (c2w[:, :3, 3] - t) @ R / s
    save_transforms(dirs["sfm"] / "transforms.json",
                    Cameras([f["file"] for f in frames], gt.K[order], c2w, gt.width, gt.height))
    (dirs["sfm"] / "sfm.json").write_text(json.dumps({"num_images": len(gt)}))
    (dirs["masks"] / "masks").mkdir()
    for k, i in enumerate(order):
        shutil.copy(folder / "gt" / "masks" / Path(gt.names[i]).name, dirs["masks"] / "masks" / f"{k:06d}.png")
    (dirs["masks"] / "masks.json").write_text(json.dumps({"method": "grabcut", "flagged": ["000001"], "frames": [
        {"name": f"{k:06d}", "coverage": 0.1} for k in range(len(gt))]}))
    centre = R.T @ (np.asarray(info["sphere_center"]) - t) / s
    (dirs["sfm_points"] / "scene.json").write_text(json.dumps(
        {"sphere_center": centre.tolist(), "sphere_radius": 1.5 * info["sphere_radius"] / s}))


def test_measures_see_through_the_sfm_frame(tmp_path):
    scene = rb.Scene("tiny", "torus", "plain", spec={"background": False, "background_color": (30, 30, 30)})
    folder = rb.generate_scene(scene, tmp_path / "data", 12, 160, 120)
    assert (folder / "images").is_dir() and len(list((folder / "gt" / "masks").glob("*.png"))) == 12
    assert rb.generate_scene(scene, tmp_path / "data", 12, 160, 120) == folder  # cached
    s, R, t = 0.2, _rotation(np.random.default_rng(5)), np.array([1.0, 2.0, -3.0])
    _fake_run(folder, tmp_path / "runs" / "tiny", s, R, t)
    dirs = rb.stage_dirs(tmp_path / "runs" / "tiny")
    assert set(dirs) == {"frames", "sfm", "masks", "sfm_points"}
    ref_mask, size, centres, gt_c, gt_r = rb.synthetic_reference(folder)
    masks = rb.measure_masks(dirs, ref_mask, size)
    assert masks["iou_mean"] == 1.0 and masks["iou_min"] == 1.0 and masks["iou_views"] == 12
    assert masks["method"] == "grabcut" and masks["flagged"] == 1
    sphere = rb.measure_sphere(dirs, centres, gt_c, gt_r)
    assert sphere["registered"] == 12 and sphere["cam_rms"] < 1e-6
    assert sphere["radius_ratio"] == pytest.approx(1.5) and sphere["centre_err"] == pytest.approx(0.0, abs=1e-6)
    row = {"name": "tiny", "rc": 0, "seconds": 1.0, "num_images": 12, **masks, **sphere}
    row["status"], row["why"] = rb.classify(row)
    assert row["status"] == "OK"
    line = "| tiny | OK | 0 | grabcut | 1.000 | 1.000 | 1/12 | 0.100 (0.100-0.100) | 0.00 | 1.50 | 12/12 |"
    assert line in rb.table([row])
    # a wrong mask set (every mask empty) and a sphere 10x too small: exit 0 but WRONG
    for p in (dirs["masks"] / "masks").glob("*.png"):
        cv2.imwrite(str(p), np.zeros((size[1], size[0]), np.uint8))
    bad = {**row, **rb.measure_masks(dirs, ref_mask, size), "radius_ratio": 0.1}
    assert bad["iou_mean"] == 0.0 and rb.classify(bad)[0] == "WRONG"
