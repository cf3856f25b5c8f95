"""Dataset importers: a scene that already holds images (+ cameras, masks) -> a frames/ folder.

``run(fmt, dataset_dir, out_dir, ctx)`` dispatches to ``stages.importers.<fmt>.load``, which
returns a ``DatasetScene``; ``write_scene`` then writes what the frames stage promises:
``images/000000.<jpg|png>`` (JPEG and PNG bytes copied as they are; RGBA composited over white),
``frames.json``, ``transforms.json`` (``pipeline.cameras.save_transforms``, file_path
``images/<name>``), ``masks/<stem>.png`` (uint8 0/255) when the dataset has masks, and ``gt/``
when the dataset carries a ground-truth mesh in ``<dataset>/gt/``. 16-bit and float images are
brought to 8 bits (``stages.frames.to_8bit``). Every image and mask is checked before anything is
written: its real path lies inside the dataset folder (a symbolic link out of it is refused), its
header is readable, of the scene's size and small enough to decode (``frames.MAX_DECODE_BYTES``).
"""
from __future__ import annotations

import difflib
import importlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.cameras import Cameras, cv_from_gl, intrinsics
from pipeline.dag import Context
from pipeline.errors import InputError
from stages.frames import MAX_DECODE_BYTES, copy_input_tree, decode_bytes, describe, open_image, to_8bit

FORMATS = ("neus", "blender", "neuralangelo", "colmap", "omniobject3d_blender", "omniobject3d_video")
# Formats whose reader is not ``stages.importers.<fmt>.load``: format -> (module, function).
READERS = {"omniobject3d_blender": ("omniobject3d", "load_blender"),
           "omniobject3d_video": ("omniobject3d", "load_video")}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MESH_SUFFIXES = (".ply", ".obj", ".stl", ".off", ".glb")


@dataclass
class DatasetScene:
    """What a format reader found. ``c2w`` in OpenCV axes; paths are absolute, in frame order."""

    images: list[Path]
    K: np.ndarray
    c2w: np.ndarray
    width: int
    height: int
    masks: list[Path] | None = None  # one mask image per frame (any channel count; > 127 is object)
    mask_from_alpha: bool = False  # RGBA images: the alpha channel is the mask
    extra: dict = field(default_factory=dict)  # sphere_center / sphere_radius from the dataset
    finish: Callable[[Path, list[str]], dict] | None = None  # extra outputs, given the new names


