"""Evaluate stage: metric functions on known geometry, silhouette IoU on a synthetic scene, and
the stage end to end on hand-built upstream folders (GT mesh perturbed as the reconstruction,
GT cameras as SfM in an arbitrary similarity frame, GT masks as masks)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from pipeline.cameras import Cameras, load_transforms, save_transforms
from pipeline.config import EvaluateConfig
from pipeline.dag import Context
from pipeline.errors import InputError
from stages import evaluate
import stages.evaluate.metrics as M

VIEWS, WIDTH, HEIGHT = 16, 192, 144
SKIPPED = (5, 11)  # source frames the "frames stage" dropped: SfM view i != source index
CFG = EvaluateConfig(num_samples=20000, icp_iterations=10, iou_max_views=6, render_max_side=320, report_frames=16)


# ---------------------------------------------------------------- fixtures (shared with test_report)

def synthetic_scene(base: Path) -> Path:
    """A small synthetic scene rendered once per test session (cached on disk)."""
    from pipeline.synthetic import SceneSpec, generate

    out = base / "evaluate_synthetic"
    if not (out / "done").is_file():
        generate(out, SceneSpec(num_views=VIEWS, width=WIDTH, height=HEIGHT, output="images", seed=0))
        (out / "done").write_text("ok")
    return out


def random_similarity(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    T = np.eye(4)
    T[:3, :3] = rng.uniform(0.3, 3.0) * q
    T[:3, 3] = rng.normal(scale=5.0, size=3)
    return T


def transform_cameras(cams: Cameras, T: np.ndarray) -> np.ndarray:
    """c2w of ``cams`` after the world similarity ``T`` (rotation part re-orthonormalised)."""
    s = M.similarity_scale(T)
    c2w = cams.c2w.copy()
    c2w[:, :3, :3] = (T[:3, :3] / s) @ cams.c2w[:, :3, :3]
    c2w[:, :3, 3] = M.transform_points(T, cams.c2w[:, :3, 3])
    return c2w


def perturbed_gt(gt_dir: Path, noise: float, seed: int = 0) -> trimesh.Trimesh:
    """The GT mesh with vertices moved along their normals by N(0, noise), with vertex colours."""
    mesh = trimesh.load(gt_dir / "gt_mesh.ply", force="mesh", process=False)
    rng = np.random.default_rng(seed)
    v = mesh.vertices + mesh.vertex_normals * rng.normal(scale=noise, size=(len(mesh.vertices), 1))
    lo, hi = v.min(0), v.max(0)
    colors = (255 * (v - lo) / (hi - lo)).astype(np.uint8)
    return trimesh.Trimesh(v, mesh.faces, vertex_colors=colors, process=False)


def _stage(root: Path, name: str, seconds: float, summary: dict | None = None) -> Path:
    folder = root / f"{name}-test"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": name, "files": {}, "seconds": seconds,
                                                      "summary": summary or {}}))
    return folder


def write_train(folder: Path, holdout_psnr: float | None) -> None:
    from torch.utils.tensorboard import SummaryWriter

    info = {"iterations": 200, "wall_seconds": 12.5, "train_psnr": 27.25, "holdout_views": ["images/000000.jpg"],
            "history": [{"step": s, "loss": 1.0 / (1 + s)} for s in range(0, 200, 50)]}
    if holdout_psnr is not None:
        info.update(holdout_psnr=holdout_psnr, holdout_psnr_views=["images/000000.jpg"])
    (folder / "train.json").write_text(json.dumps(info))
    writer = SummaryWriter(str(folder / "tb"))
    for step in range(0, 200, 10):
        writer.add_scalar("loss/rgb", 0.5 * np.exp(-step / 50) + 0.01, step)
        writer.add_scalar("psnr/train", 15 + 10 * (1 - np.exp(-step / 60)), step)
    writer.close()


def build_inputs(root: Path, syn: Path, T: np.ndarray, mesh: trimesh.Trimesh, masks: bool = True,
                 gt: bool = True, holdout_psnr: float | None = 24.5) -> dict[str, Path]:
    """Upstream stage folders in the formats evaluate reads; SfM world = T @ GT world."""
    gt_dir = syn / "gt"
    gt_cams = load_transforms(gt_dir / "transforms.json")
    keep = [j for j in range(len(gt_cams)) if j not in SKIPPED]
    frames, sfm = _stage(root, "frames", 1.5), _stage(root, "sfm", 3.0, {"registered": len(keep)})
    (frames / "images").mkdir(exist_ok=True)
    (sfm / "images").mkdir(exist_ok=True)
    records = []
    for i, j in enumerate(keep):
        name = f"images/{i:06d}.jpg"
        Image.open(gt_dir / gt_cams.names[j]).convert("RGB").save(frames / name, quality=90)
        shutil.copyfile(frames / name, sfm / name)
        records.append({"file": name, "source_index": j, "sharpness": 1.0})
    meta = {"source_kind": "video", "width": WIDTH, "height": HEIGHT, "frames": records}
    if gt:
        shutil.copytree(gt_dir, frames / "gt", dirs_exist_ok=True)
        meta["gt"] = "gt"
    (frames / "frames.json").write_text(json.dumps(meta))
    cams = Cameras([r["file"] for r in records], gt_cams.K[keep], transform_cameras(gt_cams.subset(keep), T),
                   WIDTH, HEIGHT)
    save_transforms(sfm / "transforms.json", cams)
    mask_stage = _stage(root, "masks", 2.0)
    if masks:
        (mask_stage / "masks").mkdir(exist_ok=True)
        for i, j in enumerate(keep):
            shutil.copyfile(gt_dir / "masks" / f"{j:06d}.png", mask_stage / "masks" / f"{i:06d}.png")
    sp = _stage(root, "sfm_points", 0.5)
    s = M.similarity_scale(T)
    centre = M.transform_points(T, np.asarray([gt_cams.extra["sphere_center"]]))[0]
    (sp / "scene.json").write_text(json.dumps({"sphere_center": centre.tolist(),
                                               "sphere_radius": s * gt_cams.extra["sphere_radius"]}))
    gt_mesh = trimesh.load(gt_dir / "gt_mesh.ply", force="mesh")
    np.save(sp / "points.npy", M.transform_points(T, gt_mesh.vertices[::7]).astype(np.float32))
    train = _stage(root, "train", 40.0, {"iterations": 200})
    write_train(train, holdout_psnr)
    _stage(root, "mesh", 4.0)
    cleanup = _stage(root, "cleanup", 2.5)
    recon = mesh.copy()
    recon.apply_transform(T)
    recon.export(cleanup / "mesh.ply")
    (cleanup / "cleanup.json").write_text(json.dumps({"faces": len(recon.faces), "watertight": True}))
    return {n: root / f"{n}-test" for n in ("cleanup", "mesh", "train", "sfm_points", "masks", "sfm", "frames")}


def run_stage(inputs: dict[str, Path], out: Path, cfg: EvaluateConfig = CFG) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    evaluate.run(inputs, cfg, out, Context(scene="synthetic", progress=False))
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return synthetic_scene(tmp_path_factory.getbasetemp())


# ---------------------------------------------------------------- metric functions

def test_chamfer_of_identical_points_is_zero_and_fscore_one():
    pts = np.random.default_rng(0).normal(size=(5000, 3))
    out = M.chamfer_fscore(pts, pts, [1e-6, 0.01])
    assert out["chamfer_l1"] == 0.0
    assert [s["fscore"] for s in out["fscores"]] == [1.0, 1.0]


def test_chamfer_of_offset_sphere_equals_offset():
    r, d, n = 1.0, 0.05, 100000
    inner = trimesh.creation.icosphere(subdivisions=5, radius=r)
    outer = trimesh.creation.icosphere(subdivisions=5, radius=r + d)
    a = trimesh.sample.sample_surface(inner, n, seed=1)[0]
    b = trimesh.sample.sample_surface(outer, n, seed=2)[0]
    out = M.chamfer_fscore(b, a, [0.5 * d, 2.0 * d])
    assert out["chamfer_l1"] == pytest.approx(d, rel=0.03)
    assert out["accuracy"] == pytest.approx(d, rel=0.03)
    assert out["fscores"][0]["fscore"] == 0.0  # every point is ~d away: none within d/2
    assert out["fscores"][1]["fscore"] == 1.0
    # independent samples of one surface: only sampling noise (~0.5 / sqrt(density) = 0.0056 here)
    same = M.chamfer_fscore(trimesh.sample.sample_surface(inner, n, seed=3)[0], a, [0.02])
    assert same["chamfer_l1"] < 0.008 and same["fscores"][0]["fscore"] > 0.99


def test_surface_distances_match_brute_force_and_have_no_sampling_floor():
    mesh = trimesh.load(Path(__file__).resolve().parents[1] / "pipeline/assets/spot/spot_triangulated.obj",
                        force="mesh")
    v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    diag = float(np.linalg.norm(v.max(0) - v.min(0)))
    rng = np.random.default_rng(0)
    on = np.asarray(trimesh.sample.sample_surface(mesh, 400, seed=4)[0])
    q = on + rng.normal(scale=0.02 * diag, size=on.shape)
    tris = v[f]  # reference twin: every point against every triangle
    ref = np.array([np.linalg.norm(trimesh.triangles.closest_point(tris, np.repeat(x[None], len(tris), 0)) - x,
                                   axis=1).min() for x in q])
    np.testing.assert_allclose(M.surface_distances(q, v, f), ref, rtol=0, atol=1e-6 * diag)
    # the same surface sampled twice: the point-sample Chamfer reads its floor, the surface one ~0
    a = np.asarray(trimesh.sample.sample_surface(mesh, 100000, seed=1)[0])
    b = np.asarray(trimesh.sample.sample_surface(mesh, 200000, seed=2)[0])
    sampled = M.chamfer_fscore(b, a, [0.005 * diag])["chamfer_l1"] / diag
    surface = M.chamfer_fscore_surface(b, (v, f), a, (v, f), [0.005 * diag])
    assert sampled > 5e-4  # ~0.12 % of the diagonal
    assert surface["chamfer_l1"] / diag < 1e-5 and surface["fscores"][0]["fscore"] == 1.0


def test_surface_chamfer_of_offset_sphere_equals_offset():
    r, d = 1.0, 0.05
    inner = trimesh.creation.icosphere(subdivisions=5, radius=r)
    outer = trimesh.creation.icosphere(subdivisions=5, radius=r + d)
    a = trimesh.sample.sample_surface(inner, 20000, seed=1)[0]
    b = trimesh.sample.sample_surface(outer, 20000, seed=2)[0]
    out = M.chamfer_fscore_surface(b, (outer.vertices, outer.faces), a, (inner.vertices, inner.faces), [0.5 * d])
    assert out["accuracy"] == pytest.approx(d, rel=0.01) and out["completeness"] == pytest.approx(d, rel=0.01)
    assert out["fscores"][0]["fscore"] == 0.0


def test_psnr_and_iou_values():
    gt = np.zeros((4, 4))
    assert M.psnr(gt + 0.1, gt) == pytest.approx(20.0)
    a = np.zeros((10, 10), bool)
    a[:, :5] = True
    b = np.zeros((10, 10), bool)
    b[:, 2:7] = True
    assert M.silhouette_iou(a, b) == pytest.approx(30 / 70)


def test_umeyama_and_icp_recover_a_similarity():
    rng = np.random.default_rng(3)
    src = rng.normal(size=(200, 3))
    T = random_similarity(1)
    assert np.allclose(M.umeyama(src, M.transform_points(T, src)), T, atol=1e-9)
    # ICP from a slightly wrong start converges back onto the surface
    sphere = trimesh.sample.sample_surface(trimesh.creation.box(extents=(1, 2, 3)), 20000, seed=0)[0]
    start = np.eye(4)
    start[:3, :3] = trimesh.transformations.rotation_matrix(0.05, [1, 1, 0])[:3, :3]
    start[:3, 3] = [0.03, -0.02, 0.01]
    refined, info = M.icp_refine(sphere[::4], sphere, start, iterations=30)
    assert info["rmse_after"] < 0.2 * info["rmse_before"]
    assert M.motion_size(refined)[0] < 0.5


def test_gt_mesh_silhouette_matches_gt_masks_and_a_shifted_mesh_does_not(syn):
    gt = trimesh.load(syn / "gt" / "gt_mesh.ply", force="mesh", process=False)
    cams = load_transforms(syn / "gt" / "transforms.json")
    shift = np.array([0.05, 0.0, 0.0])  # 5 % of the object diagonal
    good, bad = [], []
    for i in range(0, VIEWS, 3):
        mask = np.asarray(Image.open(syn / "gt" / "masks" / f"{i:06d}.png")) > 127
        for verts, out in ((gt.vertices, good), (gt.vertices + shift, bad)):
            sil = M.render_silhouette(verts, gt.faces, cams.K[i], cams.c2w[i], WIDTH, HEIGHT)
            out.append(M.silhouette_iou(sil, mask))
    assert min(good) >= 0.97, good
    assert np.mean(bad) < np.mean(good) - 0.05 and max(bad) < 0.95, bad


# ---------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def runs(syn, tmp_path_factory) -> dict[str, dict]:
    """The stage on one perturbed reconstruction, in the GT frame and in a random similarity frame."""
    mesh = perturbed_gt(syn / "gt", noise=0.002)
    out = {}
    for label, T in (("gt_frame", np.eye(4)), ("random_frame", random_similarity(7))):
        root = tmp_path_factory.mktemp(label)
        out[label] = run_stage(build_inputs(root / "in", syn, T, mesh), root / "out")
        out[label]["_out"] = root / "out"
    return out


def test_stage_scores_the_reconstruction_against_ground_truth(runs):
    m = runs["random_frame"]
    geo = m["geometry"]
    assert geo["available"] and geo["bbox_diagonal"] == pytest.approx(1.0, rel=1e-3)
    assert 0.05 < geo["chamfer_l1_pct"] < 0.6  # noise 0.2 % of the diagonal + sampling
    f05, f1 = (s["fscore"] for s in geo["fscores"])
    assert f1 > 0.95 and 0.6 < f05 <= f1
    assert geo["fscores"][1]["tau"] == pytest.approx(0.01 * geo["bbox_diagonal"])
    assert m["alignment"]["method"] == "umeyama_cameras+icp"
    assert m["alignment"]["reference"] == "gt/transforms.json"
    assert m["alignment"]["num_cameras"] == VIEWS - len(SKIPPED)
    assert m["alignment"]["camera_rmse_pct_radius"] < 1e-6
    assert m["alignment"]["rotation_error_deg_median"] < 1e-4
    assert m["alignment"]["icp"]["rotation_deg"] < 0.5  # the camera alignment was already right
    assert m["silhouette"]["mean_iou"] > 0.95 and m["silhouette"]["num_views"] == 6
    assert m["silhouette_gt"]["mean_iou"] == pytest.approx(m["silhouette"]["mean_iou"], abs=0.005)
    assert m["psnr"] == {"train_psnr": 27.25, "available": True, "holdout_psnr": 24.5, "num_views": 1}
    assert m["stage_seconds"]["train"] == 40.0 and m["stage_seconds"]["frames"] == 1.5
    assert (m["_out"] / "report.html").is_file()


def test_alignment_makes_scores_independent_of_the_world_frame(runs):
    a, b = runs["gt_frame"], runs["random_frame"]
    assert a["alignment"]["method"] == "identity" and "before_icp" not in a["geometry"]
    assert b["alignment"]["scale"] == pytest.approx(1.0 / M.similarity_scale(random_similarity(7)), rel=1e-6)
    for key in ("chamfer_l1_pct", "accuracy_pct", "completeness_pct"):
        assert b["geometry"][key] == pytest.approx(a["geometry"][key], rel=0.02), key
    assert b["geometry"]["before_icp"]["chamfer_l1_pct"] == pytest.approx(a["geometry"]["chamfer_l1_pct"], rel=1e-3)
    for sa, sb in zip(a["geometry"]["fscores"], b["geometry"]["fscores"]):
        assert sb["fscore"] == pytest.approx(sa["fscore"], abs=0.01)
    assert b["silhouette"]["mean_iou"] == pytest.approx(a["silhouette"]["mean_iou"], abs=0.005)


def dataset_inputs(root: Path, syn: Path, mesh: trimesh.Trimesh) -> dict[str, Path]:
    """A dataset import: frames/transforms.json holds the GT cameras and SfM kept them."""
    inputs = build_inputs(root, syn, np.eye(4), mesh)
    meta = json.loads((inputs["frames"] / "frames.json").read_text())
    meta["source_kind"] = "dataset"
    for rec in meta["frames"]:
        rec["source_file"] = f"scan/image/{rec.pop('source_index'):03d}.png"
    (inputs["frames"] / "frames.json").write_text(json.dumps(meta))
    shutil.copyfile(inputs["sfm"] / "transforms.json", inputs["frames"] / "transforms.json")
    return inputs


def test_dataset_cameras_are_used_as_they_are(syn, tmp_path):
    inputs = dataset_inputs(tmp_path / "in", syn, perturbed_gt(syn / "gt", 0.002))
    cfg = EvaluateConfig(num_samples=20000, iou_max_views=2, render_max_side=160, report_frames=4)
    m = run_stage(inputs, tmp_path / "out", cfg)
    assert m["alignment"]["method"] == "identity" and m["alignment"]["reference"] == "transforms.json"
    assert 0.05 < m["geometry"]["chamfer_l1_pct"] < 0.6
    region = m["geometry"]["object_region"]
    assert region["available"] and region["support_plane_z"] == 0.0 and region["faces_inside_share"] > 0.97
    assert region["chamfer_l1_pct"] == pytest.approx(m["geometry"]["chamfer_l1_pct"], abs=0.1)
    assert not m["silhouette_gt"]["available"]


def test_object_region_leaves_out_the_ground_and_far_floaters(syn, tmp_path):
    """A scene-mode mesh holds the ground and far-off geometry: the whole-mesh score counts them,
    the object-region score crops them away and scores the object alone."""
    obj = perturbed_gt(syn / "gt", 0.002)
    ground = trimesh.creation.box(extents=(2.0, 2.0, 0.004))
    ground.apply_translation((0.0, 0.0, -0.002))  # top face on the support plane z = 0
    floater = trimesh.creation.icosphere(radius=0.05)
    floater.apply_translation((1.2, 0.0, 0.6))
    mesh = trimesh.util.concatenate([obj, ground, floater])
    cfg = EvaluateConfig(num_samples=40000, iou_max_views=2, render_max_side=160, report_frames=4)
    m = run_stage(dataset_inputs(tmp_path / "in", syn, mesh), tmp_path / "out", cfg)
    geo, region = m["geometry"], m["geometry"]["object_region"]
    assert geo["chamfer_l1_pct"] > 5.0  # the ground dominates the whole-mesh accuracy
    assert region["available"] and region["faces_inside_share"] < 1.0  # the ground and floater faces are out
    assert 0.05 < region["chamfer_l1_pct"] < 0.6  # the object's own noise, as without the ground
    assert region["fscores"][1]["fscore"] > 0.95


def test_without_ground_truth_or_holdout_the_reasons_are_reported(syn, tmp_path):
    inputs = build_inputs(tmp_path / "in", syn, np.eye(4), perturbed_gt(syn / "gt", 0.0), gt=False,
                          holdout_psnr=None)
    cfg = EvaluateConfig(num_samples=2000, iou_max_views=3, render_max_side=160, report_frames=4)
    m = run_stage(inputs, tmp_path / "out", cfg)
    assert m["geometry"] == {"available": False, "reason": "no ground truth for this scene"}
    assert m["alignment"]["method"] == "none"
    assert m["silhouette"]["num_views"] == 3 and m["silhouette"]["mean_iou"] > 0.97
    assert not m["psnr"]["available"] and "no holdout_psnr" in m["psnr"]["reason"]
    assert "holdout_psnr" not in m["psnr"]
    off = evaluate.read_psnr(inputs["train"], EvaluateConfig(holdout=False))
    assert not off["available"] and "evaluate.holdout is false" in off["reason"]
    info = json.loads((inputs["train"] / "train.json").read_text())
    (inputs["train"] / "train.json").write_text(json.dumps({**info, "holdout_psnr": None, "holdout_views": []}))
    none_held = evaluate.read_psnr(inputs["train"], EvaluateConfig())
    assert not none_held["available"] and "no views were held out" in none_held["reason"]


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_after_a_scene_mode_fallback_the_mesh_is_scored_against_the_set_aside_masks(syn, tmp_path, shift):
    """No masks/ but masks.json's fallback names the set-aside folder: the silhouette IoU is taken
    against those masks and a mesh far from them gets a warning in metrics.json and the log."""
    mesh = perturbed_gt(syn / "gt", 0.0)
    mesh.apply_translation([shift, 0.0, 0.0])
    inputs = build_inputs(tmp_path / "in", syn, np.eye(4), mesh, gt=False)
    (inputs["masks"] / "masks").rename(inputs["masks"] / "rejected_masks")
    (inputs["masks"] / "masks.json").write_text(json.dumps({"method": "none", "fallback": {
        "from": "grabcut", "reason": "test", "masks": "rejected_masks"}}))
    cfg = EvaluateConfig(num_samples=2000, iou_max_views=3, render_max_side=160, report_frames=4)
    m = run_stage(inputs, tmp_path / "out", cfg)["silhouette"]
    assert m["available"] and m["against"].startswith("masks set aside") and m["num_views"] == 3
    if shift == 0.0:
        assert m["mean_iou"] > 0.97 and "warning" not in m
    else:
        assert m["mean_iou"] < evaluate.DISAGREE_IOU and "disagree" in m["warning"]
        assert "rejected_masks/" in m["warning"]


def test_training_curves_come_from_tensorboard_else_from_train_json(syn, tmp_path):
    from stages.evaluate.figures import read_scalars

    folder = tmp_path / "train"
    folder.mkdir()
    write_train(folder, 20.0)
    curves = read_scalars(folder)
    assert sorted(curves) == ["loss/rgb", "psnr/train"] and curves["loss/rgb"][0][:3] == [0, 10, 20]
    assert curves["loss/rgb"][1][0] == pytest.approx(0.51)
    shutil.rmtree(folder / "tb")
    curves = read_scalars(folder)
    assert curves == {"loss": ([0, 50, 100, 150], [1.0, 1 / 51, 1 / 101, 1 / 151])}


def test_missing_mesh_is_an_input_error(syn, tmp_path):
    inputs = build_inputs(tmp_path / "in", syn, np.eye(4), perturbed_gt(syn / "gt", 0.0))
    (inputs["cleanup"] / "mesh.ply").unlink()
    with pytest.raises(InputError, match="mesh.ply: mesh file missing; rerun the cleanup stage"):
        run_stage(inputs, tmp_path / "out")


def test_photo_frames_map_to_gt_views_by_file_name():
    meta = {"frames": [{"file": "images/000000.jpg", "source_file": "000004.png"},
                       {"file": "images/000001.jpg", "source_file": "000009.png"}]}
    gt_names = [f"images/{j:06d}.png" for j in range(12)]
    pairs = evaluate.gt_view_pairs(meta, ["images/000001.jpg", "images/000000.jpg"], gt_names)
    assert pairs == [(0, 9), (1, 4)]


def test_align_by_shape_recovers_an_unknown_similarity():
    """OmniObject3D video scans are not registered to the cameras: shape-only alignment."""
    from scipy.spatial.transform import Rotation

    import trimesh
    import stages.evaluate.metrics as M
    root = Path(__file__).resolve().parents[1]
    mesh = trimesh.load(str(root / "pipeline" / "assets" / "spot" / "spot_triangulated.obj"), force="mesh")
    gt = np.asarray(trimesh.sample.sample_surface(mesh, 4000, seed=0)[0])
    T = np.eye(4)
    T[:3, :3] = 2.5 * Rotation.from_euler("xyz", [20, -35, 110], degrees=True).as_matrix()
    T[:3, 3] = [0.3, -1.0, 2.0]
    src = M.transform_points(np.linalg.inv(T), np.asarray(trimesh.sample.sample_surface(mesh, 4000, seed=1)[0]))
    found, info = M.align_by_shape(src, gt)
    err = np.linalg.norm(M.transform_points(found, src) - M.transform_points(T, src), axis=1)
    diag = np.linalg.norm(gt.max(0) - gt.min(0))
    assert np.median(err) < 0.01 * diag, (np.median(err) / diag, info)
