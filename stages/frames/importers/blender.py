"""NeRF-synthetic / Blender scenes: ``transforms.json`` (else ``transforms_train.json``) with
``camera_angle_x`` (or ``fl_x``...) and OpenGL camera-to-world ``transform_matrix``; file_path is
relative to the JSON's folder and may omit the extension. RGBA images: alpha is the mask and the
colour is composited over white.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.dag import Context
from pipeline.errors import InputError
from stages.frames.importers.common import (DatasetScene, find_image, image_size, read_json, sphere_extra,
                              transforms_cameras, transforms_frames)


def load(root: Path, ctx: Context) -> DatasetScene:
    path = next((root / n for n in ("transforms.json", "transforms_train.json") if (root / n).is_file()), None)
    if path is None:
        raise InputError(f"{root}: no transforms.json or transforms_train.json")
    data = read_json(path)
    frames = transforms_frames(data, path)
    images = [find_image(root, path.parent, f.get("file_path"), path) for f in frames]
    width, height = image_size(images[0])
    K, c2w = transforms_cameras(data, frames, width, height, path)
    ctx.log.info("blender: %d cameras from %s", len(images), path)
    return DatasetScene(images, K, c2w, width, height, mask_from_alpha=True, extra=sphere_extra(data, path))
