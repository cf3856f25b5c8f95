"""Stage 1, frames: a video or a photo folder -> ``images/000000.jpg ...`` + ``frames.json``.

Videos keep the sharpest frame of each of ``target_count`` equal windows (``video``); photo
folders are EXIF-rotated and brought to one size (``photos``); dataset scenes that bring images,
cameras and masks are imported (``importers``). The helpers the first two share are in
``images``; the image reading shared with the importers (a decoded-size check on the header
before any pixel is decoded, 16-bit / float samples brought to 8 bits) is ``pipeline.images``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any


from pipeline.dag import Context
from pipeline.errors import ConfigError, InputError
from pipeline.fsutil import atomic_write_json
from stages.frames.images import copy_ground_truth, remove_stale_images, remove_temp_files

VERSION = "2"


def run(inputs: dict[str, Path], cfg: Any, out_dir: Path, ctx: Context) -> dict:
    """Extract frames from ``ctx.source`` into ``out_dir``; return a JSON-able summary."""
    start = time.perf_counter()
    source = ctx.source
    if source is None:
        raise InputError("frames: no source given (a video file or a photo folder)")
    if source.kind == "dataset":  # images + cameras (+ masks, ground truth) from a dataset
        from stages.frames.importers import run as import_dataset
        return import_dataset(source.format, Path(source.path), Path(out_dir), ctx)
    if cfg.target_count < 2:
        raise ConfigError(f"frames.target_count must be at least 2, got {cfg.target_count}")
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(img_dir)
    if source.kind == "video":
        from stages.frames.video import extract_video
        meta = extract_video(Path(source.path), cfg, img_dir, ctx)
    elif source.kind == "images":
        from stages.frames.photos import extract_photos
        meta = extract_photos(Path(source.path), cfg, img_dir, ctx)
    else:
        raise InputError(f"frames: cannot read a source of kind {source.kind!r} ({source.path}); "
                         "use a dataset importer")
    remove_stale_images(img_dir, {f["file"] for f in meta["frames"]})
    if source.gt:
        copy_ground_truth(Path(source.gt), out_dir / "gt")
        meta["gt"] = "gt"
    atomic_write_json(out_dir / "frames.json", meta)
    return {
        "num_frames": len(meta["frames"]),
        "width": meta["width"],
        "height": meta["height"],
        "source_kind": meta["source_kind"],
        "num_source_frames": meta["num_source_frames"],
        "seconds": round(time.perf_counter() - start, 3),
    }


# ---------------------------------------------------------------- reading images (PIL)


