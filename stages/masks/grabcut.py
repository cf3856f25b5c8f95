"""GrabCut masks without a model, seeded from the SfM points and refined by multi-view consensus.

1. Object points: SfM points that project near the image centre in most views, minus the
   dominant supporting plane (the ground/table) when there is one.
2. Pass 0: per view, the convex hull of the projected object points and of their footprints
   on the supporting plane (dilated) is probable foreground, a ring around it probable
   background, the rest (and the image border) background; pixels under projected object
   points are sure foreground. Small regions are upsampled.
3. Passes 1..n (repair): carve a voxel visual hull from the previous pass's masks (a voxel
   survives when at most CONSENSUS_TOL of the views miss it) and reproject it; a mask that
   spills outside that silhouette is redone by GrabCut with the outside as sure background,
   the others are kept as they are.
Intermediate passes are saved per frame under a work folder so a killed run resumes.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.cameras import Cameras, orbit_distance, project, supporting_plane
import stages.masks.post as post
from stages.masks import holes, refine

GC_BGD, GC_FGD, GC_PR_BGD, GC_PR_FGD = 0, 1, 2, 3
MIN_WORK_SIDE = 320  # small object regions are upsampled (up to MAX_UPSCALE) for sub-pixel edges
MAX_UPSCALE = 4.0
SEED_FG_GROW = 0.08  # pass 0: the seed hull grown by this share of its size is probable foreground,
SEED_RING_GROW = 0.35  # ... by this share probable background, the rest sure background
HULL_FG_GROW = 0.03  # pass 0 from the free-space hull: its silhouette grown by this share is probable foreground
REPAIR_FRAC = 0.01  # a mask with more than this share outside the consensus silhouette is redone
STATS_LOCK = threading.Lock()
CONSENSUS_TOL = 0.1  # consensus hull: a voxel survives when at most this share of the views miss it


# ---------------------------------------------------------------- SfM points


def _umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) with dst ~ s R src + t."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd(b.T @ a / len(src))
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ D @ Vt
    s = float(np.trace(np.diag(S) @ D) / max((a ** 2).sum() / len(src), 1e-300))
    return s, R, mu_d - s * R @ mu_s


def load_points(sfm_dir: Path, cams: Cameras, log: logging.Logger) -> np.ndarray:
    """SfM points (M, 3) in the frame of ``cams`` (track >= 3, error <= 2 px when known)."""
    sparse = Path(sfm_dir) / "sparse"
    if not (sparse / "points3D.bin").is_file() and not (sparse / "points3D.txt").is_file():
        return np.zeros((0, 3))
    import pycolmap

    rec = pycolmap.Reconstruction(str(sparse))
    pts, keep = [], []
    for p in rec.points3D.values():
        pts.append(p.xyz)
        keep.append(p.track.length() >= 3 and p.error <= 2.0)
    if not pts:
        return np.zeros((0, 3))
    pts, keep = np.asarray(pts, np.float64), np.asarray(keep)
    if keep.sum() >= 50:
        pts = pts[keep]
    stems = {Path(n).stem: i for i, n in enumerate(cams.names)}
    src, dst = [], []
    for img in rec.images.values():
        if Path(img.name).stem in stems:
            src.append(img.projection_center())
            dst.append(cams.centers[stems[Path(img.name).stem]])
    if len(src) >= 3:
        src, dst = np.asarray(src), np.asarray(dst)
        spread = np.linalg.norm(dst - dst.mean(0), axis=1).mean()
        if np.abs(src - dst).max() > 1e-3 * max(spread, 1e-9):
            s, R, t = _umeyama(src, dst)
            log.info("masks: sparse/ and transforms.json differ by a similarity (scale %.4g); aligned", s)
            pts = s * pts @ R.T + t
    return pts


def select_object_points(pts: np.ndarray, cams: Cameras, central: float = 0.5, min_frac: float = 0.8,
                         log: logging.Logger | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Points near the image centre in most views, off the supporting plane, outliers removed;
    and the points that span the seed region: those plus their footprints on the supporting
    plane (an object stands on it: its legs and base reach down to it even where SfM found no
    points, on a white body say)."""
    if len(pts) == 0:
        return pts, pts
    hits = np.zeros(len(pts))
    for i in range(len(cams)):
        uv, depth = project(pts, cams.K[i], np.linalg.inv(cams.c2w[i]))
        half = np.array([cams.width, cams.height]) / 2.0
        with np.errstate(invalid="ignore"):
            r = np.abs((uv - cams.K[i][:2, 2]) / half).max(1)
        hits += (depth > 0) & (r < central)
    frac = hits / len(cams)
    sel = frac >= min_frac
    if sel.sum() < 20:
        sel = frac >= min(np.quantile(frac, 0.9), min_frac)
    obj = pts[sel]
    scale = orbit_distance(cams, np.median(obj, 0)) if len(obj) else 1.0  # around the points, not the look-at point
    plane = supporting_plane(pts, cams, 0.01 * scale)
    if plane is not None:
        n, d = plane
        above = obj @ n + d > 0.015 * scale
        if above.sum() >= 10:
            obj = obj[above]
            if log:
                log.info("masks: removed the supporting plane (%.0f%% of the central points)",
                         100 * (1 - above.mean()))
        else:
            plane = None
    if len(obj) >= 10:
        med = np.median(obj, 0)
        dist = np.linalg.norm(obj - med, axis=1)
        obj = obj[dist <= 3.0 * np.median(dist) + 1e-12]
    if plane is None or len(obj) == 0:
        return obj, obj
    n, d = plane
    return obj, np.concatenate([obj, obj - (obj @ n + d)[:, None] * n[None]])


