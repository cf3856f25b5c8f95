"""Frames from a video: one streaming PyAV pass keeps the sharpest frame of each window.

The video is split into ``target_count`` equal windows by frame index; within a window the
frame with the largest variance of the Laplacian wins. Only the current window's best frame
is held in memory. Blank frames are never chosen and near-duplicates of the last kept frame
(a camera standing still) are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.dag import Context
from pipeline.errors import InputError
from pipeline.log import progress_bar
from stages.frames.images import (MIN_TEXTURE_STD, compute_thumbnail, frame_name,
                           is_duplicate, measure_grey, resize_max_side,
                           save_jpeg_atomic)

MIN_FRAMES_ON_ERROR = 3  # a video that fails midway is kept if at least this many decoded
MAX_BAD_PACKETS = 200  # undecodable packets skipped in a video before the rest is given up
MAX_BAD_IN_A_ROW = 20  # ... or this many in a row (a cut-off file's tail)
_Y_FORMATS = {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12",
              "nv21", "gray"}


@dataclass
class _Candidate:
    index: int
    frame: Any  # av.VideoFrame, converted to RGB only if it is kept
    sharpness: float
    small: np.ndarray  # downscaled grey, for the near-duplicate test


@dataclass
class _Selection:
    """What the streaming pass has written so far."""

    records: list[dict] = field(default_factory=list)
    last_thumb: np.ndarray | None = None
    duplicates: int = 0
    size: tuple[int, int] = (0, 0)


def extract_video(path: Path, cfg: Any, img_dir: Path, ctx: Context) -> dict:
    """Write the chosen frames of ``path`` to ``img_dir``; return the frames.json content."""
    container = open_video(path)
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if ctx.threads > 0:
            stream.codec_context.thread_count = ctx.threads
        if min(stream.width, stream.height) < cfg.min_side:
            raise InputError(f"{path.name}: video is {stream.width}x{stream.height}, smaller "
                             f"than frames.min_side={cfg.min_side}")
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        total = count_frames(path, stream, container, ctx.log)
        windows = max(1, min(cfg.target_count, total))
        sel, stats = _select(container, stream, path, cfg, img_dir, ctx, total, windows, fps)
    _check_selection(path, sel, stats)
    w, h = sel.size
    ctx.log.info("frames: kept %d of %d frames of %s (%d windows, %d near-duplicates dropped, "
                 "%d blank), %dx%d", len(sel.records), stats["decoded"], path.name, windows,
                 sel.duplicates, stats["blank"], w, h)
    return {"source_kind": "video", "source_file": path.name, "width": w, "height": h,
            "num_source_frames": stats["decoded"], "fps": fps, "frames": sel.records}


def open_video(path: Path):
    """``av.open`` with every failure turned into an InputError that names the file."""
    import av

    if not path.exists():
        raise InputError(f"video not found: {path}")
    if not path.is_file():
        raise InputError(f"not a video file: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"video file is empty: {path}")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise InputError(f"cannot open video {path}: {reason} (not a video, or cut off)") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"no video stream in {path}")
    return container


def count_frames(path: Path, stream, container, log) -> int:
    """Frames in the stream: the header's count, else a demux-only pass (no decoding).

    A demuxed count well below duration * rate means a cut-off file: warn and go on.
    """
    import av

    if stream.frames > 0:
        return int(stream.frames)
    count = 0
    try:
        with av.open(str(path)) as probe:
            for packet in probe.demux(probe.streams.video[0]):
                count += packet.size > 0
    except av.FFmpegError:
        pass  # a damaged tail: the packets read so far are what there is
    rate = float(stream.average_rate or stream.guessed_rate or 0.0)
    expected = round(container.duration / 1e6 * rate) if container.duration else 0
    if count < 0.9 * expected:
        log.warning("frames: %s holds %d of about %d frames (cut off?); using what is there",
                    path.name, count, expected)
    return max(count, 1)


def grey_of(frame) -> np.ndarray:
    """The luma plane of a decoded frame as a uint8 array (no colour conversion when YUV)."""
    if frame.format.name in _Y_FORMATS:
        plane = frame.planes[0]
        buf = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)
        return buf[:, :frame.width]
    return frame.to_ndarray(format="gray")


def decode_frames(container, stream, path: Path, log, stats: dict | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (index, frame), going on past damage: a packet that fails to decode is skipped and
    demuxing resumes after it, as long as the resumed decode moves on in time (its first frame has
    a later timestamp: a stream without timestamps ends at its first error). The end of the data,
    MAX_BAD_PACKETS bad packets or MAX_BAD_IN_A_ROW in a row end it too. Fewer than
    MIN_FRAMES_ON_ERROR frames from a damaged stream is an InputError; ``stats["bad_packets"]``
    gets the number of packets skipped."""
    import av

    index, bad, in_a_row, last_pts, reason, stopped = 0, 0, 0, None, "", False
    while not stopped:
        stopped, resumed = True, bad > 0
        try:
            for frame in container.decode(stream):
                pts = getattr(frame, "pts", None)
                if resumed and (pts is None or (last_pts is not None and pts <= last_pts)):
                    break  # cannot tell that the decode moved on: end here
                resumed, last_pts, in_a_row = False, pts, 0
                yield index, frame
                index += 1
            else:
                reason = ""  # the stream ended normally after the skipped packets
        except (av.FFmpegError, EOFError) as exc:
            reason = str(getattr(exc, "strerror", None) or exc)
            bad, in_a_row = bad + 1, in_a_row + 1
            stopped = isinstance(exc, EOFError) or bad >= MAX_BAD_PACKETS or in_a_row >= MAX_BAD_IN_A_ROW
    if stats is not None:
        stats["bad_packets"] = bad
    if bad and index < MIN_FRAMES_ON_ERROR:
        raise InputError(f"cannot decode video {path}: {reason or 'damaged packets'}")
    if reason:
        log.warning("frames: %s is damaged after frame %d (%s); keeping what decoded", path.name, index, reason)
    elif bad:
        log.warning("frames: %s: skipped %d damaged packets that failed to decode; kept the %d frames that "
                    "decoded", path.name, bad, index)


