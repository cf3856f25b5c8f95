"""Tests of the synthetic scene generator: ground truth consistency (masks, cameras, mesh),
output formats (video, photos) and the rasteriser, on tiny scenes."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from pipeline.cameras import load_neus_npz, load_transforms, project
from pipeline.errors import ConfigError
from pipeline.synthetic import SceneSpec, generate
from pipeline.synthetic.mesh import SPOT_MESH
from pipeline.raster import rasterize

TINY = dict(num_views=8, width=96, height=72)


@pytest.fixture(scope="module")
def video_scene(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("video"), SceneSpec(output="video", **TINY))


def _read(path, flags=cv2.IMREAD_COLOR):
    image = cv2.imread(str(path), flags)
    assert image is not None, path
    return image


def test_layout_and_video_decodes(video_scene):
    import av

    gt = video_scene.gt_dir
    for name in ("transforms.json", "cameras_sphere.npz", "gt_mesh.ply", "gt.json"):
        assert (gt / name).is_file()
    assert len(list((gt / "images").glob("*.png"))) == TINY["num_views"]
    assert video_scene.input == video_scene.video and video_scene.images_dir is None
    with av.open(str(video_scene.video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == TINY["num_views"]
    assert frames[0].shape == (TINY["height"], TINY["width"], 3)
    for i in (0, TINY["num_views"] - 1):  # frame order = orbit order, close to the lossless render
        lossless = _read(gt / "images" / f"{i:06d}.png")[:, :, ::-1].astype(float)
        assert np.abs(frames[i] - lossless).mean() < 12.0


def test_vertices_project_inside_masks(video_scene):
    cams = load_transforms(video_scene.gt_dir / "transforms.json")
    vertices = np.asarray(trimesh.load(video_scene.gt_dir / "gt_mesh.ply", process=False).vertices)
    assert cams.names[0] == "images/000000.png"
    for i in range(len(cams)):
        mask = _read(video_scene.gt_dir / "masks" / f"{i:06d}.png", cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255} and mask.any()
        dilated = cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0
        uv, depth = project(vertices, cams.K[i], cams.w2c[i])
        assert (depth > 0).all()
        col, row = np.floor(uv).astype(int).T
        assert ((col >= 0) & (col < cams.width) & (row >= 0) & (row < cams.height)).all()
        assert dilated[row, col].all(), f"view {i}: vertices outside the mask"


def test_neus_npz_round_trip_and_sphere(video_scene):
    gt = video_scene.gt_dir
    cams = load_transforms(gt / "transforms.json")
    neus, scale_mat = load_neus_npz(gt / "cameras_sphere.npz", cams.names, cams.width, cams.height)
    np.testing.assert_allclose(neus.K, cams.K, atol=1e-6)
    np.testing.assert_allclose(neus.c2w, cams.c2w, atol=1e-6)
    vertices = np.asarray(trimesh.load(gt / "gt_mesh.ply", process=False).vertices)
    unit = (vertices - scale_mat[:3, 3]) / scale_mat[0, 0]
    assert np.linalg.norm(unit, axis=1).max() == pytest.approx(1.0, abs=1e-6)
    data = json.loads((gt / "transforms.json").read_text())
    np.testing.assert_allclose(data["sphere_center"], scale_mat[:3, 3])
    assert data["sphere_radius"] == pytest.approx(scale_mat[0, 0])


def test_gt_transform_maps_source_onto_gt_mesh(video_scene):
    info = json.loads((video_scene.gt_dir / "gt.json").read_text())
    assert info["source_mesh"] == SPOT_MESH.name and info["num_views"] == TINY["num_views"]
    T = np.asarray(info["transform"])
    source = np.asarray(trimesh.load(SPOT_MESH, process=False).vertices)
    mapped = source @ T[:3, :3].T + T[:3, 3]
    gt = trimesh.load(video_scene.gt_dir / "gt_mesh.ply", process=False)
    assert gt.is_watertight
    assert cKDTree(gt.vertices).query(mapped)[0].max() < 1e-6
    assert cKDTree(mapped).query(gt.vertices)[0].max() < 1e-6
    lo, hi = gt.bounds
    assert lo[2] == pytest.approx(0.0, abs=1e-9)  # resting on the ground plane z = 0
    assert np.linalg.norm(hi - lo) == pytest.approx(info["object_size"])
    scale = np.cbrt(np.linalg.det(T[:3, :3]))
    np.testing.assert_allclose(T[:3, :3] @ T[:3, :3].T, scale ** 2 * np.eye(3), atol=1e-9)


@pytest.mark.parametrize("supersample", [1, 2])
def test_mask_matches_object_pixels(tmp_path, supersample):
    """Flat black vs white background: their difference is (1 - coverage) * 255 per pixel."""
    base = dict(num_views=3, width=64, height=48, output="images", supersample=supersample)
    renders = {}
    for key, kwargs in {"black": dict(background=False, background_color=(0, 0, 0)),
                        "white": dict(background=False, background_color=(255, 255, 255)),
                        "scene": dict(background=True)}.items():
        result = generate(tmp_path / key, SceneSpec(**base, **kwargs))
        renders[key] = result
    for i in range(base["num_views"]):
        name = f"{i:06d}.png"
        black, white, scene = (_read(renders[k].gt_dir / "images" / name).astype(int) for k in ("black", "white", "scene"))
        mask = _read(renders["scene"].gt_dir / "masks" / name, cv2.IMREAD_UNCHANGED) > 0
        diff = (white - black).mean(2)  # 0 full coverage ... 255 no coverage
        np.testing.assert_array_equal(mask, diff < 160)  # coverage >= 0.5
        full = diff <= 1
        assert full.sum() > 50
        assert np.abs(scene - black)[full].max() <= 1  # background never changes object pixels
        if supersample > 1:
            assert ((diff > 1) & (diff < 254)).any()  # anti-aliased edges exist
        assert (_read(renders["scene"].images_dir / name) == scene).all()


def test_mesh_without_uvs_and_other_up_axis(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=3.0)
    sphere.apply_translation([10.0, -4.0, 2.0])
    path = tmp_path / "ball.ply"
    sphere.export(path)
    result = generate(tmp_path / "out", SceneSpec(mesh_path=path, mesh_up_axis="z", num_views=2, width=48,
                                                  height=36, output="images"))
    info = json.loads((result.gt_dir / "gt.json").read_text())
    T = np.asarray(info["transform"])
    centre = T[:3, :3] @ np.array([10.0, -4.0, 2.0]) + T[:3, 3]
    np.testing.assert_allclose(centre, [0.0, 0.0, info["sphere_radius"]], atol=1e-2)
    image = _read(result.gt_dir / "images" / "000000.png")
    mask = _read(result.gt_dir / "masks" / "000000.png", cv2.IMREAD_UNCHANGED) > 0
    assert mask.any() and image[mask].std() > 3  # procedural colours, not flat


def test_spec_validation():
    with pytest.raises(ConfigError, match="even width"):
        SceneSpec(width=95, height=72, output="video")
    with pytest.raises(ConfigError, match="output"):
        SceneSpec(output="gif")
    with pytest.raises(ConfigError, match="ground"):
        from pipeline.synthetic import orbit_cameras
        orbit_cameras(SceneSpec(elevation_deg=-60.0), np.array([0.0, 0.0, 0.3]))


def test_rasterizer_coverage_and_depth():
    # A square (1,1)-(5,5) from two triangles at depth 2, and a nearer triangle over part of it.
    xy = torch.tensor([[1, 1], [5, 1], [5, 5], [1, 5], [0, 0], [4, 0], [0, 4]], dtype=torch.float32)
    z = torch.tensor([2, 2, 2, 2, 1, 1, 1], dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    face, bary = rasterize(xy, z, faces, 8, 8)
    covered = (face >= 0).view(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1:5, 1:5] = True  # pixel centres 1.5 ... 4.5 lie inside; shared diagonal leaves no crack
    assert torch.equal(covered, expected)
    torch.testing.assert_close(bary[face >= 0].sum(1), torch.ones(16))
    face, _ = rasterize(xy, z, torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6]]), 8, 8)
    assert face.view(8, 8)[1, 1] == 2 and face.view(8, 8)[4, 4] == 0


def test_refuses_a_used_output_folder(video_scene):
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="fresh output folder"):
        generate(video_scene.out_dir, SceneSpec(output="video", **TINY))
