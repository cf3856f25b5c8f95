"""Stage sfm_points on synthetic scenes with exact ground truth (GT cameras, masks and mesh).

The sfm/ input is built here from the ground truth (not by the sfm stage): GT cameras ->
transforms.json, and a pycolmap model whose points are sampled on the GT mesh (observed by the
views that face them and hold them inside the GT mask), plus points on the ground, far-away
outliers, short tracks and high-error points for the filters to remove.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cameras import load_transforms, look_at_point, project, save_transforms
from pipeline.config import SfmPointsConfig
from pipeline.dag import Context
from pipeline.errors import InputError, StageError
from stages import sfm_points
from stages.sfm_points import bounds

NUM_VIEWS, WIDTH, HEIGHT = 16, 96, 72


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from pipeline.synthetic import SceneSpec, generate

    out = tmp_path_factory.mktemp("syn")
    generate(out, SceneSpec(num_views=NUM_VIEWS, width=WIDTH, height=HEIGHT, output="images", supersample=1))
    return out


def load_gt(scene: Path):
    import trimesh

    cams = load_transforms(scene / "gt" / "transforms.json")
    mesh = trimesh.load(scene / "gt" / "gt_mesh.ply", process=False)
    masks = [np.asarray(_read_png(scene / "gt" / "masks" / f"{i:06d}.png")) > 127 for i in range(len(cams))]
    return cams, mesh, masks


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def _visible(cams, masks, xyz, normals=None):
    """(V, P) bool: point projects inside the image and the GT mask (and faces the camera)."""
    vis = np.zeros((len(cams), len(xyz)), bool)
    w2c = cams.w2c
    for v in range(len(cams)):
        uv, depth = project(xyz, cams.K[v], w2c[v])
        col, row = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
        ok = (depth > 0) & (col >= 0) & (col < cams.width) & (row >= 0) & (row < cams.height)
        inside = np.zeros(len(xyz), bool)
        inside[ok] = masks[v][row[ok], col[ok]]
        if normals is not None:
            inside &= np.einsum("ij,ij->i", normals, cams.centers[v] - xyz) > 0
            vis[v] = inside
        else:
            vis[v] = ok & ~inside
    return vis


def build_sfm(scene: Path, out: Path, seed: int = 0) -> dict:
    """sfm/ (transforms.json, images/, sparse/) from the GT; returns what was planted."""
    import pycolmap

    cams, mesh, masks = load_gt(scene)
    rng = np.random.default_rng(seed)
    surf, face = mesh.sample(400, return_index=True, seed=seed)
    normals = mesh.face_normals[face]
    ang = rng.uniform(0, 2 * np.pi, 300)
    rad = rng.uniform(0.6, 2.0, 300)
    ground = np.stack([rad * np.cos(ang), rad * np.sin(ang), np.zeros(300)], 1)
    vis = np.concatenate([_visible(cams, masks, surf, normals), _visible(cams, masks, ground)], 1)
    xyz = np.concatenate([surf, ground])
    errors = rng.uniform(0.1, 1.0, len(xyz))
    errors[rng.choice(400, 40, replace=False)] = 5.0  # object points with a large error
    (out / "sparse").mkdir(parents=True)
    shutil.copytree(scene / "gt" / "images", out / "images")
    save_transforms(out / "transforms.json", cams)
    rec = pycolmap.Reconstruction()
    K = cams.K[0]
    camera = pycolmap.Camera.create_from_model_name(1, "PINHOLE", K[0, 0], cams.width, cams.height)
    rec.add_camera_with_trivial_rig(camera)
    rec.cameras[1].params = [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
    w2c = cams.w2c
    obs_idx = {}
    for v in range(len(cams)):
        idx = np.flatnonzero(vis[v])
        uv, _ = project(xyz[idx], K, w2c[v])
        img = pycolmap.Image(name=Path(cams.names[v]).name, keypoints=uv, camera_id=1, image_id=v + 1)
        rec.add_image_with_trivial_frame(img, pycolmap.Rigid3d(w2c[v][:3, :4]))
        obs_idx[v] = {int(p): k for k, p in enumerate(idx)}
    planted = {"object": [], "ground": [], "short": []}
    for p in range(len(xyz)):
        views = np.flatnonzero(vis[:, p])
        if len(views) < 2:
            continue
        track = pycolmap.Track()
        for v in views:
            track.add_element(int(v) + 1, obs_idx[int(v)][p])
        pid = rec.add_point3D(xyz[p], track)
        rec.point3D(pid).error = float(errors[p])
        kind = "short" if len(views) < 3 else ("object" if p < 400 else "ground")
        planted[kind].append((p, float(errors[p])))
    rec.write(str(out / "sparse"))
    return planted


def make_inputs(scene: Path, tmp: Path, with_masks: bool = True) -> dict[str, Path]:
    sfm = tmp / "sfm"
    if not sfm.exists():
        build_sfm(scene, sfm)
    masks = tmp / ("masks" if with_masks else "masks_none")
    masks.mkdir(exist_ok=True)
    if with_masks and not (masks / "masks").exists():
        shutil.copytree(scene / "gt" / "masks", masks / "masks")
    return {"sfm": sfm, "masks": masks}


def run_stage(inputs: dict[str, Path], out: Path, **cfg) -> dict:
    out.mkdir(parents=True)
    return sfm_points.run(inputs, SfmPointsConfig(**cfg), out, Context(scene="test", progress=False))


@pytest.fixture(scope="module")
def gt(scene):
    cams, mesh, masks = load_gt(scene)
    center, radius = bounds.min_enclosing_ball(np.asarray(mesh.vertices))
    return cams, mesh, masks, radius


@pytest.fixture(scope="module")
def masked_run(scene, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sfmp")
    inputs = make_inputs(scene, tmp, with_masks=True)
    out = tmp / "out"
    return inputs, out, run_stage(inputs, out, export_legacy=True)


def assert_sphere_bounds_object(summary: dict, gt, max_ratio: float) -> float:
    cams, mesh, _, ref_radius = gt
    center, radius = np.array(summary["sphere_center"]), summary["sphere_radius"]
    assert np.linalg.norm(mesh.vertices - center, axis=1).max() <= radius  # contains the object
    assert np.linalg.norm(cams.centers - center, axis=1).min() > radius  # no camera inside
    assert radius <= max_ratio * ref_radius, (radius, ref_radius)
    return radius / ref_radius


def test_min_enclosing_ball_matches_a_scipy_reference():
    from scipy.optimize import minimize

    rng = np.random.default_rng(3)
    pts = rng.normal(size=(2000, 3)) * [1.0, 0.4, 0.2] + [3.0, -1.0, 0.5]
    center, radius = bounds.min_enclosing_ball(pts)
    assert np.linalg.norm(pts - center, axis=1).max() == pytest.approx(radius)
    ref = minimize(lambda x: x[3], np.r_[pts.mean(0), 10.0], method="SLSQP", options={"maxiter": 500},
                   constraints=[{"type": "ineq", "fun": lambda x: x[3] ** 2 - ((pts - x[:3]) ** 2).sum(1)}])
    assert radius == pytest.approx(ref.x[3], rel=1e-3)
    on_sphere = rng.normal(size=(500, 3))
    on_sphere /= np.linalg.norm(on_sphere, axis=1, keepdims=True)
    assert bounds.min_enclosing_ball(on_sphere * 2.0 + 1.0)[1] == pytest.approx(2.0, rel=1e-2)


def test_sphere_from_masks_contains_object_and_is_tight(masked_run, gt):
    _, out, summary = masked_run
    ratio = assert_sphere_bounds_object(summary, gt, max_ratio=1.3)
    assert ratio >= 1.0
    assert summary["bounds"]["method"] == "carving+points"
    scene_json = json.loads((out / "scene.json").read_text())
    w2u, u2w = np.array(scene_json["world_to_unit"]), np.array(scene_json["unit_to_world"])
    np.testing.assert_allclose(w2u @ u2w, np.eye(4), atol=1e-12)
    center = np.array(scene_json["sphere_center"])
    on_sphere = u2w @ np.array([1.0, 0.0, 0.0, 1.0])
    assert np.linalg.norm(on_sphere[:3] - center) == pytest.approx(scene_json["sphere_radius"])


def test_sphere_without_masks_contains_object(scene, gt, tmp_path):
    """No masks: looser bound, radius within 3.5x the object's smallest enclosing ball."""
    summary = run_stage(make_inputs(scene, tmp_path, with_masks=False), tmp_path / "out")
    assert_sphere_bounds_object(summary, gt, max_ratio=3.5)
    assert summary["masks"] is False and "points_after_mask" not in summary["counts"]


