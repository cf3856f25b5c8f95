"""Stage 1, frames: a video or a photo folder -> ``images/000000.jpg ...`` + ``frames.json``.

Videos keep the sharpest frame of each of ``target_count`` equal windows (``frames_video``);
photo folders are EXIF-rotated and brought to one size (``frames_photos``). This module holds
the entry point and the small helpers both share (sharpness, resizing, atomic writes), and the
image reading that photo folders and dataset importers share: a decoded-size check on the header
before any pixel is decoded, and 16-bit / float samples brought to 8 bits.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dag import Context
from pipeline.errors import ConfigError, InputError

VERSION = "1"

SHARPNESS_SIDE = 512  # sharpness is measured on a grey copy whose long side is at most this
THUMB_SIDE = 64  # near-duplicate test: mean abs difference of THUMB_SIDE^2 grey thumbnails
MIN_TEXTURE_STD = 2.0  # a frame whose grey std (0..255) is below this is blank (black, fade)
MAX_DECODE_BYTES = 256 << 20  # an image whose full decode takes more is not decoded (JPEG: at 1/8 scale)
_SAMPLE_BYTES = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}  # else 1 byte a band
_CHUNK_PIXELS = 1 << 22  # 16-bit / float samples are scaled this many at a time
FLOAT_TOLERANCE = 0.01  # float samples this far outside 0..1 are clipped, further is refused


def run(inputs: dict[str, Path], cfg: Any, out_dir: Path, ctx: Context) -> dict:
    """Extract frames from ``ctx.source`` into ``out_dir``; return a JSON-able summary."""
    start = time.perf_counter()
    source = ctx.source
    if source is None:
        raise InputError("frames: no source given (a video file or a photo folder)")
    if source.kind == "dataset":  # images + cameras (+ masks, ground truth) from a dataset
        from stages.importers import run as import_dataset
        return import_dataset(source.format, Path(source.path), Path(out_dir), ctx)
    if cfg.target_count < 2:
        raise ConfigError(f"frames.target_count must be at least 2, got {cfg.target_count}")
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(img_dir)
    if source.kind == "video":
        from stages.frames_video import extract_video
        meta = extract_video(Path(source.path), cfg, img_dir, ctx)
    elif source.kind == "images":
        from stages.frames_photos import extract_photos
        meta = extract_photos(Path(source.path), cfg, img_dir, ctx)
    else:
        raise InputError(f"frames: cannot read a source of kind {source.kind!r} ({source.path}); "
                         "use a dataset importer")
    remove_stale_images(img_dir, {f["file"] for f in meta["frames"]})
    if source.gt:
        copy_ground_truth(Path(source.gt), out_dir / "gt")
        meta["gt"] = "gt"
    write_json_atomic(out_dir / "frames.json", meta)
    return {
        "num_frames": len(meta["frames"]),
        "width": meta["width"],
        "height": meta["height"],
        "source_kind": meta["source_kind"],
        "num_source_frames": meta["num_source_frames"],
        "seconds": round(time.perf_counter() - start, 3),
    }


def measure_grey(grey: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(small copy, variance of the Laplacian, std) of a uint8 grey image.

    The copy is downscaled by an integer factor (fast area averaging) to a long side of
    about SHARPNESS_SIDE, so sharpness values are comparable across input sizes.
    """
    import cv2

    h, w = grey.shape
    f = max(1, round(max(h, w) / SHARPNESS_SIDE))
    small = grey
    if f > 1:
        small = cv2.resize(grey[: h // f * f, : w // f * f], (w // f, h // f),
                           interpolation=cv2.INTER_AREA)
    _, std = cv2.meanStdDev(small)
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(small, cv2.CV_32F))
    return np.array(small, copy=True), float(lap_std[0, 0]) ** 2, float(std[0, 0])


def compute_thumbnail(small_grey: np.ndarray) -> np.ndarray:
    """A THUMB_SIDE x THUMB_SIDE float32 grey thumbnail in 0..1 for near-duplicate tests."""
    import cv2

    thumb = cv2.resize(small_grey, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA)
    return thumb.astype(np.float32) / 255.0


def is_duplicate(thumb: np.ndarray, last: np.ndarray | None, threshold: float) -> bool:
    """True when ``thumb`` differs from the last kept thumbnail by less than ``threshold``."""
    return last is not None and float(np.abs(thumb - last).mean()) < threshold


