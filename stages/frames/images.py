"""Frame helpers that the video and photo paths share: sharpness, blank and duplicate tests, sizes,
atomic JPEG writes, frame names, clean-up of a resumed folder, copies of input folders."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.fsutil import atomic_file

SHARPNESS_SIDE = 512  # sharpness is measured on a grey copy whose long side is at most this
THUMB_SIDE = 64  # near-duplicate test: mean abs difference of THUMB_SIDE^2 grey thumbnails
MIN_THUMB_RANGE = 16.0  # grey levels: a flatter thumbnail is stretched less (noise stays noise)
MIN_TEXTURE_STD = 2.0  # a frame whose grey std (0..255) is below this is blank (black, fade)


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
    """A THUMB_SIDE x THUMB_SIDE float32 grey thumbnail for near-duplicate tests, its 1st..99th
    percentile stretched to 0..1: a dark capture (a dark object on a dark ground) differs from view
    to view by a few grey levels, under the threshold unstretched, and lost a view in four."""
    import cv2

    thumb = cv2.resize(small_grey, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    lo, hi = np.percentile(thumb, (1, 99))
    return np.clip((thumb - lo) / max(float(hi - lo), MIN_THUMB_RANGE), 0.0, 1.0)


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
    """Write an RGB uint8 array as JPEG through a temporary file (``fsutil.atomic_file``)."""
    from PIL import Image

    with atomic_file(path, durable=False) as f:
        Image.fromarray(rgb).save(f, format="JPEG", quality=quality)


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