def test_per_view_points_project_inside_image_and_mask(masked_run, gt):
    _, out, summary = masked_run
    cams, _, masks, _ = gt
    points = np.load(out / "points.npy")
    offsets, indices = np.load(out / "view_offsets.npy"), np.load(out / "view_indices.npy")
    assert points.dtype == np.float32 and points.shape[1] == 3
    assert offsets.dtype == np.int64 and indices.dtype == np.int64 and offsets.shape == (len(cams) + 1,)
    assert offsets[0] == 0 and offsets[-1] == len(indices) and np.all(np.diff(offsets) >= 0)
    assert set(np.unique(indices)) == set(range(len(points)))  # every point is seen by some view
    w2c = cams.w2c
    for v in range(len(cams)):
        idx = indices[offsets[v]:offsets[v + 1]]
        assert len(idx) > 20
        uv, depth = project(points[idx].astype(np.float64), cams.K[v], w2c[v])
        col, row = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
        assert np.all((depth > 0) & (col >= 0) & (col < cams.width) & (row >= 0) & (row < cams.height))
        assert np.all(masks[v][row, col])
    center, radius = np.array(summary["sphere_center"]), summary["sphere_radius"]
    assert np.all(np.linalg.norm(points - center, axis=1) < radius)


def test_filters_drop_ground_short_tracks_and_large_errors(masked_run, gt):
    inputs, out, summary = masked_run
    _, mesh, _, _ = gt
    points = np.load(out / "points.npy").astype(np.float64)
    planted = build_sfm_counts(inputs["sfm"])
    counts = summary["counts"]
    assert counts["points_total"] == planted["total"]
    assert counts["points_after_track_length"] == planted["total"] - planted["short"]
    assert counts["points_after_reprojection_error"] == counts["points_after_track_length"] - planted["large_error"]
    assert counts["points_after_sphere"] == len(points) == planted["object_kept"]
    assert np.abs(points[:, 2]).min() > 1e-6  # no ground point (z = 0) survives the masks
    assert json.loads((out / "sfm_points.json").read_text())["counts"] == counts
    loose = run_stage(inputs, out.parent / "loose", max_error_px=10.0, min_track_length=2)
    assert loose["counts"]["points_after_track_length"] == planted["total"]
    assert loose["num_points"] > summary["num_points"]


