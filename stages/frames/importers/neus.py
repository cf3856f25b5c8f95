"""IDR/NeuS scenes as DTU is distributed: ``cameras_sphere.npz`` + ``image/`` (or ``images/``)
+ optional ``mask/`` (or ``masks/``). Image i (sorted by name) has ``world_mat_i``; masks pair
with images by sorted order (DTU names them ``000.png`` next to ``000000.png``).

The archive's members are checked on their ``.npy`` headers before any is loaded: ``world_mat_i``
and ``scale_mat_i`` must be 4x4 (or 3x4) numeric matrices, so a member that would inflate to
gigabytes (or claims to) is refused by its shape; members of other names are never read.
"""
from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from pipeline.cameras import load_neus_npz
from pipeline.dag import Context
from pipeline.errors import InputError
from stages.frames.importers.common import DatasetScene, check_cameras, image_size, list_images

MATRIX_SHAPES = ((4, 4), (3, 4))
NUMERIC_KINDS = "iuf"  # numpy dtype kinds a camera matrix may have (no bool, complex, str, object)
CAMERA_KEY = re.compile(r"(world|scale)_mat_\d+")  # not DTU's world_mat_inv_i / scale_mat_inv_i


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def npz_headers(npz: Path) -> dict[str, tuple[tuple, np.dtype]]:
    """(shape, dtype) of every ``.npy`` member of an ``.npz`` archive, read from the headers only."""
    out = {}
    with zipfile.ZipFile(npz) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            try:
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
            except (ValueError, EOFError, zlib.error) as exc:
                raise InputError(f"{npz}: {key} is not a valid .npy array ({exc})") from None
            out[key] = (shape, dtype)
    return out


def check_matrices(npz: Path, count: int, images: list[Path]) -> None:
    """``world_mat_0 .. world_mat_<count-1>`` exist and, like every ``scale_mat_i``, are 4x4 or
    3x4 numeric matrices (checked on the headers, nothing is loaded)."""
    headers = npz_headers(npz)
    missing = [i for i in range(count) if f"world_mat_{i}" not in headers]
    if missing:
        i = missing[0]
        raise InputError(f"{npz}: no world_mat_{i} for image {images[i].name} (the archive has "
                         f"{count - len(missing)} of the {count} world_mat_i the images need)")
    for key, (shape, dtype) in headers.items():
        if not CAMERA_KEY.fullmatch(key):
            continue
        if dtype.kind not in NUMERIC_KINDS:
            raise InputError(f"{npz}: {key} is not numeric (dtype {dtype}); expected a 4x4 matrix of numbers")
        if tuple(shape) not in MATRIX_SHAPES:
            raise InputError(f"{npz}: {key} has shape {tuple(shape)}, expected 4x4 (or 3x4)")


def load(root: Path, ctx: Context) -> DatasetScene:
    npz = root / "cameras_sphere.npz"
    if not npz.is_file():
        raise InputError(f"{npz}: not found; a NeuS/IDR scene needs cameras_sphere.npz next to image/")
    img_dir = _first_dir(root, ("image", "images"))
    if img_dir is None:
        raise InputError(f"{root}: no image/ or images/ folder")
    images = list_images(img_dir, root)
    if not images:
        raise InputError(f"{img_dir}: no images")
    width, height = image_size(images[0])
    with open(npz, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # np.load would take anything else for a pickle
            raise InputError(f"{npz}: not an .npz archive (a zip of arrays); re-export the cameras")
    try:
        check_matrices(npz, len(images), images)
        cams, scale = load_neus_npz(npz, [p.name for p in images], width, height)
    except (zipfile.BadZipFile, EOFError):
        raise InputError(f"{npz}: damaged or cut-off .npz archive; re-export the cameras") from None
    except (np.linalg.LinAlgError, ValueError, ZeroDivisionError):
        raise InputError(f"{npz}: a world_mat is singular and cannot be decomposed") from None
    check_cameras(cams.K, cams.c2w, npz)
    if scale.shape == (3, 4):
        scale = np.vstack([scale, [0.0, 0.0, 0.0, 1.0]])
    masks = None
    mask_dir = _first_dir(root, ("mask", "masks"))
    if mask_dir is not None:
        masks = list_images(mask_dir, root)
        if len(masks) != len(images):
            raise InputError(f"{mask_dir}: {len(masks)} masks for {len(images)} images in {img_dir}")
    extra = {}
    if np.all(np.isfinite(scale)) and scale[0, 0] > 0 and not np.allclose(scale, np.eye(4)):
        extra = {"sphere_center": scale[:3, 3].tolist(), "sphere_radius": float(scale[0, 0])}
    ctx.log.info("neus: %d cameras from %s", len(images), npz)
    return DatasetScene(images, cams.K, cams.c2w, width, height, masks=masks, extra=extra)
