"""Frames from a photo folder: EXIF-rotated RGB JPEGs of one size, in file-name order.

Two passes: headers first (size after EXIF orientation, to pick the common size; a photo whose
decode would not fit ``pipeline.images.MAX_DECODE_BYTES`` is skipped there), then one photo at a time is
decoded, at reduced scale where the format allows (JPEG ``draft``), so huge photos never sit in
memory at full size more than once. In a folder of 3 photos or more, exact and near duplicates of
an earlier photo (the video's ``frames.dedup_threshold`` test, against every kept photo) are
dropped, and fewer than 3 distinct ones is an error.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dag import Context
from pipeline.errors import InputError
from pipeline.log import progress
from pipeline.images import MAX_DECODE_BYTES, decode_bytes, describe, open_image, to_8bit
from stages.frames.images import compute_thumbnail, frame_name, is_duplicate_of_any, measure_grey, save_jpeg_atomic, scaled_size

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
ASPECT_TOLERANCE = 0.01  # relative aspect difference above which a photo is center-cropped
JPEG_DRAFT_AREA = 64  # a JPEG decodes at down to 1/8 scale: 1/64 of the pixels
MIN_DISTINCT_PHOTOS = 3  # fewer distinct photos once repeats are dropped is an error (SfM needs 3 views);
#                          a folder of fewer photos than this is not de-duplicated (2 photos is the minimum)
_ORIENTATION_TAG = 0x0112


@dataclass
class _Photo:
    name: str  # file name inside the folder
    path: Path  # resolved path, inside the folder
    size: tuple[int, int]  # (width, height) after EXIF orientation


def extract_photos(folder: Path, cfg: Any, img_dir: Path, ctx: Context) -> dict:
    """Write the photos of ``folder`` to ``img_dir``; return the frames.json content."""
    listed = list_images(folder, ctx.log)
    photos = [p for p in (_read_header(name, path, ctx.log) for name, path in listed) if p]
    small = [p.name for p in photos if min(p.size) < cfg.min_side]
    if small:
        ctx.log.warning("frames: skipped %d photos smaller than frames.min_side=%d: %s",
                        len(small), cfg.min_side, ", ".join(small))
    photos = [p for p in photos if min(p.size) >= cfg.min_side]
    if not photos:
        raise InputError(f"no usable images in {folder} (jpg, jpeg, png, tif, tiff)")
    target = choose_size(photos, cfg.mixed_sizes, folder, ctx.log)
    out_size = scaled_size(*target, cfg.max_side)
    dedup = cfg.dedup_threshold if len(photos) >= MIN_DISTINCT_PHOTOS else 0.0  # 2 photos: taken as given
    records, failed, repeats = _write_photos(photos, out_size, cfg.jpeg_quality, dedup, img_dir, ctx)
    if failed:
        ctx.log.warning("frames: skipped %d photos that failed to decode: %s", len(failed),
                        "; ".join(failed))
    if repeats:
        ctx.log.warning("frames: dropped %d photos that repeat an earlier one (frames.dedup_threshold=%g): %s",
                        len(repeats), cfg.dedup_threshold, _abbreviate(repeats, 6))
        if len(records) < MIN_DISTINCT_PHOTOS:
            raise InputError(f"{folder}: fewer than {MIN_DISTINCT_PHOTOS} distinct photos ({len(records)} distinct "
                             f"of {len(photos)}; the others repeat them); photograph the object from more "
                             "viewpoints")
    if len(records) < 2:
        raise InputError(f"{folder}: need at least 2 usable photos, found {len(records)}")
    ctx.log.info("frames: kept %d of %d photos in %s, %dx%d", len(records), len(listed),
                 folder.name, *out_size)
    return {"source_kind": "images", "source_file": folder.name, "width": out_size[0],
            "height": out_size[1], "num_source_frames": len(listed), "fps": None,
            "frames": records}


def _write_photos(photos: list[_Photo], out_size: tuple[int, int], quality: int, dedup: float,
                  img_dir: Path, ctx: Context) -> tuple[list[dict], list[str], list[str]]:
    """Decode, de-duplicate (mean abs thumbnail difference below ``dedup`` to any kept photo) and
    write the photos: (frame records, decode failures, repeats)."""
    records, failed, repeats, thumbs = [], [], [], []
    for photo in progress(photos, ctx.progress, unit="photo", desc="frames"):
        try:
            rgb = load_photo(photo.path, out_size)
        except InputError:  # values that cannot be read right (float range, NaN): say so, do not guess
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "skip this file"
            failed.append(f"{photo.name} ({exc})")
            continue
        small, sharpness, _ = measure_grey(_grey(rgb))
        thumb = compute_thumbnail(small)
        same = is_duplicate_of_any(thumb, thumbs, dedup)
        if same is not None:
            repeats.append(f"{photo.name} (= {records[same]['source_file']})")
            continue
        name = frame_name(len(records))
        save_jpeg_atomic(rgb, img_dir.parent / name, quality)
        records.append({"file": name, "source_file": photo.name, "sharpness": round(sharpness, 3)})
        thumbs.append(thumb)
    return records, failed, repeats


def _abbreviate(items: list[str], n: int) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def natural_key(name: str) -> list:
    """Sort key that puts img2 before img10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_images(folder: Path, log) -> list[tuple[str, Path]]:
    """(name, resolved path) of the image files directly inside ``folder``, sorted by name.

    Symlinks are followed only when they resolve to a file inside the folder (loops and links
    out are skipped); other files are skipped with one warning that names them.
    """
    if not folder.is_dir():
        raise InputError(f"photo folder not found: {folder}")
    root = folder.resolve()
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: natural_key(e.name))
    found, ignored, links, folders = [], [], [], []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            real = Path(entry.path).resolve(strict=True)
        except (OSError, RuntimeError):  # broken link or a symlink loop
            links.append(entry.name)
            continue
        if real.is_dir():
            folders.append(entry.name)  # photo folders are not searched recursively
            continue
        if not real.is_relative_to(root):
            links.append(entry.name)
        elif real.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
            found.append((entry.name, real))
        else:
            ignored.append(entry.name)
    if ignored:
        log.warning("frames: skipped %d files in %s that are not images: %s", len(ignored),
                    folder, ", ".join(ignored))
    if links:
        log.warning("frames: skipped %d broken, looping or outside-pointing links in %s: %s",
                    len(links), folder, ", ".join(links))
    if not found:
        hint = f"; its folders ({_abbreviate(folders, 4)}) are not searched: give one of them" if folders else ""
        raise InputError(f"no images in {folder} (jpg, jpeg, png, tif, tiff){hint}")
    return found


