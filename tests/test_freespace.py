"""Object isolation with no SfM point on the object and no colour contrast (stages.masks.freespace).

A plain-coloured torus (no texture at all) on the generator's textured ground: the cameras give
the object's centre and scale, the free-space hull its shape, and GrabCut seeded from that hull
masks that match the ground truth. On a flat background nothing is seen behind the object: the
hull is refused with its reason and the masks stage says which seed it used.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest

import robustness as rb  # benchmarks/ is on sys.path (conftest)
from benchmarks.masks import gt_sfm_folder
from pipeline.cameras import framed_radius, load_transforms, look_at_point
from pipeline.config import MaskConfig
from pipeline.dag import Context
from stages import masks
from stages.masks import freespace, post

LOG = logging.getLogger("pipeline")


def _plain_torus(root: Path, **spec) -> Path:
    """24 views 240x180 of the plain torus; sfm/ from the GT cameras with SfM points only on the
    background (object_points=0), as COLMAP finds them on a textureless object."""
    from pipeline.synthetic import SceneSpec, generate

    mesh, _ = rb.write_mesh(rb.BY_NAME["torus_plain"], root / "mesh", root, 240, 180)
    res = generate(root / "scene", SceneSpec(num_views=24, width=240, height=180, output="images", seed=5,
                                             mesh_path=mesh, mesh_up_axis="z", **spec))
    gt_sfm_folder(res.gt_dir, root / "sfm", seed=5, object_points=0)
    return res.gt_dir


@pytest.fixture(scope="module")
def torus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("plain_torus")
    return {"root": root, "gt": _plain_torus(root), "sfm": root / "sfm"}


def _ious(mask_dir: Path, gt_dir: Path, stems) -> np.ndarray:
    return np.array([post.iou(post.mask_or_none(mask_dir / f"{s}.png"),
                              post.mask_or_none(gt_dir / "masks" / f"{s}.png")) for s in stems])


def test_cameras_alone_give_the_centre_and_scale(torus):
    """No point at all: the cameras' convergence point is the object's centre and the ball the
    views frame holds the object without being many times its size."""
    gt = json.loads((torus["gt"] / "gt.json").read_text())
    cams = load_transforms(torus["gt"] / "transforms.json")
    target = look_at_point(cams)
    radius = framed_radius(cams, target)
    assert np.linalg.norm(target - gt["sphere_center"]) < 0.1 * gt["sphere_radius"]
    assert 1.0 < radius / gt["sphere_radius"] < 4.0


def test_free_space_hull_of_a_textureless_object(torus):
    """The hull's silhouettes cover the object (a hull is never smaller than it, up to the stereo
    window) and hold little else."""
    cams = load_transforms(torus["sfm"] / "transforms.json")
    images = [masks.load_rgb(torus["sfm"] / n) for n in cams.names]
    hull, info = freespace.object_hull(lambda i: images[i], cams, np.zeros((0, 3)), LOG, threads=2)
    assert hull is not None, info
    assert info["plane"] == "stereo"  # no SfM points given: the ground plane from the depth maps
    stems = [Path(n).stem for n in cams.names]
    cover, ious = [], []
    for i, s in enumerate(stems):
        ref = post.mask_or_none(torus["gt"] / "masks" / f"{s}.png")
        sil = post.silhouette(hull, cams, i, ref.shape)
        cover.append((sil & ref).sum() / ref.sum())
        ious.append(post.iou(sil, ref))
    print(f"hull: IoU mean {np.mean(ious):.3f} min {np.min(ious):.3f}, cover min {np.min(cover):.3f}; {info}")
    assert np.min(cover) > 0.9 and np.mean(ious) > 0.6


def test_textureless_masks_come_out_right(torus):
    """The masks stage with no model (grabcut): seeded from the free-space hull, IoU >= 0.85
    against the ground truth (the SfM-point seed gave 0.08 on such a scene)."""
    out = torus["root"] / "masks"
    out.mkdir()
    ctx = Context(scene="t", progress=False, log=LOG)
    summary = masks.run({"sfm": torus["sfm"], "frames": torus["root"] / "frames"},
                        dataclasses.replace(MaskConfig(), method="grabcut"), out, ctx)
    stems = [p.stem for p in sorted((torus["sfm"] / "images").glob("*.png"))]
    ious = _ious(out / "masks", torus["gt"], stems)
    print(f"torus masks: IoU mean {ious.mean():.3f} min {ious.min():.3f}; {summary.get('freespace')}")
    assert summary["seed"] == "freespace" and summary["method"] == "grabcut"
    assert ious.mean() >= 0.85 and ious.min() >= 0.6


def test_flat_background_refuses_the_hull(tmp_path):
    """A flat background has no texture: nothing is seen behind the object, the hull is refused
    with the reason, and ``masks.seed=freespace`` fails in one line naming it."""
    gt = _plain_torus(tmp_path, background=False, background_color=(30, 30, 30))
    cams = load_transforms(tmp_path / "sfm" / "transforms.json")
    images = [masks.load_rgb(tmp_path / "sfm" / n) for n in cams.names]
    hull, info = freespace.object_hull(lambda i: images[i], cams, np.zeros((0, 3)), LOG)
    assert hull is None and "survived" in info["reason"], info
    with pytest.raises(Exception, match="no free-space hull") as err:
        masks.run({"sfm": tmp_path / "sfm", "frames": tmp_path / "frames"},
                  dataclasses.replace(MaskConfig(), method="grabcut", seed="freespace"), tmp_path / "out",
                  Context(scene="t", progress=False, log=LOG))
    assert "\n" not in str(err.value)
    assert gt.is_dir()