def build_sfm_counts(sfm: Path) -> dict:
    """What the planted model holds, read back with pycolmap (object points have z > 0)."""
    import pycolmap

    rec = pycolmap.Reconstruction(str(sfm / "sparse"))
    pts = list(rec.points3D.values())
    short = [p for p in pts if p.track.length() < 3]
    large = [p for p in pts if p.track.length() >= 3 and p.error > 2.0]
    kept = [p for p in pts if p.track.length() >= 3 and p.error <= 2.0 and p.xyz[2] > 1e-9]
    return {"total": len(pts), "short": len(short), "large_error": len(large), "object_kept": len(kept)}


def test_transforms_copy_keeps_frames_and_adds_sphere(masked_run):
    inputs, out, summary = masked_run
    src, got = load_transforms(inputs["sfm"] / "transforms.json"), load_transforms(out / "transforms.json")
    assert [(out / n).resolve() for n in got.names] == [(inputs["sfm"] / n).resolve() for n in src.names]
    frames = json.loads((out / "transforms.json").read_text())["frames"]  # paths relative to this folder
    assert [(out / f["mask_path"]).resolve() for f in frames] == \
        [(inputs["masks"] / "masks" / f"{Path(n).stem}.png").resolve() for n in src.names]
    np.testing.assert_allclose(got.c2w, src.c2w, atol=1e-12)
    np.testing.assert_allclose(got.extra["sphere_center"], summary["sphere_center"])
    assert got.extra["sphere_radius"] == pytest.approx(summary["sphere_radius"])
    aabb = np.array(got.extra["aabb_range"])
    np.testing.assert_allclose(aabb[:, 1] - aabb[:, 0], 2 * summary["sphere_radius"])


