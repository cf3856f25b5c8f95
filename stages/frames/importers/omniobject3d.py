"""OmniObject3D scenes (github.com/omniobject3d/OmniObject3D): two layouts and their raw scan.

``omniobject3d_blender`` = ``blender_renders/<cat>/<obj>/render/{images/r_<i>.png, transforms.json}``,
written by OmniObject3D's ``tools/blender_script.py``: NeRF-synthetic ``camera_angle_x`` and OpenGL
camera-to-world ``transform_matrix``; ``file_path`` is ``r_<i>`` (older renders: an absolute path of
the rendering machine) and the image lies in ``images/``; RGBA, alpha = mask. Every frame stores the
same ``scale``. Its meaning (that script and ``tools/mesh_eval.py``): Blender's OBJ import turns the
scan's Y-up axes into Z-up, A: (x, y, z) -> (x, -z, y), then scales the object about the origin by
``scale = 0.99 / max |scan vertex coordinate|`` (no translation), so X_render = scale * A @ X_scan
(mesh_eval.py maps the scan into the render frame the same way before its Chamfer distance). We apply
the inverse to the cameras, R_scan = A^T R, c_scan = A^T c / scale: they end up in the raw scan's
frame, and the scan is the ground truth as it is (``gt.json``: ``"aligned": true``).

``omniobject3d_video`` = ``videos_processed/<cat>/<obj>/standard/{images/, matting/ (or segs/,
masks/), poses_bounds.npy, sparse/}``. Cameras come from ``sparse/`` when it holds an undistorted
pinhole COLMAP model: it names the image of every pose and keeps fx, fy, cx, cy (and its points are
copied to ``frames/sparse/``), while ``poses_bounds.npy`` is LLFF's digest of that same COLMAP run that
pairs poses with the sorted image names by position and keeps one focal length. Else (no sparse/, or a
distorted model, whose distortion LLFF ignores too) ``poses_bounds.npy``, paired with the sorted names
of the model's posed images when a model is readable (else with the sorted images/ files): N rows of
17 = a 3x5 matrix [R | t | hwf] whose rotation columns are LLFF's [down, right, back] camera axes, then
near, far. OpenCV camera-to-world = [col 1, col 0, -col 2 | t]; K = (f, f, w/2, h/2) scaled from hwf's
h x w to the image size. These cameras live in COLMAP's arbitrary similarity frame, not the scan's
(``"aligned": false``: the evaluation must fit a similarity, e.g. by ICP, before scoring).
``poses_bounds_rescaled.npy`` is not read.

Ground truth: when ``ctx.source.gt`` names the raw scan folder (``raw_scans/<cat>/<obj>/Scan``), its
files are copied to ``gt/`` with ``gt_mesh.ply`` (Scan.obj as one welded mesh, scan frame) and
``gt.json`` (``aligned``, ``render_scale``, ``render_from_scan``, ``cameras``).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from pipeline.cameras import intrinsics
from pipeline.dag import Context
from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_json
from stages.frames.images import copy_input_tree
from pipeline.images import IMAGE_SUFFIXES
from stages.frames.importers.common import (DatasetScene, as_number, check_cameras, find_image, image_size,
                              list_images, read_json, resolve_inside, transforms_cameras, transforms_frames)

SCAN_FROM_RENDER_AXES = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # A^T
SCALE_RTOL = 1e-6  # frames of one render must agree on ``scale`` to this relative tolerance
MASK_DIRS = ("matting", "segs", "masks")
FIT_NOTE = "fit a similarity to the scan (e.g. ICP with scale) before scoring"


# ---------------------------------------------------------------- blender_renders

def load_blender(root: Path, ctx: Context) -> DatasetScene:
    path = root / "transforms.json"
    data = read_json(path)
    frames = transforms_frames(data, path)
    images = [render_image(root, f.get("file_path"), path) for f in frames]
    width, height = image_size(images[0])
    K, c2w = transforms_cameras(data, frames, width, height, path)
    scale = render_scale(frames, path)
    info: dict = {"split": "blender", "cameras": "transforms.json"}
    if scale is None:
        ctx.log.warning("omniobject3d: %s has no per-frame 'scale': cameras stay in the render frame, "
                        "which is not aligned with the raw scan", path)
        info.update(aligned=False, alignment="render frame, no 'scale' to reach the scan's: " + FIT_NOTE)
    else:
        c2w = scan_from_render(c2w, scale)
        check_cameras(K, c2w, path)
        info.update(aligned=True, render_scale=scale, render_from_scan=render_from_scan(scale).tolist())
    ctx.log.info("omniobject3d blender: %d cameras from %s (scale %s)", len(images), path, scale)
    return DatasetScene(images, K, c2w, width, height, mask_from_alpha=True, finish=gt_finish(ctx, info))


def render_image(root: Path, rel, owner: Path) -> Path:
    """The image of a ``file_path``: ``images/<its last part>`` (with or without extension), else the path."""
    if not isinstance(rel, str) or not rel:
        raise InputError(f"{owner}: a file_path is missing or not a string ({rel!r})")
    name = PurePosixPath(rel.replace("\\", "/")).name
    try:
        return find_image(root, root / "images", name, owner)
    except InputError:
        if PurePosixPath(rel).is_absolute():
            raise
        return find_image(root, root, rel, owner)


def render_scale(frames: list[dict], path: Path) -> float | None:
    """The one ``scale`` all frames carry, or None when none has it."""
    values = [f.get("scale") for f in frames]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise InputError(f"{path}: only some frames carry a 'scale'; OmniObject3D stores it in every frame")
    nums = np.array([as_number(v, f"frame {i} scale", path) for i, v in enumerate(values)])
    if nums.min() <= 0:
        raise InputError(f"{path}: a frame's 'scale' is not positive ({nums.min()})")
    if nums.max() - nums.min() > SCALE_RTOL * nums.max():
        raise InputError(f"{path}: frames disagree on 'scale' ({nums.min():.9g} .. {nums.max():.9g}); "
                         "one render of an object has one scale")
    return float(nums[0])


def render_from_scan(scale: float) -> np.ndarray:
    """The similarity X_render = scale * A @ X_scan of OmniObject3D's Blender renders (4x4)."""
    T = np.eye(4)
    T[:3, :3] = scale * SCAN_FROM_RENDER_AXES.T
    return T


