"""Image files the stages share: opening without PIL's bomb check (callers check the decoded size
on the header), 8-bit conversion of 16-bit and float images, one mask reader, the suffixes read."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MESH_SUFFIXES = (".ply", ".obj", ".stl", ".off", ".glb")
MAX_DECODE_BYTES = 256 << 20  # an image whose full decode takes more is not decoded (JPEG: at 1/8 scale)
_SAMPLE_BYTES = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}  # else 1 byte a band
_CHUNK_PIXELS = 1 << 22  # 16-bit / float samples are scaled this many at a time
FLOAT_TOLERANCE = 0.01  # float samples this far outside 0..1 are clipped, further is refused


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


def decode(path: Path, what: str, convert: Callable):
    """``convert(the image with 8-bit samples)`` of the file at ``path``; a missing file, one too
    large to decode in memory, or a decoder failure is an InputError naming it and ``what`` it is."""
    path = Path(path)
    try:
        with open_image(path) as img:
            if decode_bytes(img) > MAX_DECODE_BYTES:
                raise InputError(f"{path}: {describe(img)} {what} is too large to decode in memory")
            return convert(to_8bit(img, path))
    except FileNotFoundError:
        raise InputError(f"{path}: {what} file missing") from None
    except (OSError, ValueError, SyntaxError) as exc:  # not an image, truncated or damaged pixel data
        raise InputError(f"{path}: {what} cannot be decoded ({exc})") from None


def read_mask(path: Path, size: tuple[int, int] | None = None, resize: bool = False) -> np.ndarray:
    """A mask image as bool (H, W): samples above 127 are the object (of an RGBA or LA image, its
    alpha; 16-bit and float samples brought to 8 bits first). ``size`` = (width, height): a mask of
    another size is area-resized with ``resize``, else an InputError. A missing, unreadable or too
    large file is an InputError naming it."""
    arr = decode(path, "mask", lambda img: np.asarray(img.getchannel("A") if img.mode in ("RGBA", "LA")
                                                      else img.convert("L")))
    if size is not None and (arr.shape[1], arr.shape[0]) != tuple(size):
        if not resize:
            raise InputError(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]}, expected {size[0]}x{size[1]}")
        import cv2

        arr = cv2.resize(arr, tuple(size), interpolation=cv2.INTER_AREA)
    return arr > 127
