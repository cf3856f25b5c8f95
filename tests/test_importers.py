"""Dataset importers: a tiny synthetic scene written in each format is imported back, and its
cameras (K, c2w) and masks must equal the ground truth; bad inputs give InputErrors naming files.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cameras import GL_FROM_CV, load_transforms
from pipeline.dag import Context
from pipeline.errors import InputError
from stages.frames import importers

NUM_VIEWS, WIDTH, HEIGHT = 8, 96, 72


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    """(gt folder, GT cameras, GT masks as bool arrays)."""
    from pipeline.synthetic import SceneSpec, generate

    out = tmp_path_factory.mktemp("syn")
    generate(out, SceneSpec(num_views=NUM_VIEWS, width=WIDTH, height=HEIGHT, output="images", supersample=1))
    cams = load_transforms(out / "gt" / "transforms.json")
    masks = [np.asarray(Image.open(out / "gt" / "masks" / f"{i:06d}.png").convert("L")) > 127
             for i in range(NUM_VIEWS)]
    return out / "gt", cams, masks


def ctx() -> Context:
    return Context(scene="test", progress=False)


def run_import(fmt: str, dataset: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "frames"
    out.mkdir(parents=True)
    return out, importers.run(fmt, dataset, out, ctx())


def assert_cameras_match(out: Path, cams, with_masks: list | None) -> None:
    got = load_transforms(out / "transforms.json")
    assert got.names == [f"images/{i:06d}.png" for i in range(NUM_VIEWS)]
    assert (got.width, got.height) == (WIDTH, HEIGHT)
    np.testing.assert_allclose(got.K, cams.K, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.c2w, cams.c2w, atol=1e-6)
    meta = json.loads((out / "frames.json").read_text())
    assert meta["source_kind"] == "dataset" and (meta["width"], meta["height"]) == (WIDTH, HEIGHT)
    assert [f["file"] for f in meta["frames"]] == got.names
    for name in got.names:
        assert (out / name).is_file()
    if with_masks is None:
        assert not (out / "masks").exists()
        return
    for i, gt_mask in enumerate(with_masks):
        mask = np.asarray(Image.open(out / "masks" / f"{i:06d}.png"))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 127, gt_mask)


# ---------------------------------------------------------------- writers of each format

def write_neus(gt_dir: Path, root: Path) -> Path:
    """DTU as NeuS distributes it: image/000000.png, mask/000.png (3-channel), cameras_sphere.npz."""
    (root / "image").mkdir(parents=True)
    (root / "mask").mkdir()
    for i in range(NUM_VIEWS):
        shutil.copyfile(gt_dir / "images" / f"{i:06d}.png", root / "image" / f"{i:06d}.png")
        mask = np.asarray(Image.open(gt_dir / "masks" / f"{i:06d}.png").convert("L"))
        Image.fromarray(np.repeat(mask[..., None], 3, 2)).save(root / "mask" / f"{i:03d}.png")
    shutil.copyfile(gt_dir / "cameras_sphere.npz", root / "cameras_sphere.npz")
    return root


def write_blender(gt_dir: Path, cams, root: Path) -> Path:
    """NeRF-synthetic: transforms_train.json (camera_angle_x, no extension), RGBA train/r_i.png."""
    (root / "train").mkdir(parents=True)
    frames = []
    for i in range(NUM_VIEWS):
        rgb = np.asarray(Image.open(gt_dir / "images" / f"{i:06d}.png").convert("RGB"))
        alpha = np.asarray(Image.open(gt_dir / "masks" / f"{i:06d}.png").convert("L"))
        Image.fromarray(np.dstack([rgb, alpha])).save(root / "train" / f"r_{i}.png")
        frames.append({"file_path": f"./train/r_{i}", "rotation": 0.0,
                       "transform_matrix": (cams.c2w[i] @ GL_FROM_CV).tolist()})
    angle = 2.0 * math.atan(0.5 * WIDTH / cams.K[0, 0, 0])
    (root / "transforms_train.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames}))
    return root


def write_neuralangelo(gt_dir: Path, root: Path) -> Path:
    """Neuralangelo: transforms.json with fl_x.., w, h, sphere keys; file_path images/<name>."""
    root.mkdir(parents=True)
    shutil.copytree(gt_dir / "images", root / "images")
    data = json.loads((gt_dir / "transforms.json").read_text())
    data["aabb_scale"] = 1
    (root / "transforms.json").write_text(json.dumps(data))
    return root


def write_colmap(gt_dir: Path, cams, root: Path, model: str = "PINHOLE") -> Path:
    import pycolmap

    (root / "sparse" / "0").mkdir(parents=True)
    shutil.copytree(gt_dir / "images", root / "images")
    rec = pycolmap.Reconstruction()
    K = cams.K[0]
    camera = pycolmap.Camera.create_from_model_name(1, model, K[0, 0], WIDTH, HEIGHT)
    if model == "PINHOLE":
        camera.params = [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
    rec.add_camera_with_trivial_rig(camera)
    w2c = cams.w2c
    for i in range(NUM_VIEWS):  # ids in reverse order: the importer must sort by name
        img = pycolmap.Image(name=f"{i:06d}.png", keypoints=np.zeros((0, 2)), camera_id=1, image_id=NUM_VIEWS - i)
        rec.add_image_with_trivial_frame(img, pycolmap.Rigid3d(w2c[i][:3, :4]))
    rec.write(str(root / "sparse" / "0"))
    return root


def write_middlebury(gt_dir: Path, cams, root: Path) -> Path:
    """The Middlebury layout: photos and one ``<name>_par.txt`` (count, then file K R t per line)."""
    root.mkdir(parents=True)
    lines = [str(NUM_VIEWS)]
    for i in range(NUM_VIEWS):
        shutil.copyfile(gt_dir / "images" / f"{i:06d}.png", root / f"toySR{i:04d}.png")
        w2c = np.linalg.inv(cams.c2w[i])
        values = np.concatenate([cams.K[i].ravel(), w2c[:3, :3].ravel(), w2c[:3, 3]])
        lines.append(f"toySR{i:04d}.png " + " ".join(f"{v:.17g}" for v in values))
    (root / "toySR_par.txt").write_text("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------- round trips

def test_neus_round_trip(gt, tmp_path):
    gt_dir, cams, masks = gt
    out, summary = run_import("neus", write_neus(gt_dir, tmp_path / "dtu_scan1"), tmp_path)
    assert_cameras_match(out, cams, masks)
    assert summary["num_frames"] == NUM_VIEWS and summary["masks"] == NUM_VIEWS
    assert (out / "images" / "000003.png").read_bytes() == (gt_dir / "images" / "000003.png").read_bytes()
    sphere = load_transforms(gt_dir / "transforms.json").extra
    got = load_transforms(out / "transforms.json").extra
    np.testing.assert_allclose(got["sphere_center"], sphere["sphere_center"])
    assert got["sphere_radius"] == pytest.approx(sphere["sphere_radius"])


def test_blender_round_trip(gt, tmp_path):
    gt_dir, cams, masks = gt
    out, _ = run_import("blender", write_blender(gt_dir, cams, tmp_path / "lego"), tmp_path)
    assert_cameras_match(out, cams, masks)
    rgb = np.asarray(Image.open(out / "images" / "000002.png"))
    src = np.asarray(Image.open(gt_dir / "images" / "000002.png").convert("RGB"))
    assert rgb.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(rgb[masks[2]], src[masks[2]])
    assert np.all(rgb[~masks[2]] == 255)  # composited over white where alpha is 0
    meta = json.loads((out / "frames.json").read_text())
    assert meta["frames"][0]["source_file"] == "train/r_0.png"


def test_neuralangelo_round_trip(gt, tmp_path):
    gt_dir, cams, _ = gt
    out, _ = run_import("neuralangelo", write_neuralangelo(gt_dir, tmp_path / "scene"), tmp_path)
    assert_cameras_match(out, cams, None)
    assert "sphere_radius" in load_transforms(out / "transforms.json").extra


def test_middlebury_round_trip(gt, tmp_path):
    gt_dir, cams, _ = gt
    out, _ = run_import("middlebury", write_middlebury(gt_dir, cams, tmp_path / "toySparseRing"), tmp_path)
    assert_cameras_match(out, cams, None)
    assert "sphere_radius" not in load_transforms(out / "transforms.json").extra  # the README box is not read


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines[:1] + lines[2:], "says 8 images but 7 lines follow"),
    (lambda lines: lines[:2] + [lines[2].rsplit(" ", 1)[0]] + lines[3:], "line 3 has 21 fields"),
    (lambda lines: lines[:1] + [lines[1].replace(" 0 ", " x ", 1)] + lines[2:], "line 2 holds a value that is not"),
    (lambda lines: lines[:1] + ["../escape.png" + lines[1][len("toySR0000.png"):]] + lines[2:], "names ../escape.png"),
])
def test_middlebury_bad_par_file_names_the_line(gt, tmp_path, edit, message):
    gt_dir, cams, _ = gt
    root = write_middlebury(gt_dir, cams, tmp_path / "toySparseRing")
    par = root / "toySR_par.txt"
    par.write_text("\n".join(edit(par.read_text().splitlines())) + "\n")
    with pytest.raises(InputError, match=message):
        run_import("middlebury", root, tmp_path)


def test_colmap_round_trip_keeps_model(gt, tmp_path):
    import pycolmap

    gt_dir, cams, _ = gt
    out, _ = run_import("colmap", write_colmap(gt_dir, cams, tmp_path / "col"), tmp_path)
    assert_cameras_match(out, cams, None)
    rec = pycolmap.Reconstruction(str(out / "sparse"))
    assert sorted(img.name for img in rec.images.values()) == [f"{i:06d}.png" for i in range(NUM_VIEWS)]


def test_colmap_distorted_model_is_refused(gt, tmp_path):
    gt_dir, cams, _ = gt
    root = write_colmap(gt_dir, cams, tmp_path / "col", model="SIMPLE_RADIAL")
    with pytest.raises(InputError, match=r"SIMPLE_RADIAL.*undistort"):
        run_import("colmap", root, tmp_path)


def test_ground_truth_folder_is_copied(gt, tmp_path):
    gt_dir, cams, _ = gt
    root = write_neuralangelo(gt_dir, tmp_path / "scene")
    shutil.copytree(gt_dir, root / "gt")
    out, summary = run_import("neuralangelo", root, tmp_path)
    assert summary["gt"] and (out / "gt" / "gt_mesh.ply").is_file()
    assert json.loads((out / "frames.json").read_text())["gt"] == "gt"


# ---------------------------------------------------------------- bad inputs

def test_file_path_escaping_root_is_refused(gt, tmp_path):
    gt_dir, cams, _ = gt
    root = write_blender(gt_dir, cams, tmp_path / "data" / "lego")
    (tmp_path / "secret.png").write_bytes((root / "train" / "r_0.png").read_bytes())
    path = root / "transforms_train.json"
    data = json.loads(path.read_text())
    data["frames"][1]["file_path"] = "../../secret.png"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"transforms_train\.json.*'\.\./\.\./secret\.png'.*outside"):
        run_import("blender", root, tmp_path)


def test_nan_camera_matrix_is_refused(gt, tmp_path):
    gt_dir, cams, _ = gt
    root = write_neus(gt_dir, tmp_path / "dtu")
    arrays = dict(np.load(root / "cameras_sphere.npz"))
    arrays["world_mat_3"][1, 2] = np.nan
    np.savez(root / "cameras_sphere.npz", **arrays)
    with pytest.raises(InputError, match=r"cameras_sphere\.npz.*NaN"):
        run_import("neus", root, tmp_path)


def test_singular_and_nan_transform_matrices_are_refused(gt, tmp_path):
    gt_dir, cams, _ = gt
    root = write_neuralangelo(gt_dir, tmp_path / "scene")
    data = json.loads((root / "transforms.json").read_text())
    data["frames"][2]["transform_matrix"] = [[0.0] * 4] * 3 + [[0, 0, 0, 1]]
    (root / "transforms.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"transforms\.json.*singular"):
        run_import("neuralangelo", root, tmp_path / "a")
    data["frames"][2]["transform_matrix"] = [[float("nan")] * 4] * 4
    (root / "transforms.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"transforms\.json.*NaN"):
        run_import("neuralangelo", root, tmp_path / "b")
    arrays = dict(np.load(write_neus(gt_dir, tmp_path / "dtu") / "cameras_sphere.npz"))
    arrays["world_mat_0"] = np.zeros((4, 4))
    np.savez(tmp_path / "dtu" / "cameras_sphere.npz", **arrays)
    with pytest.raises(InputError, match=r"cameras_sphere\.npz.*singular"):
        run_import("neus", tmp_path / "dtu", tmp_path / "c")


def test_missing_or_invalid_json_names_the_file(tmp_path):
    (tmp_path / "scene").mkdir()
    with pytest.raises(InputError, match=r"scene/transforms\.json: cannot read"):
        run_import("neuralangelo", tmp_path / "scene", tmp_path)
    (tmp_path / "scene" / "transforms.json").write_text('{"frames": [')
    with pytest.raises(InputError, match=r"scene/transforms\.json: not valid JSON"):
        run_import("neuralangelo", tmp_path / "scene", tmp_path / "b")


def test_unknown_format_suggests_the_nearest(tmp_path):
    with pytest.raises(InputError, match="did you mean 'blender'"):
        importers.run("blendr", tmp_path, tmp_path, ctx())