def scan_from_render(c2w: np.ndarray, scale: float) -> np.ndarray:
    """Camera-to-world (N, 4, 4, OpenCV axes) from the render frame into the raw scan's frame."""
    out = np.array(c2w, dtype=np.float64, copy=True)
    out[:, :3, :3] = SCAN_FROM_RENDER_AXES @ c2w[:, :3, :3]
    out[:, :3, 3] = c2w[:, :3, 3] @ SCAN_FROM_RENDER_AXES.T / scale
    return out


# ---------------------------------------------------------------- videos_processed

def load_video(root: Path, ctx: Context) -> DatasetScene:
    import stages.frames.importers.colmap as colmap

    if not (root / "images").is_dir():
        raise InputError(f"{root}: no images/ folder (OmniObject3D videos_processed/<cat>/<obj>/standard)")
    llff = root / "poses_bounds.npy"
    scene, cameras = None, ""
    if (root / "sparse").is_dir():
        try:
            scene, cameras = colmap.load(root, ctx), "sparse"
        except InputError as exc:
            if not llff.is_file():
                raise
            ctx.log.warning("omniobject3d: sparse/ not usable (%s); using poses_bounds.npy (LLFF: any lens "
                            "distortion is ignored)", exc)
    if scene is None:
        if not llff.is_file():
            raise InputError(f"{root}: no cameras: neither a COLMAP model in sparse/ nor poses_bounds.npy")
        scene, cameras = llff_scene(root, llff, registered_names(root)), "poses_bounds"
    scene.masks = video_masks(root, scene.images, ctx)
    info = {"split": "video", "cameras": cameras, "aligned": False,
            "alignment": "COLMAP's arbitrary similarity frame: " + FIT_NOTE}
    scene.finish = chain(scene.finish, gt_finish(ctx, info))
    ctx.log.info("omniobject3d video: %d cameras from %s, %s masks", len(scene.images), cameras,
                 "with" if scene.masks else "no")
    return scene


def read_poses_bounds(path: Path) -> np.ndarray:
    """LLFF ``poses_bounds.npy`` as an (N, 17) float64 array."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    if arr.ndim != 2 or arr.shape[1] != 17 or len(arr) == 0:
        raise InputError(f"{path}: expected an N x 17 array (LLFF poses_bounds), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise InputError(f"{path}: poses_bounds holds non-numeric, NaN or infinite values")
    return arr.astype(np.float64)


def llff_cameras(arr: np.ndarray, width: int, height: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(K, c2w in OpenCV axes) from LLFF rows for images of ``width`` x ``height``."""
    poses = arr[:, :15].reshape(-1, 3, 5)
    h, w, f = poses[:, 0, 4], poses[:, 1, 4], poses[:, 2, 4]
    if np.any(h <= 0) or np.any(w <= 0):
        raise InputError(f"{path}: a pose has a non-positive image size in its hwf column")
    sx, sy = width / w, height / h
    if np.any(np.abs(sx - sy) > 0.01 * sx):
        raise InputError(f"{path}: the poses are for {w[0]:g}x{h[0]:g} images but images/ holds "
                         f"{width}x{height} ones (another aspect ratio)")
    c2w = np.tile(np.eye(4), (len(poses), 1, 1))
    c2w[:, :3, 0] = poses[:, :, 1]  # right
    c2w[:, :3, 1] = poses[:, :, 0]  # down
    c2w[:, :3, 2] = -poses[:, :, 2]  # forward = -back
    c2w[:, :3, 3] = poses[:, :, 3]
    K = np.stack([intrinsics(f[i] * sx[i], f[i] * sy[i], width / 2.0, height / 2.0) for i in range(len(poses))])
    check_cameras(K, c2w, path)
    return K, c2w


