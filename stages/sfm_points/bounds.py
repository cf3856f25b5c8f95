"""Bounding sphere of the object for the ``sfm_points`` stage.

With masks: carve a coarse visual hull (a voxel survives when it projects inside, or within its
own projected radius of, the mask in nearly all views that see it; a view whose mask keeps clear
of the image border sees the whole object, so it also carves what projects off its frame), refine
the grid around it, add the SfM points that fall inside the masks, and take the minimum enclosing
ball x margin.
Without masks: SfM points inside most views' frusta, percentile-trimmed around the cameras'
common look-at point, capped by the sphere that the median view frames. Either way the sphere
keeps clear of every camera centre.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeline.cameras import Cameras, framed_radius, look_at_point, project

COARSE_RES = 24  # first carving pass over the initial region, before the grid is refined
MAX_COARSE = 4  # coarse passes, each over the padded previous hull, before the final one
PIXEL_SLACK = 1.0  # pixels: a mask pixel stands for its whole square, and masks are sampled
MIN_SEEN_RATIO = 0.5  # a voxel must project inside at least this share of the images
OUTLIER_VIEW_RATIO = 0.1  # ... and may fall outside the mask in at most this share of those
# A mask within this share of the image's shorter side (at least BORDER_MIN_PX) of its border may be cut
# by the frame; one farther in holds the whole object, so a voxel projecting off that image (farther
# than its radius from the mask) is outside it. Generous: masks tend to shrink near the border.
BORDER_RATIO = 0.05
BORDER_MIN_PX = 3
POINT_SLACK = 1.5  # SfM points farther than this x the hull radius from its centre are ignored
CAMERA_CLEARANCE = 0.95  # the radius stays below this x the distance to the nearest camera
NO_MASK_PERCENTILE = 90.0  # no masks: radius = this percentile of the shared points' distances
NO_MASK_MIN_POINTS = 20  # fewer shared points than this: radius from the frusta alone
# A plausible object radius is at least MIN_FRAMED_RATIO x the radius a view frames (an object
# about 5 % of the frame wide), at most MAX_FRAMED_RATIO x (one cut by the frame border is larger),
# and its centre is in view in at least MIN_CENTRE_IN_VIEW of the frames.
MIN_FRAMED_RATIO = 0.04
MAX_FRAMED_RATIO = 2.0
MIN_CENTRE_IN_VIEW = 0.5


@dataclass
class Sphere:
    center: np.ndarray
    radius: float
    info: dict = field(default_factory=dict)


def min_enclosing_ball(points: np.ndarray, tol: float = 1e-4) -> tuple[np.ndarray, float]:
    """Smallest enclosing ball of (M, 3) points, radius within a factor sqrt(1 + tol).

    Frank-Wolfe on the dual (Yildirim 2008): the dual value is a lower bound of r^2 and the
    farthest point an upper bound, so the loop stops with a certified gap.
    """
    pts = np.asarray(points, dtype=np.float64)
    pts = _hull_vertices(pts)
    sq = np.einsum("ij,ij->i", pts, pts)
    first = int(np.argmax(((pts - pts[0]) ** 2).sum(1)))
    second = int(np.argmax(((pts - pts[first]) ** 2).sum(1)))
    u = np.zeros(len(pts))
    u[first] += 0.5
    u[second] += 0.5
    center = u @ pts
    for _ in range(100000):
        d2 = sq - 2.0 * pts @ center + center @ center
        j = int(np.argmax(d2))
        dual = float(u @ sq - center @ center)
        if dual <= 0.0 or d2[j] <= (1.0 + tol) * dual:
            break
        delta = d2[j] / dual - 1.0
        step = delta / (2.0 * (1.0 + delta))
        u *= 1.0 - step
        u[j] += step
        center = (1.0 - step) * center + step * pts[j]
    radius = math.sqrt(max(float(np.max(((pts - center) ** 2).sum(1))), 0.0))
    return center, radius


def _hull_vertices(pts: np.ndarray) -> np.ndarray:
    if len(pts) < 50:
        return pts
    from scipy.spatial import ConvexHull, QhullError

    try:
        return pts[ConvexHull(pts).vertices]
    except (QhullError, ValueError):
        return pts


def _grid(lo: np.ndarray, hi: np.ndarray, res: int) -> tuple[np.ndarray, float, tuple[int, int, int]]:
    size = float(np.max(hi - lo)) / res
    shape = tuple(int(max(1, math.ceil((hi[a] - lo[a]) / size))) for a in range(3))
    axes = [lo[a] + (np.arange(shape[a]) + 0.5) * size for a in range(3)]
    centers = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return centers, size, shape


def carve(cams: Cameras, mask_at: Callable[[int], np.ndarray | None], lo: np.ndarray, hi: np.ndarray,
          res: int) -> tuple[np.ndarray, float]:
    """Voxel centres (K, 3) of the visual hull over the box [lo, hi] and the voxel size.

    A voxel counts as inside a view's mask when its centre projects within its own projected
    radius (+ PIXEL_SLACK) of a mask pixel centre, so thin parts survive a coarse grid. Off the
    image it is unseen, except that a view whose mask keeps clear of the border (the whole object
    in frame) counts it outside when it lies farther than its radius from the mask.
    """
    import cv2

    centers, size, _ = _grid(lo, hi, res)
    half_diag = 0.5 * math.sqrt(3.0) * size
    alive = np.arange(len(centers))  # voxels not yet carved away for sure
    seen = np.zeros(len(centers), np.int32)
    outside = np.zeros(len(centers), np.int32)
    carved_off = np.zeros(len(centers), np.int32)  # views that hold the whole object and see the voxel off frame
    max_outside = math.floor(OUTLIER_VIEW_RATIO * len(cams))
    w2c, voting = cams.w2c, 0
    for i in range(len(cams)):
        mask = mask_at(i)
        if mask is None:
            continue
        voting += 1
        dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        pts_t = np.ascontiguousarray(centers[alive].T, dtype=np.float32)  # (3, K): fast small matmuls
        P = (cams.K[i] @ w2c[i][:3, :4]).astype(np.float32)
        uvw = P[:, :3] @ pts_t + P[:, 3:]
        depth = (w2c[i][2, :3].astype(np.float32) @ pts_t) + np.float32(w2c[i][2, 3])
        with np.errstate(divide="ignore", invalid="ignore"):
            u, v = uvw[0] / uvw[2], uvw[1] / uvw[2]
        in_image = (depth > 1e-9) & (u >= 0) & (u < cams.width) & (v >= 0) & (v < cams.height)
        hit = np.flatnonzero(in_image)
        px = dist[v[hit].astype(np.int64), u[hit].astype(np.int64)]
        reach = cams.K[i, 0, 0] * half_diag / depth[hit] + PIXEL_SLACK
        idx = alive[hit]
        seen[idx] += 1
        outside[idx] += px > reach
        if not _reaches_border(mask):  # the whole object is in frame: what projects outside is not it
            off = np.flatnonzero(~in_image & (depth > 2.0 * half_diag))
            off = alive[off[_outside_frame(cams.K[i], dist, u[off], v[off], depth[off], half_diag)]]
            carved_off[off] += 1
            outside[off] += 1
        alive = alive[outside[alive] <= max_outside]
    # off-frame votes only ever carve: they count as views that see the voxel outside the mask,
    # never towards MIN_SEEN_RATIO
    keep = (seen >= max(2, math.ceil(MIN_SEEN_RATIO * voting))) & \
        (outside <= np.floor(OUTLIER_VIEW_RATIO * (seen + carved_off)))
    return centers[keep], size


def _reaches_border(mask: np.ndarray) -> bool:
    """Whether the mask comes near the image border (BORDER_RATIO): the object may go on out of frame."""
    b = max(BORDER_MIN_PX, math.ceil(BORDER_RATIO * min(mask.shape)))
    return bool(mask[:b].any() or mask[-b:].any() or mask[:, :b].any() or mask[:, -b:].any())


def _outside_frame(K: np.ndarray, dist: np.ndarray, u: np.ndarray, v: np.ndarray, depth: np.ndarray,
                   half_diag: float) -> np.ndarray:
    """Per voxel projecting off the image at (u, v) (in front of the camera): True when it lies
    farther than its projected radius from every mask pixel. With c the nearest image point
    and q a mask pixel, (p - c).(q - c) <= 0, so |p - q|^2 >= |p - c|^2 + dist(c)^2: a lower
    bound of the distance. The projected radius grows off-axis (x (1 + tan^2) at most)."""
    h, w = dist.shape
    cu, cv = np.clip(u, 0.0, w - 1e-3), np.clip(v, 0.0, h - 1e-3)
    at_edge = dist[cv.astype(np.int64), cu.astype(np.int64)]
    lower = np.sqrt((u - cu) ** 2 + (v - cv) ** 2 + at_edge.astype(np.float64) ** 2)
    tan2 = ((u - K[0, 2]) / K[0, 0]) ** 2 + ((v - K[1, 2]) / K[1, 1]) ** 2
    reach = K[0, 0] * half_diag / depth * (1.0 + tan2) + PIXEL_SLACK
    return lower > reach


def visual_hull(cams: Cameras, mask_at: Callable[[int], np.ndarray | None], res: int) -> tuple[np.ndarray, float]:
    """Carve COARSE_RES grids, first over a cube around the look-at point of the mask centroids
    (half-size = farthest camera distance), then over the padded hull until its box stops
    shrinking (at most MAX_COARSE passes); finally one ``res`` grid over the padded hull."""
    target = look_at_point(cams, _mask_centroids(cams, mask_at))
    reach = float(np.linalg.norm(cams.centers - target, axis=1).max())
    lo, hi = target - reach, target + reach
    for _ in range(MAX_COARSE):
        voxels, size = carve(cams, mask_at, lo, hi, COARSE_RES)
        if len(voxels) == 0:
            return voxels, size
        shrink = float(np.max(voxels.max(0) - voxels.min(0) + 3.0 * size) / np.max(hi - lo))
        lo, hi = voxels.min(0) - 1.5 * size, voxels.max(0) + 1.5 * size
        if shrink > 0.8:
            break
    return carve(cams, mask_at, lo, hi, res)


def _mask_centroids(cams: Cameras, mask_at: Callable[[int], np.ndarray | None]) -> np.ndarray:
    uv = cams.K[:, :2, 2].copy()
    for i in range(len(cams)):
        mask = mask_at(i)
        if mask is not None and mask.any():
            rows, cols = np.nonzero(mask)
            uv[i] = cols.mean() + 0.5, rows.mean() + 0.5
    return uv


def sphere_with_masks(cams: Cameras, mask_at: Callable[[int], np.ndarray | None], points: np.ndarray,
                      res: int, margin: float, plane=None) -> Sphere:
    """Minimum enclosing ball of the visual hull and the SfM points inside the masks, x ``margin``.

    With the supporting ``plane`` (n, d) the hull is cut at it: seen from above, the hull of an
    object standing on the ground reaches below the ground (every view's silhouette covers
    the cone under the object).

    Points farther than POINT_SLACK x the hull's radius from its centre are left out (stray
    matches on a wrong mask); points may otherwise widen the sphere where masks cut the object.
    """
    voxels, size = visual_hull(cams, mask_at, res)
    info = {"method": "carving+points", "hull_voxels": int(len(voxels)), "voxel_size": size}
    if plane is not None and len(voxels):
        above = voxels @ plane[0] + plane[1] > -size
        if above.any():
            voxels = voxels[above]
            info["cut_at_plane"] = int((~above).sum())
    pad = 0.5 * math.sqrt(3.0) * size
    if len(voxels):
        hull_center, hull_radius = min_enclosing_ball(voxels)
        info["hull_radius"] = hull_radius + pad
        near = points[np.linalg.norm(points - hull_center, axis=1) <= POINT_SLACK * (hull_radius + pad)]
        center, radius = min_enclosing_ball(np.concatenate([voxels, near]))
        radius += pad
    elif len(points):
        near = points
        center, radius = min_enclosing_ball(points)
    else:
        return Sphere(np.zeros(3), 0.0, info)
    info["points_used"] = int(len(near))
    return Sphere(center, radius * margin, info)


def implausible(sphere: Sphere, cams: Cameras) -> str | None:
    """Why ``sphere`` cannot bound the object of this capture, or None. Checked against the
    cameras alone: the radius against the ball the views frame around their convergence point
    (MIN_FRAMED_RATIO .. MAX_FRAMED_RATIO), and the centre in front of and inside most views."""
    framed = framed_radius(cams, look_at_point(cams))
    ratio = sphere.radius / framed if framed > 0 else float("nan")
    sphere.info.update(framed_radius=framed, radius_to_framed=ratio)
    if not np.isfinite(ratio) or not MIN_FRAMED_RATIO <= ratio <= MAX_FRAMED_RATIO:
        return (f"radius {sphere.radius:.4g} is {ratio:.3g} x the radius {framed:.4g} that the views frame "
                f"around the point they look at (plausible: {MIN_FRAMED_RATIO:g} to {MAX_FRAMED_RATIO:g})")
    in_view = int(frustum_counts(cams, sphere.center[None])[0])
    if in_view < MIN_CENTRE_IN_VIEW * len(cams):
        return f"its centre is in view in only {in_view} of {len(cams)} frames"
    return None


def sphere_without_masks(cams: Cameras, points: np.ndarray, margin: float) -> Sphere:
    """Points inside at least MIN_SEEN_RATIO of the frusta, trimmed at NO_MASK_PERCENTILE of
    their distance to the look-at point, x ``margin``; capped by the ball the median view frames
    (``framed_radius``)."""
    target = look_at_point(cams)
    framed = framed_radius(cams, target)
    shared = points[frustum_counts(cams, points) >= MIN_SEEN_RATIO * len(cams)] if len(points) else points
    info = {"method": "points+frusta", "shared_points": int(len(shared)), "framed_radius": framed}
    if len(shared) < NO_MASK_MIN_POINTS:
        return Sphere(target, framed, info)
    radius = float(np.percentile(np.linalg.norm(shared - target, axis=1), NO_MASK_PERCENTILE)) * margin
    info["points_radius"] = radius
    return Sphere(target, min(radius, framed), info)


def frustum_counts(cams: Cameras, points: np.ndarray) -> np.ndarray:
    """How many views each point projects into (in front of the camera, inside the image)."""
    counts = np.zeros(len(points), np.int32)
    w2c = cams.w2c
    for i in range(len(cams)):
        uv, depth = project(points, cams.K[i], w2c[i])
        counts += (depth > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < cams.width) & (uv[:, 1] >= 0) & (uv[:, 1] < cams.height)
    return counts


def clear_cameras(sphere: Sphere, cams: Cameras) -> Sphere:
    """Shrink the radius below CAMERA_CLEARANCE x the nearest camera distance when needed."""
    nearest = float(np.linalg.norm(cams.centers - sphere.center, axis=1).min())
    limit = CAMERA_CLEARANCE * nearest
    if sphere.radius > limit:
        sphere.info["shrunk_from"] = sphere.radius
        sphere.radius = limit
    return sphere
