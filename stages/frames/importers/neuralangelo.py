"""Neuralangelo scenes: ``transforms.json`` with ``fl_x, fl_y, cx, cy, w, h`` (file-wide or per
frame), OpenGL camera-to-world ``transform_matrix``, file_path relative to the scene root, and
optional ``sphere_center`` / ``sphere_radius``. Distortion coefficients must be zero.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.dag import Context
from pipeline.errors import InputError
from stages.frames.importers.common import (DatasetScene, as_number, find_image, image_size, read_json, sphere_extra,
                              transforms_cameras, transforms_frames)

DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


def load(root: Path, ctx: Context) -> DatasetScene:
    path = root / "transforms.json"
    data = read_json(path)
    frames = transforms_frames(data, path)
    images = [find_image(root, root, f.get("file_path"), path) for f in frames]
    if "w" in data and "h" in data:
        width, height = int(as_number(data["w"], "w", path)), int(as_number(data["h"], "h", path))
    else:
        width, height = image_size(images[0])
    for key in DISTORTION_KEYS:
        if key in data and abs(as_number(data[key], key, path)) > 1e-9:
            raise InputError(f"{path}: distortion {key}={data[key]} is not supported; undistort the "
                             "images first (e.g. COLMAP image_undistorter) or use --images")
    K, c2w = transforms_cameras(data, frames, width, height, path)
    ctx.log.info("neuralangelo: %d cameras from %s", len(images), path)
    return DatasetScene(images, K, c2w, width, height, extra=sphere_extra(data, path))