# ---------------------------------------------------------------- trimaps and GrabCut


def seed_trimap(obj_pts: np.ndarray, cams: Cameras, i: int, shape: tuple[int, int],
                hull_pts: np.ndarray | None = None) -> np.ndarray | None:
    """Pass-0 trimap from the dilated convex hull of the projected ``hull_pts`` (default: the
    object points); pixels under the object points are sure foreground."""
    import cv2

    uv = _project(obj_pts, cams, i)
    span = uv if hull_pts is None else _project(hull_pts, cams, i)
    if len(uv) < 3 or len(span) < 3:
        return None
    hull_mask = np.zeros(shape, np.uint8)
    hull = cv2.convexHull(np.round(span - 0.5).astype(np.int32))
    cv2.fillConvexPoly(hull_mask, hull, 1)
    hull_mask = hull_mask > 0
    size = float(np.sqrt(max(hull_mask.sum(), 1)))
    fg_region = post.dilate(hull_mask, int(round(SEED_FG_GROW * size)) + 1)
    ring = post.dilate(hull_mask, int(round(SEED_RING_GROW * size)) + 2)
    tri = np.full(shape, GC_BGD, np.uint8)
    tri[ring] = GC_PR_BGD
    tri[fg_region] = GC_PR_FGD
    _mark_points(tri, uv)
    return _border_background(tri)


def _project(pts: np.ndarray, cams: Cameras, i: int) -> np.ndarray:
    uv, depth = project(pts, cams.K[i], np.linalg.inv(cams.c2w[i]))
    return uv[depth > 0]


def _mark_points(tri: np.ndarray, uv: np.ndarray) -> None:
    """Pixels under projected object points are sure foreground."""
    h, w = tri.shape
    u, v = np.floor(uv[:, 0]).astype(np.int64), np.floor(uv[:, 1]).astype(np.int64)
    ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    tri[v[ok], u[ok]] = GC_FGD