def run(fmt: str, dataset_dir: Path, out_dir: Path, ctx: Context) -> dict:
    """Import the dataset scene ``dataset_dir`` of format ``fmt`` into ``out_dir`` (frames/)."""
    if fmt not in FORMATS:
        near = difflib.get_close_matches(str(fmt), FORMATS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise InputError(f"unknown dataset format '{fmt}'{hint} (known: {', '.join(FORMATS)})")
    root = Path(os.path.abspath(dataset_dir))
    if not root.is_dir():
        raise InputError(f"dataset folder not found: {root}")
    module_name, reader = READERS.get(fmt, (fmt, "load"))
    scene = getattr(importlib.import_module(f"stages.importers.{module_name}"), reader)(root, ctx)
    return write_scene(scene, root, fmt, Path(out_dir), ctx)


# ---------------------------------------------------------------- helpers the readers share

def read_json(path: Path) -> dict:
    """Parse a JSON object; a missing or invalid file is an InputError naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise InputError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    return data


def resolve_inside(root: Path, base: Path, rel: str, owner: Path) -> Path:
    """``base / rel`` normalised; it must stay inside ``root`` (no ``../`` or absolute escapes),
    lexically and, through symbolic links, by its real path (``check_real_inside``)."""
    if not isinstance(rel, str) or not rel:
        raise InputError(f"{owner}: a file_path is missing or not a string ({rel!r})")
    path = Path(os.path.normpath(Path(base) / rel))
    if not path.is_relative_to(Path(os.path.normpath(root))):
        raise InputError(f"{owner}: file_path '{rel}' points outside the dataset folder {root}")
    check_real_inside(root, path)
    return path


def check_real_inside(root: Path, path: Path) -> None:
    """``path`` (inside ``root`` by name) must not lead out of ``root`` through a symbolic link:
    the error names the link. Links that stay inside the dataset are fine."""
    real_root = Path(os.path.realpath(root))
    if Path(os.path.realpath(path)).is_relative_to(real_root):
        return
    link = Path(os.path.normpath(root))
    inside = Path(os.path.normpath(path))
    for part in inside.relative_to(link).parts if inside.is_relative_to(link) else ():
        link = link / part
        if link.is_symlink() and not Path(os.path.realpath(link)).is_relative_to(real_root):
            break
    raise InputError(f"{link}: a symbolic link to {os.path.realpath(link)}, outside the dataset folder {root}; "
                     "copy what it points to into the dataset")


def find_image(root: Path, base: Path, rel: str, owner: Path) -> Path:
    """The image a ``file_path`` names; a path without extension tries the usual ones."""
    path = resolve_inside(root, base, rel, owner)
    if path.is_file():
        return path
    for suffix in IMAGE_SUFFIXES:
        cand = path.with_name(path.name + suffix)
        if cand.is_file():
            return cand
    raise InputError(f"{owner}: image '{rel}' not found (looked for {path} with and without an extension)")


def list_images(folder: Path, root: Path | None = None) -> list[Path]:
    """The image files in ``folder``, sorted; with ``root``, none may lead out of it (a link)."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for path in found if root is not None else []:
        check_real_inside(root, path)
    return found


def image_header(path: Path, what: str = "image") -> tuple[int, int]:
    """The (width, height) of an image from its header; an unreadable file, or one too large to
    decode in memory (``frames.MAX_DECODE_BYTES``, 16-bit and float samples counted), is an
    InputError naming it."""
    try:
        with open_image(path) as img:
            if decode_bytes(img) > MAX_DECODE_BYTES:
                raise InputError(f"{path}: {what} is a {describe(img)}, too large to decode in memory "
                                 f"({decode_bytes(img) >> 20} MB, limit {MAX_DECODE_BYTES >> 20} MB)")
            return img.size
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise InputError(f"{path}: {what} is not a readable image ({exc})") from None


def image_size(path: Path) -> tuple[int, int]:
    return image_header(path)


def check_cameras(K: np.ndarray, c2w: np.ndarray, path: Path) -> None:
    """NaN/inf values, non-positive focal lengths or singular rotations name the camera file."""
    if not (np.all(np.isfinite(K)) and np.all(np.isfinite(c2w))):
        raise InputError(f"{path}: a camera matrix contains NaN or infinite values")
    if np.any(K[:, 0, 0] <= 0) or np.any(K[:, 1, 1] <= 0):
        raise InputError(f"{path}: a camera has a non-positive focal length")
    det = np.linalg.det(c2w[:, :3, :3])
    if np.any(np.abs(det) < 1e-6):
        bad = int(np.argmin(np.abs(det)))
        raise InputError(f"{path}: the camera matrix of frame {bad} is singular")


def as_number(value, what: str, path: Path) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{path}: {what} is not a number ({value!r})") from None
    if not math.isfinite(out):
        raise InputError(f"{path}: {what} is NaN or infinite")
    return out


def frame_intrinsics(data: dict, frame: dict, w: int, h: int, path: Path, index: int = 0) -> np.ndarray:
    """instant-ngp / NeRF-synthetic intrinsics: per-frame keys override file keys."""
    def get(key):
        return frame.get(key, data.get(key))

    def focal(key: str, size: int) -> float:
        where = f"frame {index} {key}" if key in frame else key
        angle = as_number(get(key), where, path)
        if not 0.0 < angle < math.pi:
            raise InputError(f"{path}: {where} is {angle:g}; expected the field of view in radians, between 0 "
                             "and pi")
        return 0.5 * size / math.tan(0.5 * angle)

    if get("fl_x") is not None:
        fx = as_number(get("fl_x"), "fl_x", path)
    elif get("camera_angle_x") is not None:
        fx = focal("camera_angle_x", w)
    else:
        raise InputError(f"{path}: no focal length (fl_x or camera_angle_x)")
    if get("fl_y") is not None:
        fy = as_number(get("fl_y"), "fl_y", path)
    elif get("camera_angle_y") is not None:
        fy = focal("camera_angle_y", h)
    else:
        fy = fx
    cx = as_number(get("cx"), "cx", path) if get("cx") is not None else w / 2.0
    cy = as_number(get("cy"), "cy", path) if get("cy") is not None else h / 2.0
    return intrinsics(fx, fy, cx, cy)


def transforms_frames(data: dict, path: Path) -> list[dict]:
    frames = data.get("frames")
    if not isinstance(frames, list) or not frames or not all(isinstance(f, dict) for f in frames):
        raise InputError(f"{path}: 'frames' must be a non-empty list of objects")
    return frames


def transforms_cameras(data: dict, frames: list[dict], w: int, h: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(K, c2w in OpenCV axes) of instant-ngp style frames whose transform_matrix is OpenGL c2w."""
    Ks, c2ws = [], []
    for i, frame in enumerate(frames):
        try:
            mat = np.asarray(frame["transform_matrix"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: frame {i} has no valid transform_matrix") from None
        if mat.shape == (3, 4):
            mat = np.vstack([mat, [0.0, 0.0, 0.0, 1.0]])
        if mat.shape != (4, 4):
            raise InputError(f"{path}: frame {i} transform_matrix has shape {mat.shape}, expected 4x4")
        Ks.append(frame_intrinsics(data, frame, w, h, path, i))
        c2ws.append(cv_from_gl(mat))
    K, c2w = np.stack(Ks), np.stack(c2ws)
    check_cameras(K, c2w, path)
    return K, c2w


def sphere_extra(data: dict, path: Path) -> dict:
    """Optional ``sphere_center`` / ``sphere_radius`` keys, validated."""
    out = {}
    if "sphere_center" in data and "sphere_radius" in data:
        center = np.asarray(data["sphere_center"], dtype=np.float64)
        radius = as_number(data["sphere_radius"], "sphere_radius", path)
        if center.shape != (3,) or not np.all(np.isfinite(center)) or radius <= 0:
            raise InputError(f"{path}: sphere_center must be 3 numbers and sphere_radius positive")
        out = {"sphere_center": center.tolist(), "sphere_radius": radius}
    return out


def check_files(scene: DatasetScene, root: Path) -> None:
    """Every image and mask (before anything is written): inside the dataset by its real path,
    a readable header, the scene's size, small enough to decode."""
    for path in scene.images:
        check_real_inside(root, path)
        size = image_header(path)
        if size != (scene.width, scene.height):
            raise InputError(f"{path}: image is {size[0]}x{size[1]}, expected {scene.width}x{scene.height} like "
                             "the others; all frames of a dataset scene must share one size")
    for path in scene.masks or []:
        check_real_inside(root, path)
        size = image_header(path, "mask")
        if size != (scene.width, scene.height):
            raise InputError(f"{path}: mask is {size[0]}x{size[1]}, expected {scene.width}x{scene.height}")


# ---------------------------------------------------------------- writing frames/

def _decoded(path: Path, what: str, convert: Callable):
    """``convert(image with 8-bit samples)`` of one image; a decoder failure names the file."""
    try:
        with open_image(path) as img:
            return convert(to_8bit(img, path))
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or damaged pixel data
        raise InputError(f"{path}: {what} cannot be decoded ({exc})") from None


def _png_bit_depth(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 and head[12:16] == b"IHDR" else 0


def _write_image(src: Path, dest_stem: Path, from_alpha: bool) -> tuple[str, np.ndarray | None]:
    """Copy one image (8-bit RGB/grey PNG and JPEG bytes as they are), else decode it, bring it to
    8 bits and composite RGBA over white; returns (file name, alpha mask or None)."""
    from PIL import Image

    suffix = src.suffix.lower()
    with open_image(src) as img:
        has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
        plain_png = suffix == ".png" and img.mode in ("RGB", "L") and _png_bit_depth(src) == 8
        if suffix in (".jpg", ".jpeg") or (plain_png and not has_alpha):
            dest = dest_stem.with_suffix(".jpg" if suffix != ".png" else ".png")
            shutil.copyfile(src, dest)
            return dest.name, None
    rgba = _decoded(src, "image", lambda im: np.asarray(im.convert("RGBA")))
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255  # over white, rounded
    dest = dest_stem.with_suffix(".png")
    Image.fromarray(rgb.astype(np.uint8)).save(dest)
    mask = (rgba[..., 3] > 127) if (from_alpha and has_alpha) else None
    return dest.name, mask


def _read_mask(path: Path, width: int, height: int) -> np.ndarray:
    def convert(img):
        return np.asarray(img.convert("RGBA") if img.mode in ("RGBA", "LA") else img.convert("L"))

    arr = _decoded(path, "mask", convert)
    if (arr.shape[1], arr.shape[0]) != (width, height):
        raise InputError(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]}, expected {width}x{height}")
    return (arr[..., 3] > 127) if arr.ndim == 3 else (arr > 127)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)


def _copy_gt(root: Path, out_dir: Path) -> bool:
    from pipeline.store import input_files

    gt = root / "gt"
    if not gt.is_dir() or not any(p.suffix.lower() in MESH_SUFFIXES for p in input_files(gt)):
        return False
    copy_input_tree(gt, out_dir / "gt")
    return True


def write_scene(scene: DatasetScene, root: Path, fmt: str, out_dir: Path, ctx: Context) -> dict:
    """Write images/, masks/, frames.json, transforms.json (and gt/) for ``scene``."""
    from pipeline.cameras import save_transforms

    n = len(scene.images)
    if n < 2:
        raise InputError(f"{root}: a dataset scene needs at least 2 images, found {n}")
    check_files(scene, root)
    img_dir, mask_dir = out_dir / "images", out_dir / "masks"
    img_dir.mkdir(parents=True, exist_ok=True)
    names, records, num_masks = [], [], 0
    for i, src in enumerate(scene.images):
        name, alpha = _write_image(src, img_dir / f"{i:06d}", scene.mask_from_alpha)
        mask = _read_mask(scene.masks[i], scene.width, scene.height) if scene.masks else alpha
        if mask is not None:
            mask_dir.mkdir(exist_ok=True)
            _save_mask(mask, mask_dir / f"{i:06d}.png")
            num_masks += 1
        names.append(name)
        records.append({"file": f"images/{name}", "source_file": src.relative_to(root).as_posix()})
    if 0 < num_masks < n:
        raise InputError(f"{root}: only {num_masks} of {n} images carry a mask (alpha channel); "
                         "give every image a mask or none")
    cams = Cameras([f"images/{name}" for name in names], scene.K, scene.c2w, scene.width, scene.height)
    save_transforms(out_dir / "transforms.json", cams, extra=scene.extra)
    meta = {"source_kind": "dataset", "format": fmt, "width": scene.width, "height": scene.height,
            "num_source_frames": n, "masks": "masks" if num_masks else "", "frames": records}
    if _copy_gt(root, out_dir):
        meta["gt"] = "gt"
    summary = scene.finish(out_dir, names) if scene.finish else {}
    if (out_dir / "gt").is_dir():  # finish() may bring the ground truth (OmniObject3D scans)
        meta["gt"] = "gt"
    (out_dir / "frames.json").write_text(json.dumps(meta, indent=1) + "\n")
    ctx.log.info("imported %d %s frames (%dx%d), %d masks%s", n, fmt, scene.width, scene.height,
                 num_masks, ", ground truth" if "gt" in meta else "")
    return {"num_frames": n, "width": scene.width, "height": scene.height, "source_kind": "dataset",
            "format": fmt, "num_source_frames": n, "masks": num_masks, "gt": "gt" in meta, **summary}