def registered_names(root: Path) -> list[str] | None:
    """Sorted names of the posed images of the COLMAP model in sparse/ (whatever its camera
    model): LLFF wrote one row per such image, in this order. None without a readable model."""
    import pycolmap

    from stages.frames.importers.colmap import find_model

    try:
        rec = pycolmap.Reconstruction(str(find_model(root)))
    except Exception:  # no model, or pycolmap's ValueError/RuntimeError on a bad one
        return None
    return sorted(img.name for img in rec.images.values() if img.has_pose) or None


def llff_scene(root: Path, path: Path, names: list[str] | None = None) -> DatasetScene:
    """Cameras of ``poses_bounds.npy`` paired with ``names`` (else the sorted images/ files)."""
    arr = read_poses_bounds(path)
    if names is not None and len(names) == len(arr):
        images = [resolve_inside(root, root / "images", n, path) for n in names]
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise InputError(f"{path}: {len(missing)} registered images are missing (first: {missing[0]})")
    else:
        images = list_images(root / "images", root)
    if len(images) != len(arr):
        raise InputError(f"{path}: {len(arr)} poses for {len(images)} images in {root / 'images'}; LLFF pairs "
                         "them by sorted name, so the counts must match (or give a COLMAP model in sparse/)")
    width, height = image_size(images[0])
    K, c2w = llff_cameras(arr, width, height, path)
    return DatasetScene(images, K, c2w, width, height)


def video_masks(root: Path, images: list[Path], ctx: Context) -> list[Path] | None:
    """One mask per image from the first of matting/, segs/, masks/, paired by image stem."""
    mask_dir = next((root / n for n in MASK_DIRS if (root / n).is_dir()), None)
    if mask_dir is None:
        return None
    by_stem = {}
    for p in sorted(mask_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(p.stem, p)
            by_stem.setdefault(p.name, p)  # "<image name>.png"
    found = [by_stem.get(img.stem) or by_stem.get(img.name + ".png") for img in images]
    if not all(found):
        missing = sum(p is None for p in found)
        ctx.log.warning("omniobject3d: %s lacks a mask for %d of %d images; importing without masks",
                        mask_dir, missing, len(images))
        return None
    return found


# ---------------------------------------------------------------- ground truth

def chain(*finishers: Callable | None) -> Callable[[Path, list[str]], dict] | None:
    """One ``finish`` hook that runs the given ones in order and merges their summaries."""
    todo = [f for f in finishers if f is not None]
    if not todo:
        return None

    def finish(out_dir: Path, names: list[str]) -> dict:
        out: dict = {}
        for f in todo:
            out.update(f(out_dir, names) or {})
        return out

    return finish


def gt_finish(ctx: Context, info: dict) -> Callable[[Path, list[str]], dict] | None:
    """A ``finish`` hook writing ``gt/`` from ``ctx.source.gt`` (the raw scan folder), if any."""
    if ctx.source is None or not ctx.source.gt:
        return None
    scan_dir = Path(ctx.source.gt)

    def finish(out_dir: Path, names: list[str]) -> dict:
        return write_ground_truth(scan_dir, Path(out_dir) / "gt", info)

    return finish


def find_scan(scan_dir: Path) -> Path:
    if not scan_dir.is_dir():
        raise InputError(f"ground-truth folder not found: {scan_dir}")
    scan = scan_dir / "Scan.obj"
    if scan.is_file():
        return scan
    found = sorted(p for p in scan_dir.iterdir() if p.suffix.lower() == ".obj")
    if not found:
        raise InputError(f"{scan_dir}: no Scan.obj (an OmniObject3D raw_scans/<cat>/<obj>/Scan folder)")
    return found[0]


def write_ground_truth(scan_dir: Path, gt_dir: Path, info: dict) -> dict:
    """Copy the scan folder to ``gt_dir`` and add ``gt_mesh.ply`` (welded, scan frame) + ``gt.json``."""
    import trimesh

    scan = find_scan(scan_dir)
    try:
        loaded = trimesh.load(scan, force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types on bad files
        raise InputError(f"{scan}: cannot read the raw scan ({type(exc).__name__}: {exc})") from None
    if len(getattr(loaded, "faces", [])) == 0:
        raise InputError(f"{scan}: the raw scan has no faces")
    mesh = trimesh.Trimesh(np.asarray(loaded.vertices, np.float64), np.asarray(loaded.faces), process=False)
    mesh.merge_vertices()  # the OBJ repeats vertices along UV seams
    copy_input_tree(scan_dir, gt_dir)  # the files its fingerprint covers
    mesh.export(gt_dir / "gt_mesh.ply")
    lo, hi = mesh.vertices.min(0), mesh.vertices.max(0)
    data = {"dataset": "omniobject3d", "scan": scan.name, "mesh": "gt_mesh.ply",
            "frame": "raw scan (Scan.obj coordinates)", "transform": np.eye(4).tolist(),
            "object_bounds": [lo.tolist(), hi.tolist()], **info}
    atomic_write_json(gt_dir / "gt.json", data)
    return {"gt_faces": int(len(mesh.faces)), "gt_aligned": bool(info.get("aligned"))}
