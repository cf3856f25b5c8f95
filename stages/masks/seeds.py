"""Where offline GrabCut starts from, and the retry with the other seed.

The free-space hull (``stages.masks.freespace``) when one is carved; without one (an object
filling the frame: too little is seen behind it) what the stereo sees through
(``stages.masks.evidence``: the ground and the background are background, the rest may be the
object) when it sees enough of the ground, else the SfM points on the object
(``stages.masks.grabcut.select_object_points``). Masks from one of the last two that are
implausible are redone from the other once (``OTHER``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.cameras import orbit_distance, supporting_plane
from pipeline.errors import StageError
from stages.masks import evidence, freespace
from stages.masks import grabcut as masks_grabcut

NAMES = {"freespace": "the free-space hull", "seen_through": "what the stereo sees through", "points": "the SfM points"}
OTHER = {"seen_through": "points", "points": "seen_through"}  # the retry after implausible masks


def grabcut(cfg, ctx, images, sfm_dir: Path, stems, shapes, cams, todo, final, finish, bar, work: Path,
            found: dict, seed: str | None = None) -> dict:
    """GrabCut masks for ``todo``, seeded from ``seed`` (else ``first_seed``); the points, supporting
    plane, stereo and hull stay in ``found`` (for the checks, and for a retry)."""
    obj = span = np.zeros((0, 3))
    seed_hull = seen = None
    info: dict = {}
    threads = ctx.threads or os.cpu_count() or 1
    if cams is not None:
        if "points" not in found:
            points = found["points"] = masks_grabcut.load_points(sfm_dir, cams, ctx.log)
            st = None
            if cfg.seed in ("auto", "freespace"):
                st, found["freespace"] = freespace.stereo(images, cams, points, threads)
                if st is not None:
                    found["stereo"] = st
                    found["hull"], found["freespace"] = freespace.object_hull(None, cams, points, ctx.log, st=st)
            # the stereo fitted the plane (to these points, else to its own); without it, the points' plane
            found["plane"] = st.plane if st is not None else \
                supporting_plane(points, cams, freespace.PLANE_TOL * orbit_distance(cams))
        points = found["points"]
        if "freespace" in found:
            info["freespace"] = found["freespace"]
        seed = seed or first_seed(cfg, found, ctx.log)
        if seed == "freespace":
            seed_hull = found["hull"]
            obj = span = points[seed_hull.contains(points)] if len(points) else points
        elif seed == "seen_through":
            st = found["stereo"]
            freespace.add_views(st, images, cams, todo, threads)
            band = int(np.ceil(evidence.EDGE_BAND * cams.width / st.maps[0].inv_depth.shape[1]))
            seen = (evidence.seen_maps(st, (cams.height, cams.width)), band)
        else:
            obj, span = masks_grabcut.select_object_points(points, cams, log=ctx.log)
    info.update(seed=seed or "points", seed_points=len(obj), rounds=int(cfg.grabcut_rounds), repaired=0)
    if todo:
        st = found.get("stereo")
        ground_seen = evidence.seen_maps(st, (cams.height, cams.width)) if st is not None else None
        info.update(masks_grabcut.compute(stems, images, shapes, cams, obj, cfg, work, final, finish, ctx.log, bar,
                                          threads, hull_pts=span, seed_hull=seed_hull, seen=seen,
                                          ground_seen=ground_seen))
    shutil.rmtree(work, ignore_errors=True)
    return info


def first_seed(cfg, found: dict, log) -> str:
    """``freespace`` when a hull was carved; without one (``masks.seed=auto``) ``seen_through`` when the
    stereo sees the ground or background in enough of the views, else ``points``;
    ``masks.seed=freespace`` without a hull fails in one line."""
    if found.get("hull") is not None:
        return "freespace"
    reason = (found.get("freespace") or {}).get("reason")
    if cfg.seed == "freespace":
        raise StageError(f"masks: no free-space hull ({reason}); try --set masks.seed=points")
    if cfg.seed == "auto" and found.get("stereo") is not None and evidence.usable(found["stereo"]):
        log.warning("masks: no free-space hull (%s); seeding GrabCut from what the stereo sees through", reason)
        return "seen_through"
    if cfg.seed == "auto":
        log.warning("masks: no free-space hull (%s); seeding GrabCut from the SfM points", reason)
    return "points"


def can_retry(seed: str | None, found: dict) -> str | None:
    """The other seed to redo implausible masks from, or None."""
    other = OTHER.get(seed or "")
    return other if other == "points" or (other and found.get("stereo") is not None
                                          and evidence.usable(found["stereo"])) else None
