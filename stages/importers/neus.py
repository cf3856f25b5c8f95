"""IDR/NeuS scenes as DTU is distributed: ``cameras_sphere.npz`` + ``image/`` (or ``images/``)
+ optional ``mask/`` (or ``masks/``). Image i (sorted by name) has ``world_mat_i``; masks pair
with images by sorted order (DTU names them ``000.png`` next to ``000000.png``).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from pipeline.cameras import load_neus_npz
from pipeline.dag import Context
from pipeline.errors import InputError
from stages.importers import DatasetScene, check_cameras, image_size, list_images


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def load(root: Path, ctx: Context) -> DatasetScene:
    npz = root / "cameras_sphere.npz"
    if not npz.is_file():
        raise InputError(f"{npz}: not found; a NeuS/IDR scene needs cameras_sphere.npz next to image/")
    img_dir = _first_dir(root, ("image", "images"))
    if img_dir is None:
        raise InputError(f"{root}: no image/ or images/ folder")
    images = list_images(img_dir)
    if not images:
        raise InputError(f"{img_dir}: no images")
    width, height = image_size(images[0])
    with open(npz, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # np.load would take anything else for a pickle
            raise InputError(f"{npz}: not an .npz archive (a zip of arrays); re-export the cameras")
    try:
        cams, scale = load_neus_npz(npz, [p.name for p in images], width, height)
    except (zipfile.BadZipFile, EOFError):
        raise InputError(f"{npz}: damaged or cut-off .npz archive; re-export the cameras") from None
    except (np.linalg.LinAlgError, ValueError, ZeroDivisionError):
        raise InputError(f"{npz}: a world_mat is singular and cannot be decomposed") from None
    check_cameras(cams.K, cams.c2w, npz)
    masks = None
    mask_dir = _first_dir(root, ("mask", "masks"))
    if mask_dir is not None:
        masks = list_images(mask_dir)
        if len(masks) != len(images):
            raise InputError(f"{mask_dir}: {len(masks)} masks for {len(images)} images in {img_dir}")
    extra = {}
    if np.all(np.isfinite(scale)) and scale[0, 0] > 0 and not np.allclose(scale, np.eye(4)):
        extra = {"sphere_center": scale[:3, 3].tolist(), "sphere_radius": float(scale[0, 0])}
    ctx.log.info("neus: %d cameras from %s", len(images), npz)
    return DatasetScene(images, cams.K, cams.c2w, width, height, masks=masks, extra=extra)
