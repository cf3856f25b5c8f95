"""OmniObject3D importers: tiny synthetic scenes written in the blender_renders and videos_processed
layouts import with cameras equal to the ground truth (the raw scan's frame for renders, the COLMAP
frame for videos) and masks equal to the GT masks; the raw scan becomes gt/ with gt.json."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omni_fixtures import (apply_similarity, colmap_similarity, llff_poses_bounds, make_synthetic, omni_scale,
                           write_blender_render, write_raw_scan, write_video_scene)
from pipeline.cameras import load_transforms, project
from pipeline.dag import Context, Source
from pipeline.errors import InputError
from stages.frames import importers
from stages.frames.importers import omniobject3d as omni

NUM_VIEWS, WIDTH, HEIGHT = 8, 96, 72


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("omni_syn"), NUM_VIEWS, WIDTH, HEIGHT)


def run_import(fmt: str, dataset: Path, tmp_path: Path, gt: Path | None = None) -> tuple[Path, dict]:
    out = tmp_path / "frames"
    out.mkdir(parents=True)
    source = Source("dataset", str(dataset), format=fmt, gt=str(gt) if gt else "")
    return out, importers.run(fmt, dataset, out, Context(scene="t", progress=False, source=source))


def assert_import(out: Path, K: np.ndarray, c2w: np.ndarray, masks: list[np.ndarray] | None) -> None:
    got = load_transforms(out / "transforms.json")
    assert len(got) == NUM_VIEWS and (got.width, got.height) == (WIDTH, HEIGHT)
    np.testing.assert_allclose(got.K, K, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got.c2w, c2w, atol=1e-9)
    for name in got.names:
        assert (out / name).is_file()
    if masks is None:
        assert not (out / "masks").exists()
        return
    for i, gt_mask in enumerate(masks):
        mask = np.asarray(Image.open(out / "masks" / f"{i:06d}.png"))
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 127, gt_mask)


def read_gt(out: Path) -> dict:
    return json.loads((out / "gt" / "gt.json").read_text())


# ---------------------------------------------------------------- blender_renders

def test_blender_render_cameras_in_scan_frame(syn, tmp_path):
    scan = write_raw_scan(syn, tmp_path, "toy", "toy_001")
    render = write_blender_render(syn, tmp_path, "toy", "toy_001")
    out, summary = run_import("omniobject3d_blender", render, tmp_path, gt=scan)
    assert_import(out, syn.cams.K, syn.cams.c2w, syn.masks)
    assert summary["masks"] == NUM_VIEWS and summary["gt_aligned"] is True
    info = read_gt(out)
    assert info["aligned"] is True and info["render_scale"] == pytest.approx(omni_scale(syn.vertices))
    import trimesh
    gt_mesh = trimesh.load(out / "gt" / "gt_mesh.ply", process=False)
    np.testing.assert_allclose(gt_mesh.bounds, [syn.vertices.min(0), syn.vertices.max(0)], atol=1e-6)
    assert (out / "gt" / "Scan.obj").is_file() and (out / "gt" / "Scan.mtl").is_file()
    rgb = np.asarray(Image.open(out / "images" / "000001.png"))
    assert rgb.shape == (HEIGHT, WIDTH, 3) and np.all(rgb[~syn.masks[1]] == 255)  # composited over white


def test_fixture_follows_omniobject3d_mesh_eval(syn, tmp_path):
    """Independent of our conversion: OmniObject3D's tools/mesh_eval.py maps the scan into the
    render frame by ``v * scale @ [[1,0,0],[0,0,1],[0,-1,0]]``; so mapped (and only so), the scan
    projects into the alpha masks through the raw transforms.json cameras."""
    from scipy.ndimage import binary_dilation

    render = write_blender_render(syn, tmp_path, "toy", "toy_002")
    data = json.loads((render / "transforms.json").read_text())
    f = 0.5 * WIDTH / np.tan(0.5 * data["camera_angle_x"])
    K = np.array([[f, 0, WIDTH / 2], [0, f, HEIGHT / 2], [0, 0, 1]])

    def inside_share(axes: np.ndarray) -> float:
        verts = syn.vertices * data["frames"][0]["scale"] @ axes
        shares = []
        for i, frame in enumerate(data["frames"]):
            c2w_cv = np.asarray(frame["transform_matrix"]) @ np.diag([1.0, -1, -1, 1])
            uv, _ = project(verts, K, np.linalg.inv(c2w_cv))
            px = np.clip(np.floor(uv).astype(int), 0, [WIDTH - 1, HEIGHT - 1])
            shares.append(binary_dilation(syn.masks[i])[px[:, 1], px[:, 0]].mean())  # 1 px: silhouette pixels
        return float(min(shares))

    assert inside_share(np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]])) > 0.99
    assert inside_share(np.eye(3)) < 0.5  # without Blender's Y-up -> Z-up turn it does not fit


def test_blender_render_without_scale_stays_in_render_frame(syn, tmp_path, caplog):
    scan = write_raw_scan(syn, tmp_path, "toy", "toy_003")
    render = write_blender_render(syn, tmp_path, "toy", "toy_003", with_scale=False)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        out, _ = run_import("omniobject3d_blender", render, tmp_path, gt=scan)
    raw = json.loads((render / "transforms.json").read_text())
    expected = np.stack([np.asarray(f["transform_matrix"]) @ np.diag([1.0, -1, -1, 1]) for f in raw["frames"]])
    assert_import(out, syn.cams.K, expected, syn.masks)
    assert read_gt(out)["aligned"] is False
    assert "no per-frame 'scale'" in caplog.text


def test_blender_old_absolute_file_paths(syn, tmp_path):
    render = write_blender_render(syn, tmp_path, "toy", "toy_004")
    data = json.loads((render / "transforms.json").read_text())
    for i, frame in enumerate(data["frames"]):
        frame["file_path"] = f"/mnt/render_machine/toy/toy_004/render/r_{i}"
    (render / "transforms.json").write_text(json.dumps(data))
    out, summary = run_import("omniobject3d_blender", render, tmp_path)
    assert_import(out, syn.cams.K, syn.cams.c2w, syn.masks)
    assert "gt_faces" not in summary and not (out / "gt").exists()
    assert json.loads((out / "frames.json").read_text())["frames"][2]["source_file"] == "images/r_2.png"


@pytest.mark.parametrize("case", ["disagree", "partial", "negative"])
def test_blender_bad_scale_names_the_file(syn, tmp_path, case):
    render = write_blender_render(syn, tmp_path, "toy", "toy_005")
    data = json.loads((render / "transforms.json").read_text())
    if case == "disagree":
        data["frames"][3]["scale"] *= 1.01
    elif case == "partial":
        del data["frames"][3]["scale"]
    else:
        for frame in data["frames"]:
            frame["scale"] = -1.0
    (render / "transforms.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"transforms\.json.*scale"):
        run_import("omniobject3d_blender", render, tmp_path)


def test_broken_scan_fails_with_its_name(syn, tmp_path):
    scan = write_raw_scan(syn, tmp_path, "toy", "toy_006")
    (scan / "Scan.obj").write_text("this is not a mesh\n")
    render = write_blender_render(syn, tmp_path, "toy", "toy_006")
    with pytest.raises(InputError, match="Scan.obj"):
        run_import("omniobject3d_blender", render, tmp_path, gt=scan)


def test_frames_json_names_the_scan_ground_truth(syn, tmp_path):
    scan = write_raw_scan(syn, tmp_path, "toy", "toy_007")
    render = write_blender_render(syn, tmp_path, "toy", "toy_007")
    out, _ = run_import("omniobject3d_blender", render, tmp_path, gt=scan)
    assert json.loads((out / "frames.json").read_text()).get("gt") == "gt"


# ---------------------------------------------------------------- videos_processed

def colmap_cams(syn, T=None):
    return apply_similarity(colmap_similarity() if T is None else T, syn.cams.c2w)


def test_video_sparse_wins_over_poses_bounds(syn, tmp_path):
    scan = write_raw_scan(syn, tmp_path, "toy", "toy_010")
    std = write_video_scene(syn, tmp_path, "toy", "toy_010")
    arr = np.load(std / "poses_bounds.npy")
    arr[:, 3] += 0.5  # poses_bounds disagrees with sparse/: sparse/ must win
    np.save(std / "poses_bounds.npy", arr)
    out, summary = run_import("omniobject3d_video", std, tmp_path, gt=scan)
    assert_import(out, syn.cams.K, colmap_cams(syn), syn.masks)
    info = read_gt(out)
    assert info["aligned"] is False and info["cameras"] == "sparse" and "ICP" in info["alignment"]
    assert (out / "sparse" / "images.bin").is_file() and summary["gt_aligned"] is False
    np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / "000004.png")),
                                  np.asarray(Image.open(syn.gt_dir / "images" / "000004.png").convert("RGB")))


@pytest.mark.parametrize("sparse", [None, "SIMPLE_RADIAL"])
def test_video_poses_bounds(syn, tmp_path, sparse, caplog):
    """No sparse/, or a distorted model in it: the LLFF poses, converted to OpenCV axes."""
    std = write_video_scene(syn, tmp_path, "toy", "toy_011", sparse=sparse, mask_dir="segs")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        out, _ = run_import("omniobject3d_video", std, tmp_path)
    assert_import(out, syn.cams.K, colmap_cams(syn), syn.masks)
    assert ("using poses_bounds.npy" in caplog.text) == (sparse is not None)
    assert not (out / "sparse").exists()


def test_video_poses_bounds_pair_with_the_models_registered_images(syn, tmp_path):
    """An image COLMAP did not register sits among the others: LLFF rows follow the sorted names
    of the posed images in sparse/ (distorted here, so poses_bounds.npy gives the cameras)."""
    std = write_video_scene(syn, tmp_path, "toy", "toy_014", sparse="SIMPLE_RADIAL")
    shutil.copyfile(std / "images" / "003.png", std / "images" / "003b.png")
    shutil.copyfile(std / "matting" / "003.png", std / "matting" / "003b.png")
    out, _ = run_import("omniobject3d_video", std, tmp_path)
    assert_import(out, syn.cams.K, colmap_cams(syn), syn.masks)
    sources = [f["source_file"] for f in json.loads((out / "frames.json").read_text())["frames"]]
    assert sources == [f"images/{i:03d}.png" for i in range(NUM_VIEWS)]


def test_llff_conversion_and_resized_images(syn):
    T = colmap_similarity(sigma=2.0, seed=5)
    c2w = colmap_cams(syn, T)
    arr = llff_poses_bounds(c2w, syn.cams.K, WIDTH, HEIGHT, np.ones((NUM_VIEWS, 2)))
    K, got = omni.llff_cameras(arr, WIDTH // 2, HEIGHT // 2, Path("poses_bounds.npy"))
    np.testing.assert_allclose(got, c2w, atol=1e-12)
    np.testing.assert_allclose(K[:, 0, 0], syn.cams.K[:, 0, 0] / 2)
    np.testing.assert_allclose(K[:, :2, 2], np.tile([WIDTH / 4, HEIGHT / 4], (NUM_VIEWS, 1)))
    # LLFF's own loader turns [down, right, back] into OpenGL [right, up, back] = our c2w @ diag(1, -1, -1)
    poses = arr[:, :15].reshape(-1, 3, 5)
    gl = np.concatenate([poses[:, :, 1:2], -poses[:, :, 0:1], poses[:, :, 2:4]], axis=2)
    np.testing.assert_allclose(gl[:, :, :3], (got @ np.diag([1.0, -1, -1, 1]))[:, :3, :3], atol=1e-12)
    with pytest.raises(InputError, match="aspect ratio"):
        omni.llff_cameras(arr, WIDTH, WIDTH, Path("poses_bounds.npy"))


@pytest.mark.parametrize("case", ["count", "shape", "no_cameras", "no_images"])
def test_video_bad_input_names_the_file(syn, tmp_path, case):
    std = write_video_scene(syn, tmp_path, "toy", "toy_012", sparse=None)
    if case == "count":
        shutil.copyfile(std / "images" / "000.png", std / "images" / "999.png")
        match = r"poses_bounds\.npy: 8 poses for 9 images"
    elif case == "shape":
        np.save(std / "poses_bounds.npy", np.zeros((NUM_VIEWS, 15)))
        match = r"poses_bounds\.npy: expected an N x 17"
    elif case == "no_cameras":
        (std / "poses_bounds.npy").unlink()
        match = "neither a COLMAP model in sparse/ nor poses_bounds.npy"
    else:
        shutil.rmtree(std / "images")
        match = "no images/ folder"
    with pytest.raises(InputError, match=match):
        run_import("omniobject3d_video", std, tmp_path)


def test_video_missing_mattes_import_without_masks(syn, tmp_path, caplog):
    std = write_video_scene(syn, tmp_path, "toy", "toy_013")
    (std / "matting" / "003.png").unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        out, summary = run_import("omniobject3d_video", std, tmp_path)
    assert_import(out, syn.cams.K, colmap_cams(syn), None)
    assert summary["masks"] == 0 and "lacks a mask for 1 of 8 images" in caplog.text