def is_duplicate_of_any(thumb: np.ndarray, kept: list[np.ndarray], threshold: float) -> int | None:
    """Index of the first of ``kept`` that ``thumb`` duplicates (see ``is_duplicate``), else None."""
    if not kept:
        return None
    diffs = np.abs(np.stack(kept) - thumb).mean(axis=(1, 2))
    hits = np.flatnonzero(diffs < threshold)
    return int(hits[0]) if len(hits) else None


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the long side is at most ``max_side`` (never upscaled)."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_max_side(img: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (cv2.INTER_AREA) so the long side is at most ``max_side``."""
    import cv2

    h, w = img.shape[:2]
    size = scaled_size(w, h, max_side)
    if size == (w, h):
        return img
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def save_jpeg_atomic(rgb: np.ndarray, path: Path, quality: int) -> None:
    """Write an RGB uint8 array as JPEG via a temp file in the same folder + os.replace."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=quality)
        os.replace(tmp, path)
    except BaseException:  # a full disk: give the half-written file's space back
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON via a temp file + os.replace."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def frame_name(index: int) -> str:
    """File name of the ``index``-th output frame, relative to the stage folder."""
    return f"images/{index:06d}.jpg"


def remove_temp_files(img_dir: Path) -> None:
    """Drop temp files a killed run left behind."""
    for p in img_dir.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def remove_stale_images(img_dir: Path, keep: set[str]) -> None:
    """Delete ``images/*.jpg`` that this run did not write (left by an earlier attempt)."""
    for p in img_dir.glob("*.jpg"):
        if f"images/{p.name}" not in keep:
            p.unlink()


def copy_ground_truth(gt: Path, dest: Path) -> None:
    """Copy the ground-truth folder next to the frames (overwrites a partial copy)."""
    if not gt.is_dir():
        raise InputError(f"ground-truth folder not found: {gt}")
    copy_input_tree(gt, dest)


def copy_input_tree(src: Path, dest: Path) -> None:
    """Copy the files of an input folder that its fingerprint covers (``store.input_files``: no
    links out of it, a folder reached twice copied once); overwrites what is there."""
    from pipeline.store import input_files

    src = Path(src)
    keep = {rel.as_posix() for rel in input_files(src)}
    keep |= {parent.as_posix() for rel in list(keep) for parent in Path(rel).parents}

    def ignore(folder: str, names: list[str]) -> list[str]:
        base = Path(folder).relative_to(src)
        return [n for n in names if (base / n).as_posix() not in keep]

    shutil.copytree(src, dest, ignore=ignore, dirs_exist_ok=True)


# ---------------------------------------------------------------- reading images (PIL)

@contextlib.contextmanager
def open_image(path: Path):
    """``PIL.Image.open`` without PIL's pixel-count bomb check: callers test ``decode_bytes``
    on the header instead (it knows 16-bit and float samples), before anything is decoded."""
    from PIL import Image

    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as im:
            yield im
    finally:
        Image.MAX_IMAGE_PIXELS = old


def decode_bytes(im) -> int:
    """Bytes PIL needs to hold the opened image ``im`` decoded (from its header alone)."""
    w, h = im.size
    return w * h * len(im.getbands()) * _SAMPLE_BYTES.get(im.mode, 1)


def describe(im) -> str:
    """``"15000x15000 16-bit PNG"``: size, sample depth and format, for messages."""
    depth = {"F": "float", "I": "32-bit"}.get(im.mode, "16-bit" if im.mode.startswith("I;16") else "")
    return f"{im.size[0]}x{im.size[1]} {depth + ' ' if depth else ''}{im.format or 'image'}"


def to_8bit(im, path: Path):
    """``im`` with 8-bit samples: 16-bit ones scaled by 255/65535 (0x8000 -> 128), float ones in
    0..1 by 255; floats outside 0..1, NaN or inf, and 32-bit integers above 65535 are an
    InputError naming ``path``. Other modes are returned as they are."""
    from PIL import Image

    if not (im.mode in ("I", "F") or im.mode.startswith("I;16")):
        return im
    arr = np.asarray(im)
    lo, hi = float(arr.min()), float(arr.max())
    if im.mode == "F":
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise InputError(f"{path}: float image holds NaN or infinite values; save it as 8- or 16-bit")
        if lo < -FLOAT_TOLERANCE or hi > 1 + FLOAT_TOLERANCE:
            raise InputError(f"{path}: float image with values {lo:.4g}..{hi:.4g}; only floats in 0..1 can be "
                             "read, save it as 8- or 16-bit")

        def scale(a):
            return np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        if lo < 0 or hi > 65535:
            raise InputError(f"{path}: 32-bit integer image with values {lo:.0f}..{hi:.0f}; expected 0..65535 "
                             "(16-bit), save it as 8- or 16-bit")

        def scale(a):
            return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, _CHUNK_PIXELS // max(1, arr.shape[1]))
    for r in range(0, arr.shape[0], rows):
        out[r:r + rows] = scale(arr[r:r + rows])
    return Image.fromarray(out)
