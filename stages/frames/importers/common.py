"""What the dataset readers share: the scene they return (DatasetScene), paths checked to stay inside
the dataset (by real path), image headers, camera checks, Blender/Neuralangelo transforms.json parsing."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.cameras import cv_from_gl, intrinsics
from pipeline.errors import InputError
from pipeline.images import IMAGE_SUFFIXES, MAX_DECODE_BYTES, decode_bytes, describe, open_image



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
    decode in memory (``pipeline.images.MAX_DECODE_BYTES``, 16-bit and float samples counted), is an
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