def _read_header(name: str, path: Path, log) -> _Photo | None:
    """The photo's size after EXIF orientation, or None (with a warning) if unreadable or too large."""
    turned, too_large = False, False
    try:
        with open_image(path) as im:
            (w, h), what = im.size, describe(im)
            need = decode_bytes(im) // (JPEG_DRAFT_AREA if im.format == "JPEG" else 1)
            too_large = need > MAX_DECODE_BYTES
            if not too_large:
                turned = _orientation(im) in (5, 6, 7, 8)
    except Exception as exc:  # noqa: BLE001 - any header failure means "skip this file"
        log.warning("frames: skipped %s: not a readable image (%s)", name, exc)
        return None
    if too_large:
        log.warning("frames: skipped %s: %s is too large to decode in memory (%d MB decoded, limit %d MB); "
                    "convert it to JPEG or downscale it", name, what, need >> 20, MAX_DECODE_BYTES >> 20)
        return None
    return _Photo(name, path, (h, w) if turned else (w, h))


def _orientation(im) -> int:
    """The EXIF orientation tag (1 = upright) without decoding the pixels."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1  # PIL's getexif would decode the whole PNG looking for an eXIf chunk after the pixels
    return im.getexif().get(_ORIENTATION_TAG, 1)


def choose_size(photos: list[_Photo], mixed: str, folder: Path, log) -> tuple[int, int]:
    """The most common photo size; other sizes are an InputError when ``mixed == "reject"``."""
    counts = Counter(p.size for p in photos)
    target = counts.most_common(1)[0][0]
    if len(counts) == 1:
        return target
    listing = ", ".join(f"{w}x{h} ({n})" for (w, h), n in counts.most_common())
    if mixed == "reject":
        raise InputError(f"photos in {folder} have different sizes: {listing}; "
                         "set frames.mixed_sizes=resize to resize them")
    aspect = target[0] / target[1]
    cropped = [p.name for p in photos if _aspect_differs(p.size, aspect)]
    note = f"; center-cropped {len(cropped)} to aspect {aspect:.3f}: {', '.join(cropped)}" \
        if cropped else ""
    log.info("frames: photos have different sizes (%s); resizing to %dx%d%s", listing,
             *target, note)
    return target


def _aspect_differs(size: tuple[int, int], aspect: float) -> bool:
    return abs(size[0] / size[1] / aspect - 1.0) > ASPECT_TOLERANCE


def _crop_box(size: tuple[int, int], aspect: float) -> tuple[int, int, int, int]:
    """Centered (left, top, right, bottom) of ``size`` with the given aspect (or the full box)."""
    w, h = size
    if not _aspect_differs(size, aspect):
        return 0, 0, w, h
    cw, ch = min(w, round(h * aspect)), min(h, round(w / aspect))
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def load_photo(path: Path, out_size: tuple[int, int]) -> np.ndarray:
    """Decode, EXIF-rotate, center-crop to the aspect of ``out_size`` and resize to it (RGB)."""
    import cv2
    from PIL import ImageOps

    aspect = out_size[0] / out_size[1]
    with open_image(path) as im:
        turned = _orientation(im) in (5, 6, 7, 8)
        oriented = im.size[::-1] if turned else im.size
        box = _crop_box(oriented, aspect)
        scale = out_size[0] / (box[2] - box[0])
        if scale < 1.0:  # JPEG decodes at 1/2, 1/4 or 1/8 scale when that is enough
            im.draft(None, (math.ceil(im.size[0] * scale), math.ceil(im.size[1] * scale)))
        img = to_8bit(ImageOps.exif_transpose(im), path).convert("RGB")
    box = _crop_box(img.size, aspect)
    if box != (0, 0, *img.size):
        img = img.crop(box)
    factor = int(img.size[0] / out_size[0])
    if factor >= 2:
        img = img.reduce(factor)
    rgb = np.asarray(img)
    if (rgb.shape[1], rgb.shape[0]) != out_size:
        rgb = cv2.resize(rgb, out_size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)


def _grey(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