def test_legacy_export_matches_csr(masked_run):
    _, out, _ = masked_run
    offsets, indices = np.load(out / "view_offsets.npy"), np.load(out / "view_indices.npy")
    view_id = np.load(out / "view_id.npy", allow_pickle=True)
    assert view_id.dtype == object and len(view_id) == len(offsets) - 1
    for v, ids in enumerate(view_id):
        np.testing.assert_array_equal(ids, indices[offsets[v]:offsets[v + 1]])
    unit = np.load(out / "points_legacy.npy")
    assert unit.shape == np.load(out / "points.npy").shape and np.linalg.norm(unit, axis=1).max() < 1.0
    with pytest.raises(ValueError):  # the main outputs never need pickle
        np.load(out / "view_id.npy", allow_pickle=False)


def test_empty_masks_fail_with_a_message(scene, tmp_path):
    inputs = make_inputs(scene, tmp_path, with_masks=True)
    for path in (inputs["masks"] / "masks").glob("*.png"):
        from PIL import Image

        Image.fromarray(np.zeros((HEIGHT, WIDTH), np.uint8)).save(path)
    with pytest.raises(StageError, match="bounds.*masks"):
        run_stage(inputs, tmp_path / "out")


def test_mask_of_wrong_size_names_the_file(scene, tmp_path):
    from PIL import Image

    inputs = make_inputs(scene, tmp_path, with_masks=True)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(inputs["masks"] / "masks" / "000002.png")
    with pytest.raises(InputError, match=r"000002\.png: mask is 10x10"):
        run_stage(inputs, tmp_path / "out")