def consensus_trimap(sil: np.ndarray, prev: np.ndarray | None, uv: np.ndarray | None = None) -> np.ndarray | None:
    """Trimap from the consensus silhouette ``sil`` of a tolerant (hence too fat) visual hull and
    this frame's previous mask: previous foreground outside the silhouette is background, the
    agreeing core is sure foreground, the rest of the silhouette is left to GrabCut."""
    if sil.sum() < 16:
        return None
    if prev is None:
        prev = sil
    band = max(2, int(round(0.03 * np.sqrt(sil.sum()))))
    near = post.dilate(sil, max(1, band // 2))
    agree = prev & near
    tri = np.full(sil.shape, GC_BGD, np.uint8)
    tri[post.dilate(sil | agree, band)] = GC_PR_BGD
    tri[agree] = GC_PR_FGD
    tri[post.erode(agree, band)] = GC_FGD
    if uv is not None:
        _mark_points(tri, uv)
    return _border_background(tri)


def _border_background(tri: np.ndarray) -> np.ndarray:
    b = max(1, int(round(0.01 * max(tri.shape))))
    edge = np.zeros(tri.shape, bool)
    edge[:b], edge[-b:], edge[:, :b], edge[:, -b:] = True, True, True, True
    tri[edge & (tri == GC_PR_BGD)] = GC_BGD
    return tri


def grabcut(image: np.ndarray, trimap: np.ndarray, iters: int, max_side: int) -> np.ndarray:
    """GrabCut inside the bounding box of the uncertain region, downscaled to ``max_side``."""
    import cv2

    h, w = trimap.shape
    out = np.isin(trimap, (GC_FGD,))
    unknown = np.isin(trimap, (GC_PR_BGD, GC_PR_FGD, GC_FGD))
    if not unknown.any():
        return out
    ys, xs = np.nonzero(unknown)
    pad = max(8, int(0.1 * max(np.ptp(ys), np.ptp(xs))))
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, h)
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, w)
    crop_img, crop_tri = image[y0:y1, x0:x1], trimap[y0:y1, x0:x1]
    scale = min(max_side / max(crop_tri.shape), max(1.0, min(MAX_UPSCALE, MIN_WORK_SIDE / max(crop_tri.shape))))
    if scale != 1.0:
        size = (max(int(round(crop_tri.shape[1] * scale)), 8), max(int(round(crop_tri.shape[0] * scale)), 8))
        crop_img = cv2.resize(crop_img, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        crop_tri = cv2.resize(crop_tri, size, interpolation=cv2.INTER_NEAREST)
    labels = crop_tri.copy()
    if np.isin(labels, (GC_FGD, GC_PR_FGD)).any() and np.isin(labels, (GC_BGD, GC_PR_BGD)).any():
        cv2.setRNGSeed(0)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        bgr = np.ascontiguousarray(crop_img[..., ::-1])
        cv2.grabCut(bgr, labels, None, bgd, fgd, iters, cv2.GC_INIT_WITH_MASK)
    fg = np.isin(labels, (GC_FGD, GC_PR_FGD)).astype(np.float32)
    if scale != 1.0:
        fg = cv2.resize(fg, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR if scale < 1 else cv2.INTER_AREA)
    out[y0:y1, x0:x1] = fg > 0.5
    return out


def rect_trimap(shape: tuple[int, int]) -> np.ndarray:
    """No cameras or points: the central 70% of the image is probable foreground."""
    h, w = shape
    tri = np.full(shape, GC_BGD, np.uint8)
    tri[int(0.1 * h):int(0.9 * h), int(0.1 * w):int(0.9 * w)] = GC_PR_BGD
    tri[int(0.15 * h):int(0.85 * h), int(0.15 * w):int(0.85 * w)] = GC_PR_FGD
    return tri


# ---------------------------------------------------------------- passes


def hull_trimap(sil: np.ndarray, obj_pts: np.ndarray, cams: Cameras, i: int) -> np.ndarray | None:
    """Pass-0 trimap from the silhouette of the free-space hull (a little fatter than the object):
    the silhouette grown by HULL_FG_GROW of its size is probable foreground, a ring around it
    probable background, the rest background; pixels under object points are sure foreground."""
    if sil.sum() < 16:
        return None
    size = float(np.sqrt(sil.sum()))
    tri = np.full(sil.shape, GC_BGD, np.uint8)
    tri[post.dilate(sil, int(round(SEED_RING_GROW * size)) + 2)] = GC_PR_BGD
    tri[post.dilate(sil, int(round(HULL_FG_GROW * size)) + 1)] = GC_PR_FGD
    _mark_points(tri, _project(obj_pts, cams, i))
    return _border_background(tri)


def seen_trimap(seen: np.ndarray, band: int) -> np.ndarray | None:
    """Pass-0 trimap from what the stereo sees through (``seen``: the ground or the background):
    those pixels are background (sure where more than ``band`` pixels from the rest: the stereo
    window straddles the object's edge), everything else probable foreground."""
    if (~seen).sum() < 16 or not seen.any():
        return None
    tri = np.full(seen.shape, GC_PR_FGD, np.uint8)
    tri[seen] = GC_PR_BGD
    tri[post.erode(seen, band)] = GC_BGD
    return _border_background(tri)


def _seed_mask(i: int, load_image, shape, cams: Cameras | None, obj_pts: np.ndarray, cfg,
               hull_pts: np.ndarray | None = None, seed_hull: post.Hull | None = None,
               seen: tuple[dict, int] | None = None) -> np.ndarray:
    """Pass 0: GrabCut seeded from the free-space hull's silhouette, else from what the stereo sees
    through (``seen``: per view a map and the edge band), else from the projected object points (a
    centred box without any)."""
    tri = None
    if seen is not None and i in seen[0]:
        tri = seen_trimap(seen[0][i], seen[1])
    elif seed_hull is not None:
        tri = hull_trimap(post.silhouette(seed_hull, cams, i, shape), obj_pts, cams, i)
    elif cams is not None and len(obj_pts) >= 3:
        tri = seed_trimap(obj_pts, cams, i, shape, hull_pts)
    return grabcut(load_image(i), tri if tri is not None else rect_trimap(shape), int(cfg.grabcut_iters),
                   int(cfg.grabcut_max_side))


def _repaired_mask(i: int, load_image, shape, cams: Cameras, obj_pts: np.ndarray, cfg, hull: post.Hull,
                   prev: np.ndarray | None, stats: dict, seed: Callable[[int], np.ndarray]) -> np.ndarray:
    """Later passes: a mask that spills outside the consensus silhouette is redone from it."""
    sil = post.silhouette(hull, cams, i, shape)
    if prev is not None and prev.any():
        band = max(2, int(round(0.01 * max(shape))))
        if (prev & ~post.dilate(sil, band)).sum() <= REPAIR_FRAC * prev.sum():
            return prev
    with STATS_LOCK:
        stats["repaired"] = stats.get("repaired", 0) + 1
    tri = consensus_trimap(sil, prev, _project(obj_pts, cams, i))
    if tri is None:
        return prev if prev is not None else seed(i)
    return grabcut(load_image(i), tri, int(cfg.grabcut_iters), int(cfg.grabcut_max_side))


def for_each_frame(work: Callable[[int], None], frames: list[int], bar, threads: int) -> None:
    """``work(i)`` for every frame, ``threads`` at a time (OpenCV's GrabCut releases the GIL; each
    frame writes its own file, so a kill still loses only the frames in flight)."""
    if threads <= 1 or len(frames) < 2:
        for i in bar(frames):
            work(i)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in bar(pool.map(work, frames)):
            pass


def compute(stems: list[str], load_image, shapes: list[tuple[int, int]], cams: Cameras | None,
            obj_pts: np.ndarray, cfg, work_dir: Path, final: dict[str, np.ndarray | None],
            save_final: Callable[[str, np.ndarray], None], log: logging.Logger, bar=iter,
            threads: int = 1, hull_pts: np.ndarray | None = None, seed_hull: post.Hull | None = None,
            seen: tuple[dict, int] | None = None, ground_seen: dict[int, np.ndarray] | None = None) -> dict:
    """Run all passes. ``final[stem]`` holds already finished masks (None = to compute);
    ``save_final`` writes a finished mask. Intermediate masks live in ``work_dir/pass<k>/``.
    ``threads`` frames are segmented at once. ``ground_seen`` (per view, what the stereo sees the
    ground or background through, at the image size) lets the last pass reopen see-through holes."""
    rounds = max(1, int(cfg.grabcut_rounds))
    todo = {s for s, m in final.items() if m is None}
    if seed_hull is None and seen is None and (cams is None or len(obj_pts) < 3):
        log.warning("masks: grabcut has no cameras or SfM points to seed from; using a centred box")
    prev: list[np.ndarray | None] | None = None
    stats: dict = {}

    def seed(i: int) -> np.ndarray:
        return _seed_mask(i, load_image, shapes[i], cams, obj_pts, cfg, hull_pts, seed_hull, seen)

    for k in range(rounds):
        last = k == rounds - 1
        pass_dir = work_dir / f"pass{k}"
        pass_dir.mkdir(parents=True, exist_ok=True)
        if last:
            save, skip = save_final, set(stems) - todo
            polish = _polisher(load_image, prev, cfg, log, stats, ground_seen)
        else:
            def save(stem, m, d=pass_dir):
                post.write_mask(d / f"{stem}.png", post.clean_mask(m, cfg.keep_components, cfg.fill_holes, 0))
            skip = {s for i, s in enumerate(stems)
                    if s not in todo or post.mask_or_none(pass_dir / f"{s}.png", shapes[i]) is not None}
        hull = None
        if prev is not None and cams is not None:
            hull = post.visual_hull(prev, cams, res=int(cfg.grabcut_hull_res), tol=CONSENSUS_TOL)
            if hull is None:
                log.warning("masks: no silhouette consensus could be carved; keeping pass %d masks", k)
        if prev is None:
            mask_of = seed
        elif hull is None:
            mask_of = (lambda i, p=prev: p[i] if p[i] is not None else seed(i))
        else:
            mask_of = (lambda i, p=prev, h=hull: _repaired_mask(i, load_image, shapes[i], cams, obj_pts, cfg, h,
                                                                p[i], stats, seed))
        log.info("masks: grabcut pass %d/%d on %d frames", k + 1, rounds, len(stems) - len(skip))
        frames = [i for i in range(len(stems)) if stems[i] not in skip]
        for_each_frame(lambda i, m=mask_of, w=save: w(stems[i], polish(i, m(i)) if last else m(i)), frames, bar,
                       threads)
        if not last:
            prev = []
            for i, s in enumerate(stems):
                m = post.mask_or_none(pass_dir / f"{s}.png", shapes[i])
                prev.append(m if m is not None else final.get(s))
    if stats.get("repaired"):
        log.info("masks: %d masks spilled outside the multi-view consensus and were redone", stats["repaired"])
    return {"repaired": int(stats.get("repaired", 0)), "refined": int(stats.get("refined", 0)),
            "holes_opened": int(stats.get("holes_opened", 0))}


def _polisher(load_image, prev: list[np.ndarray | None] | None, cfg, log: logging.Logger,
              stats: dict, ground_seen: dict[int, np.ndarray] | None = None) -> Callable[[int, np.ndarray], np.ndarray]:
    """The last pass's masks, cleaned, are redone with clean colour models (``stages.masks.refine``)
    when the backdrop is uniform: judged on the previous pass's masks, else per view. Over a textured
    backdrop, the holes the stereo sees through are reopened (``stages.masks.holes``)."""
    grow = refine.uniform_backdrop(load_image, prev, log) if prev is not None else None

    def polish(i: int, m: np.ndarray) -> np.ndarray:
        m = post.clean_mask(m, cfg.keep_components, cfg.fill_holes, 0)
        image = load_image(i)
        if grow is False or (grow is None and not refine.far_spread(image, m) < refine.UNIFORM_SPREAD):
            if ground_seen is None or i not in ground_seen:
                return m
            out = holes.open_holes(image, m, ground_seen[i])
            if (out != m).any():
                with STATS_LOCK:
                    stats["holes_opened"] = stats.get("holes_opened", 0) + 1
            return out
        with STATS_LOCK:
            stats["refined"] = stats.get("refined", 0) + 1
        return refine.refine(image, m)
    return polish
