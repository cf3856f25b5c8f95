"""Checks of the masks stage's output: masks that separate nothing (``check_usable``), per-frame
disagreement with the others (``consistency``: coverage, the silhouette consensus, what the stereo
sees through, distance from where the cameras look) and whether computed masks as a whole can be
trusted (``implausible``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.cameras import Cameras
from pipeline.errors import InputError, StageError
from stages.masks import evidence, post

MAX_FLAGGED_SHARE = 0.3  # computed masks are rejected when more frames than this disagree with the rest
MAX_CENTRE_OFFSET = 0.5  # a mask this far (x its own size) from where the cameras look is off centre
MAX_OFF_CENTRE_SHARE = 0.5  # computed masks are rejected when more frames than this are off centre
CONSISTENCY_SIDE = 400  # masks are downscaled to this long side for the consistency check
EMPTY_COVERAGE = 0.001  # a mask covering less than this share of its image holds no object
FULL_COVERAGE = 0.995  # a mask covering more than this share of its image separates nothing


def check_usable(masks: list[np.ndarray], method: str, mask_dir: Path) -> None:
    """Fewer than 2 masks that are neither empty nor the whole image is an error that says why."""
    cover = np.array([float(m.mean()) for m in masks])
    empty, full = int((cover < EMPTY_COVERAGE).sum()), int((cover > FULL_COVERAGE).sum())
    if len(masks) - empty - full >= 2:
        return
    what = f"all {len(masks)} masks are empty" if empty == len(masks) else \
        f"all {len(masks)} masks cover the whole image" if full == len(masks) else \
        f"of {len(masks)} masks, {empty} are empty and {full} cover the whole image"
    if method == "provided":
        raise InputError(f"masks: {what} (the dataset's masks, in {mask_dir}); fix them, or use "
                         "--set masks.method=grabcut, or --set masks.method=none for scene mode")
    raise StageError(f"masks: {what} ({method} found no object, in {mask_dir}); try another --set "
                     "masks.method=rembg|grabcut, or --set masks.method=none for scene mode")


def implausible(frames: list[dict], method: str, with_cameras: bool, float_gap: float | None = None) -> str | None:
    """Why computed masks cannot be trusted, or None: with cameras, no silhouette consensus (a
    visual hull) can be carved from them at all; more than MAX_FLAGGED_SHARE of the frames
    disagree with it (a wrong segmentation is rarely consistent across an orbit); or in more
    than MAX_OFF_CENTRE_SHARE of the frames the mask lies off the point the cameras converge on
    (consistently wrong masks: a blob on the ground beside a textureless object). With stereo
    (``evidence``): the views see the ground through more than MAX_SEEN_THROUGH of the masks'
    inside on average (masks on the ground, not on a textureless object), or the masks' hull
    stops more than MAX_FLOAT of its height above the supporting plane (``float_gap``: the parts
    the object stands on, thin legs, are missing). Provided masks are the user's word and are
    only reported."""
    if method == "provided" or len(frames) < 3:
        return None
    if with_cameras and not any("outside_consensus" in f for f in frames):
        return "no silhouette consensus (visual hull) can be carved from them"
    seen = [f["seen_through"] for f in frames if f.get("seen_through") is not None]
    if seen and float(np.mean(seen)) > evidence.MAX_SEEN_THROUGH:
        return (f"the views see the ground through {np.mean(seen):.0%} of the masks' inside on average (more than "
                f"{evidence.MAX_SEEN_THROUGH:.0%}): they cover the ground, not the object")
    if float_gap is not None and float_gap > evidence.MAX_FLOAT:
        return (f"their visual hull stops {float_gap:.0%} of its height above the supporting plane (more than "
                f"{evidence.MAX_FLOAT:.0%}): what the object stands on, thin legs say, is missing")
    flagged = sum(1 for f in frames if f["flags"])
    if flagged > MAX_FLAGGED_SHARE * len(frames):
        return f"{flagged} of {len(frames)} frames disagree with the others (more than {MAX_FLAGGED_SHARE:.0%})"
    off = sum(1 for f in frames if "centre_offset" in f
              and (f["centre_offset"] is None or f["centre_offset"] > MAX_CENTRE_OFFSET))
    if with_cameras and off > MAX_OFF_CENTRE_SHARE * len(frames):
        return (f"in {off} of {len(frames)} frames the mask lies away from the point the cameras look at "
                "(the object's centre in an orbit)")
    return None


def consistency(stems, masks, cams: Cameras | None, cfg, log, st=None, plane=None) -> tuple[list[dict], float | None]:
    """Per-frame coverage and disagreement flags, on masks downscaled to CONSISTENCY_SIDE, with the
    share the stereo ``st`` sees through; and the consensus hull's float gap above ``plane``."""
    import cv2

    small, scaled = masks, cams
    side = max(masks[0].shape)
    if side > CONSISTENCY_SIDE:
        s = CONSISTENCY_SIDE / side
        small = [cv2.resize(m.astype(np.uint8), (max(1, round(m.shape[1] * s)), max(1, round(m.shape[0] * s))),
                            interpolation=cv2.INTER_AREA) > 0 for m in masks]
        if cams is not None:
            K = cams.K.copy()
            K[:, :2] *= s
            scaled = Cameras(cams.names, K, cams.c2w, small[0].shape[1], small[0].shape[0])
    hull = post.consensus_hull(small, scaled, res=int(cfg.consistency_res))
    recs = post.consistency(small, scaled, res=int(cfg.consistency_res), hull=hull)
    frames = [{"name": s, "file": f"masks/{s}.png", **r} for s, r in zip(stems, recs)]
    if st is not None:
        for f, share in zip(frames, evidence.seen_through(masks, st)):
            if share is not None:
                f["seen_through"] = round(share, 4)
                if share > evidence.FRAME_MAX:
                    f["flags"].append("seen_through")
    if scaled is not None:
        for f, offset in zip(frames, post.centre_offsets(small, scaled)):
            f["centre_offset"] = round(offset, 4) if np.isfinite(offset) else None
    for f, m in zip(frames, masks):
        f["coverage"] = round(float(m.mean()), 5)
    bad = [f["name"] for f in frames if f["flags"]]
    if bad:
        log.warning("masks: %d frames disagree with the others (%s): %s", len(bad),
                    "see masks.json flags", ", ".join(bad[:20]) + (" ..." if len(bad) > 20 else ""))
    return frames, evidence.float_gap(hull, plane, cams) if cams is not None else None