@pytest.mark.parametrize("corrupt", [False, True])
def test_visual_hull_covers_the_object(gt, corrupt):
    """Every GT vertex lies in a kept voxel (within its half-diagonal of a voxel centre), also
    when one mask of 16 lost half the object (outvoted: "nearly all views")."""
    from scipy.spatial import cKDTree

    cams, mesh, masks, _ = gt
    masks = [m.copy() for m in masks]
    if corrupt:
        masks[5][:, : WIDTH // 2] = False
    voxels, size = bounds.visual_hull(cams, lambda i: masks[i], 48)
    dist, _ = cKDTree(voxels).query(np.asarray(mesh.vertices))
    assert dist.max() <= 0.5 * np.sqrt(3.0) * size
    assert len(voxels) * size ** 3 < 3.0 * mesh.volume  # a hull, not the whole box


def test_centre_and_scale_from_the_cameras_alone():
    """An orbit gives the object's centre (where the optical axes meet) and a scale (the ball
    the views frame) with no SfM point at all; spheres 100x too small, 3x too large or behind
    the cameras are refused, the object's own sphere is not."""
    from pipeline.synthetic import SceneSpec, orbit_cameras

    target = np.array([0.3, -0.2, 0.4])
    spec = SceneSpec(num_views=24, width=160, height=120, radius=3.0)
    cams = orbit_cameras(spec, target)
    np.testing.assert_allclose(look_at_point(cams), target, atol=1e-9)
    tan_x = np.tan(np.radians(spec.fov_deg) / 2)
    expected = 3.0 * np.sin(np.arctan(np.hypot(tan_x, tan_x * 120 / 160)))
    assert bounds.framed_radius(cams, target) == pytest.approx(expected, rel=1e-9)
    assert bounds.implausible(bounds.Sphere(target, 0.5 * expected), cams) is None
    assert "radius" in bounds.implausible(bounds.Sphere(target, expected / 100), cams)
    assert "radius" in bounds.implausible(bounds.Sphere(target, 3 * expected), cams)
    behind = cams.centers[0] + 2.0 * (cams.centers[0] - target)
    assert "in view in only" in bounds.implausible(bounds.Sphere(behind, 0.5 * expected), cams)


def test_masks_that_bound_a_sliver_fail_the_stage_in_one_line(scene, tmp_path):
    """Masks covering a few pixels in every view carve a sphere far smaller than anything the
    cameras frame: the stage refuses it and says what to do, instead of training on it."""
    from PIL import Image

    inputs = make_inputs(scene, tmp_path, with_masks=True)
    for path in (inputs["masks"] / "masks").glob("*.png"):
        tiny = np.zeros((HEIGHT, WIDTH), np.uint8)
        tiny[HEIGHT // 2, WIDTH // 2] = 255
        Image.fromarray(tiny).save(path)
    with pytest.raises(StageError, match=r"implausible bounds .*radius .* x the radius .*masks.method=none"):
        run_stage(inputs, tmp_path / "out", mask_vote=1.0)


def _sphere_masks(cams, centre: np.ndarray, radius: float) -> list[np.ndarray]:
    """Exact silhouettes of a ball: pixels whose ray (through the pixel centre) meets it."""
    cols, rows = np.meshgrid(np.arange(cams.width) + 0.5, np.arange(cams.height) + 0.5)
    masks = []
    for v in range(len(cams)):
        rays = np.stack([(cols - cams.K[v, 0, 2]) / cams.K[v, 0, 0], (rows - cams.K[v, 1, 2]) / cams.K[v, 1, 1],
                         np.ones_like(cols)], -1) @ cams.c2w[v, :3, :3].T
        rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
        to_c = centre - cams.centers[v]
        along = rays @ to_c
        masks.append((along > 0) & (to_c @ to_c - along ** 2 <= radius ** 2))
    return masks


@pytest.mark.parametrize("ball_radius", [0.2, 0.3])
def test_visual_hull_carves_what_projects_off_a_frame_that_holds_the_whole_object(ball_radius, monkeypatch):
    """A ball seen by a ring of 8 views whose frames hold it with little room to spare: the space
    beside it towards each camera is inside the silhouette in the views that see it and off the
    frame of those that would carve it away. A mask clear of the border shows the whole object,
    so off its frame counts as outside and the hull is the ball. A larger ball is cut by every
    frame: the masks reach the border and nothing is carved off frame (the same hull as with
    off-frame carving disabled, covering the part of the ball that most views frame)."""
    from scipy.spatial import cKDTree

    from pipeline.synthetic import SceneSpec, orbit_cameras

    # half the frame spans 0.24 at the centre's distance: 0.04 clear of the smaller ball's outline
    spec = SceneSpec(num_views=8, width=200, height=200, radius=3.0, elevation_deg=0.0, elevation_wobble_deg=0.0,
                     fov_deg=2.0 * np.degrees(np.arctan(0.24 / 3.0)))
    centre = np.array([0.0, 0.0, 1.0])
    cams = orbit_cameras(spec, centre)
    masks = _sphere_masks(cams, centre, ball_radius)
    clear = ball_radius < 0.24
    assert [bounds._reaches_border(m) for m in masks] == [not clear] * len(cams)
    voxels, size = bounds.visual_hull(cams, lambda i: masks[i], 48)
    dist = np.linalg.norm(voxels - centre, axis=1)
    pad = 0.5 * np.sqrt(3.0) * size
    top = 1.5 if clear else 0.6  # the larger ball's poles are off every frame: unseen, not kept
    surface = np.array([[np.cos(a) * np.cos(e), np.sin(a) * np.cos(e), np.sin(e)]
                        for a in np.linspace(0, 2 * np.pi, 48, endpoint=False)
                        for e in np.linspace(-top, top, 13)]) * ball_radius + centre
    assert cKDTree(voxels).query(surface)[0].max() <= pad  # covers the ball
    monkeypatch.setattr(bounds, "_reaches_border", lambda mask: True)  # no off-frame carving
    unseen, _ = bounds.visual_hull(cams, lambda i: masks[i], 48)
    if clear:  # left uncarved off frame, the ghosts reach 2.3 x the ball's radius
        assert np.linalg.norm(unseen - centre, axis=1).max() > 2.0 * ball_radius
        assert dist.max() <= 1.15 * ball_radius, (dist.max(), ball_radius, size)
        assert abs(bounds.min_enclosing_ball(voxels)[1] - ball_radius) <= 0.15 * ball_radius
    else:
        np.testing.assert_array_equal(voxels, unseen)
