"""Dataset importers: a scene that already holds images (+ cameras, masks) -> a frames/ folder.

``run(fmt, dataset_dir, out_dir, ctx)`` dispatches to ``stages.frames.importers.<fmt>.load``, which
returns a ``DatasetScene``; ``write_scene`` then writes what the frames stage promises:
``images/000000.<jpg|png>`` (JPEG and PNG bytes copied as they are; RGBA composited over white),
``frames.json``, ``transforms.json`` (``pipeline.cameras.save_transforms``, file_path
``images/<name>``), ``masks/<stem>.png`` (uint8 0/255) when the dataset has masks, and ``gt/``
when the dataset carries a ground-truth mesh in ``<dataset>/gt/``. 16-bit and float images are
brought to 8 bits (``pipeline.images.to_8bit``). Every image and mask is checked before anything is
written: its real path lies inside the dataset folder (a symbolic link out of it is refused), its
header is readable, of the scene's size and small enough to decode (``pipeline.images.MAX_DECODE_BYTES``).
"""
from __future__ import annotations

import difflib
import importlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.cameras import Cameras
from pipeline.dag import DATASET_FORMATS, Context
from pipeline.errors import InputError
from pipeline.images import MESH_SUFFIXES, decode, open_image, read_mask
from stages.frames.images import copy_input_tree
from stages.frames.importers.common import DatasetScene, check_real_inside, image_header

# Formats whose reader is not ``stages.frames.importers.<fmt>.load``: format -> (module, function).
READERS = {"omniobject3d_blender": ("omniobject3d", "load_blender"),
           "omniobject3d_video": ("omniobject3d", "load_video")}


def run(fmt: str, dataset_dir: Path, out_dir: Path, ctx: Context) -> dict:
    """Import the dataset scene ``dataset_dir`` of format ``fmt`` into ``out_dir`` (frames/)."""
    if fmt not in DATASET_FORMATS:
        near = difflib.get_close_matches(str(fmt), DATASET_FORMATS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise InputError(f"unknown dataset format '{fmt}'{hint} (known: {', '.join(DATASET_FORMATS)})")
    root = Path(os.path.abspath(dataset_dir))
    if not root.is_dir():
        raise InputError(f"dataset folder not found: {root}")
    module_name, reader = READERS.get(fmt, (fmt, "load"))
    scene = getattr(importlib.import_module(f"stages.frames.importers.{module_name}"), reader)(root, ctx)
    return write_scene(scene, root, fmt, Path(out_dir), ctx)




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
    rgba = decode(src, "image", lambda im: np.asarray(im.convert("RGBA")))
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255  # over white, rounded
    dest = dest_stem.with_suffix(".png")
    Image.fromarray(rgb.astype(np.uint8)).save(dest)
    mask = (rgba[..., 3] > 127) if (from_alpha and has_alpha) else None
    return dest.name, mask


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
        mask = read_mask(scene.masks[i], (scene.width, scene.height)) if scene.masks else alpha
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
