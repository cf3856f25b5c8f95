"""Stage 1, frames: a video or a photo folder -> ``images/000000.jpg ...`` + ``frames.json``.

Videos keep the sharpest frame of each of ``target_count`` equal windows (``frames_video``);
photo folders are EXIF-rotated and brought to one size (``frames_photos``). This module holds
the entry point and the small helpers both share (sharpness, resizing, atomic writes).
"""
from __future__ import annotations

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
    shutil.copytree(gt, dest, dirs_exist_ok=True)