def _select(container, stream, path, cfg, img_dir, ctx, total, windows, fps):
    """The streaming pass: track the best frame per window, write it when the window ends."""
    sel, best, current = _Selection(), None, -1
    stats = {"decoded": 0, "blank": 0, "bad_packets": 0}
    bar = progress_bar(total=total, enabled=ctx.progress, unit="frame", desc=f"frames {path.name}")
    with bar:
        for index, frame in decode_frames(container, stream, path, ctx.log, stats):
            stats["decoded"] = index + 1
            bar.update(1)
            small, sharpness, std = measure_grey(grey_of(frame))
            if std < MIN_TEXTURE_STD:
                stats["blank"] += 1
                continue
            window = min(index * windows // total, windows - 1)
            if window != current and best is not None:
                _keep(best, sel, cfg, img_dir, fps)
                best = None
            current = window
            if best is None or sharpness > best.sharpness:
                best = _Candidate(index, frame, sharpness, small)
    if best is not None:
        _keep(best, sel, cfg, img_dir, fps)
    if stats["decoded"] < 0.9 * total and not stats["bad_packets"]:  # those were reported already
        ctx.log.warning("frames: %s ended after %d of %d frames", path.name, stats["decoded"],
                        total)
    elif stats["decoded"] > 1.1 * total:  # a wrong header count: the last window got the rest
        ctx.log.warning("frames: %s has %d frames, its header said %d; the tail is sampled "
                        "sparsely", path.name, stats["decoded"], total)
    return sel, stats


def _keep(cand: _Candidate, sel: _Selection, cfg, img_dir: Path, fps: float) -> None:
    """Write the window's winner unless it nearly repeats the last kept frame."""
    thumb = compute_thumbnail(cand.small)
    if is_duplicate(thumb, sel.last_thumb, cfg.dedup_threshold):
        sel.duplicates += 1
        return
    rgb = _rotated(cand.frame.to_ndarray(format="rgb24"), cand.frame.rotation)
    rgb = resize_max_side(rgb, cfg.max_side)
    name = frame_name(len(sel.records))
    save_jpeg_atomic(rgb, img_dir.parent / name, cfg.jpeg_quality)
    timestamp = cand.frame.time
    if timestamp is None:
        timestamp = cand.index / fps if fps else 0.0
    sel.records.append({"file": name, "source_index": cand.index,
                        "timestamp": round(float(timestamp), 6),
                        "sharpness": round(cand.sharpness, 3)})
    sel.last_thumb = thumb
    sel.size = (rgb.shape[1], rgb.shape[0])


def _rotated(rgb: np.ndarray, rotation: int | float) -> np.ndarray:
    """Apply the stream's display rotation (degrees counter-clockwise, as phones record it)."""
    turns = int(round((rotation or 0) / 90)) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _check_selection(path: Path, sel: _Selection, stats: dict) -> None:
    """Fewer than two kept frames is an InputError that says why."""
    kept = len(sel.records)
    if kept >= 2:
        return
    if stats["decoded"] - stats["blank"] == 0:
        raise InputError(f"{path.name}: no usable (textured) frames; all {stats['decoded']} "
                         "decoded frames are blank (black or one flat colour); check the exposure or lens cap")
    if sel.duplicates > 0:
        raise InputError(f"{path.name}: the camera did not move (all frames are near-identical);"
                         " film while walking around the object")
    raise InputError(f"{path.name}: fewer than 2 usable frames ({stats['decoded']} decoded); film a few "
                     "seconds while walking around the object")
