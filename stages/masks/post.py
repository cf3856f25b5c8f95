"""Mask helpers shared by every masking method: clean-up, atomic PNG I/O, and the multi-view
silhouette consensus (a coarse voxel visual hull carved from all masks and reprojected).

Masks are boolean arrays (H, W) in memory and uint8 0/255 PNGs on disk. Cameras are
``pipeline.cameras.Cameras`` (OpenCV axes, pixel centres at +0.5).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cameras import Cameras, look_at_point, pixels_in_image, project
from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_bytes
from pipeline.images import read_mask


def mask_or_none(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """A mask PNG as bool (H, W), or None when missing, unreadable or of another ``shape``
    (H, W): what a killed run left half-written is made again."""
    try:
        return read_mask(path, None if shape is None else (shape[1], shape[0]))
    except InputError:
        return None


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Write a bool mask as a 0/255 PNG atomically (temp file + os.replace)."""
    import cv2

    ok, buf = cv2.imencode(".png", np.where(mask, 255, 0).astype(np.uint8))
    if not ok:
        raise OSError(f"cannot encode mask {path}")
    atomic_write_bytes(Path(path), buf.tobytes())


def disk(radius: int) -> np.ndarray:
    import cv2

    r = max(int(radius), 0)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow by a disk of ``radius`` pixels (a distance transform for large radii: O(pixels))."""
    import cv2

    if radius <= 0 or not mask.any():
        return mask.copy()
    if radius <= 4:
        return cv2.dilate(mask.astype(np.uint8), disk(radius)) > 0
    dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist <= radius


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Shrink by a disk of ``radius`` pixels; the image border does not erode."""
    import cv2

    if radius <= 0 or not mask.any():
        return mask.copy()
    if radius <= 4:
        return cv2.erode(mask.astype(np.uint8), disk(radius), borderType=cv2.BORDER_REPLICATE) > 0
    pad = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_REPLICATE)
    dist = cv2.distanceTransform(pad, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    return dist > radius


def keep_largest(mask: np.ndarray, count: int) -> np.ndarray:
    """Keep the ``count`` largest 8-connected components (count <= 0 keeps all)."""
    import cv2

    if count <= 0 or not mask.any():
        return mask.copy()
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n - 1 <= count:
        return mask.copy()
    order = np.argsort(-stats[1:, cv2.CC_STAT_AREA])[:count] + 1
    return np.isin(labels, order)


def fill_holes(mask: np.ndarray, max_share: float = 0.05) -> np.ndarray:
    """Fill background regions not connected to the image border that are smaller than
    ``max_share`` of the mask (speckles in a segmentation; the hole of a ring stays open)."""
    import cv2

    if not mask.any():
        return mask.copy()
    bg = (~mask).astype(np.uint8)
    n, labels = cv2.connectedComponents(bg, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    sizes = np.bincount(labels.ravel(), minlength=n)
    small = np.flatnonzero(sizes <= max_share * mask.sum())
    holes = np.isin(labels, np.setdiff1d(small[small > 0], border))
    return mask | holes


def clean_mask(mask: np.ndarray, keep_components: int, fill: bool, dilate_px: int) -> np.ndarray:
    """Post-processing: largest components, hole filling, then optional dilation."""
    out = keep_largest(mask.astype(bool), keep_components)
    if fill:
        out = fill_holes(out)
    return dilate(out, dilate_px)


# ---------------------------------------------------------------- multi-view consensus


@dataclass
class Hull:
    occ: np.ndarray  # (R, R, R) bool occupancy
    lo: np.ndarray  # (3,) grid corner (world)
    voxel: float  # voxel edge length (world)

    def centres(self, only_surface: bool = True) -> np.ndarray:
        occ = self.occ
        if only_surface:
            from scipy.ndimage import binary_erosion

            occ = occ & ~binary_erosion(occ)
        idx = np.argwhere(occ)
        return self.lo + (idx + 0.5) * self.voxel

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which of ``points`` (M, 3) lie in an occupied voxel."""
        ijk = np.floor((np.asarray(points, float) - self.lo) / self.voxel).astype(np.int64)
        inside = ((ijk >= 0) & (ijk < np.array(self.occ.shape))).all(1)
        out = np.zeros(len(ijk), bool)
        out[inside] = self.occ[tuple(ijk[inside].T)]
        return out


def triangulate_centre(masks: list[np.ndarray | None], cams: Cameras) -> np.ndarray | None:
    """Least-squares point closest to the rays through the mask centroids."""
    A, b = np.zeros((3, 3)), np.zeros(3)
    used = 0
    for i, m in enumerate(masks):
        if m is None or m.sum() < 4:
            continue
        v, u = np.nonzero(m)
        xy = (np.array([u.mean() + 0.5, v.mean() + 0.5]) - cams.K[i][:2, 2]) / np.diag(cams.K[i])[:2]
        d = cams.c2w[i, :3, :3] @ np.array([xy[0], xy[1], 1.0])
        d /= np.linalg.norm(d)
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ cams.c2w[i, :3, 3]
        used += 1
    if used < 2 or np.linalg.cond(A) > 1e8:
        return None
    return np.linalg.solve(A, b)


def _initial_box(masks, cams, centre) -> float:
    """Half edge of a cube around ``centre`` that holds every mask's back-projected extent."""
    half = 0.0
    for i, m in enumerate(masks):
        if m is None or not m.any():
            continue
        v, u = np.nonzero(m)
        depth = float((np.linalg.inv(cams.c2w[i]) @ np.append(centre, 1.0))[2])
        if depth <= 0:
            continue
        ext = max(u.max() - u.min(), v.max() - v.min()) + 1
        half = max(half, 0.75 * ext * depth / float(cams.K[i][0, 0]))
    return half


def _view_order(n: int) -> list[int]:
    """Views spread around the sequence first (golden-ratio stride): early views carve most."""
    return sorted(range(n), key=lambda i: (i * 0.6180339887) % 1.0)


def carve(masks, cams: Cameras, lo: np.ndarray, size: float, res: int, tol: float,
          min_views: int = 2, init: np.ndarray | None = None) -> Hull:
    """Keep a voxel when, among the views it projects into, at most ``tol`` of them miss it.

    A view whose mask is None, or a voxel projecting outside an image, casts no vote. Voxels
    missed by more than ``tol`` of all views can never pass and are dropped as carving goes.
    ``init`` (bool (res, res, res)) limits the candidates.
    """
    voxel = size / res
    views = [i for i in _view_order(len(masks)) if masks[i] is not None]
    max_miss = tol * len(views)
    alive = np.arange(res ** 3, dtype=np.int64) if init is None else np.flatnonzero(init)
    inside = np.zeros(res ** 3, np.int32)
    seen = np.zeros(res ** 3, np.int32)
    lo32 = np.asarray(lo, np.float32)
    for i in views:
        ijk = np.stack([alive // (res * res), (alive // res) % res, alive % res], 1).astype(np.float32)
        pts = lo32 + (ijk + 0.5) * np.float32(voxel)
        sel, row, col, _ = pixels_in_image(pts, cams.K[i], np.linalg.inv(cams.c2w[i]), masks[i].shape)
        hit = np.zeros(len(alive), bool)
        hit[sel] = masks[i][row, col]
        seen[alive[sel]] += 1
        inside[alive] += hit
        alive = alive[(seen[alive] - inside[alive]) <= max_miss]
    keep = np.zeros(res ** 3, bool)
    a = alive[(seen[alive] >= min_views) & (inside[alive] >= np.ceil((1.0 - tol) * seen[alive] - 1e-9))]
    keep[a] = True
    return Hull(keep.reshape(res, res, res), np.asarray(lo, np.float64), voxel)


def visual_hull(masks, cams: Cameras, res: int = 64, tol: float = 0.2) -> Hull | None:
    """Two-level carving: a coarse cube around the triangulated mask centre, then a tight box."""
    centre = triangulate_centre(masks, cams)
    if centre is None:
        return None
    half = _initial_box(masks, cams, centre)
    if half <= 0:
        return None
    coarse = carve(masks, cams, centre - half, 2 * half, max(res // 2, 16), tol)
    if not coarse.occ.any():
        return None
    idx = np.argwhere(coarse.occ)
    lo = coarse.lo + (idx.min(0) - 1) * coarse.voxel
    hi = coarse.lo + (idx.max(0) + 2) * coarse.voxel
    size = float((hi - lo).max())
    lo = (lo + hi) / 2 - size / 2
    half_res = max(res // 2, 8)
    mid = carve(masks, cams, lo, size, half_res, tol)
    if res != 2 * half_res:
        return carve(masks, cams, lo, size, res, tol)
    from scipy.ndimage import binary_dilation

    init = binary_dilation(mid.occ, np.ones((3, 3, 3), bool))
    init = init.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    return carve(masks, cams, lo, size, res, tol, init=init)


def silhouette(hull: Hull, cams: Cameras, i: int, shape: tuple[int, int]) -> np.ndarray:
    """Reproject the hull's surface voxels into view ``i`` as a filled silhouette."""
    import cv2

    out = np.zeros(shape, np.uint8)
    pts = hull.centres()
    if len(pts) == 0:
        return out > 0
    uv, depth = project(pts, cams.K[i], np.linalg.inv(cams.c2w[i]))
    front = depth > 1e-9
    uv, depth = uv[front], depth[front]
    u, v = np.floor(uv[:, 0]).astype(np.int64), np.floor(uv[:, 1]).astype(np.int64)
    ok = (u >= 0) & (u < shape[1]) & (v >= 0) & (v < shape[0])
    out[v[ok], u[ok]] = 1
    # Close the gaps between the splatted voxel centres (about one voxel apart) without growing.
    r = int(np.ceil(hull.voxel * float(cams.K[i][0, 0]) / np.median(depth))) if len(depth) else 0
    if r > 0:
        pad = r + 1
        big = cv2.copyMakeBorder(out, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        big = cv2.morphologyEx(big, cv2.MORPH_CLOSE, disk(r))
        out = big[pad:-pad, pad:-pad]
    return fill_holes(out > 0)


def consensus_hull(masks: list[np.ndarray], cams: Cameras | None, res: int = 64) -> Hull | None:
    """The tolerant visual hull that ``consistency`` judges the masks by (None without one)."""
    return visual_hull(masks, cams, res=res, tol=0.25) if cams is not None and len(masks) >= 3 else None


def consistency(masks: list[np.ndarray], cams: Cameras | None, res: int = 64,
                outside_thresh: float = 0.1, coverage_ratio: float = 2.0, hull: Hull | None = None) -> list[dict]:
    """Per-frame coverage and flags: coverage far from the median, or mask pixels outside the
    silhouette consensus (visual hull of all masks reprojected; ``hull``, else carved here)."""
    cover = np.array([float(m.mean()) for m in masks])
    med = float(np.median(cover)) if len(cover) else 0.0
    if hull is None:
        hull = consensus_hull(masks, cams, res)
    out = []
    for i, m in enumerate(masks):
        rec: dict = {"coverage": round(float(cover[i]), 5), "flags": []}
        if not m.any():
            rec["flags"].append("empty")
        elif med > 0 and not (med / coverage_ratio <= cover[i] <= med * coverage_ratio):
            rec["flags"].append("coverage_outlier")
        if hull is not None and m.any():
            sil = silhouette(hull, cams, i, m.shape)
            band = max(2, int(round(0.01 * max(m.shape))))
            outside = float((m & ~dilate(sil, band)).sum() / m.sum())
            rec["outside_consensus"] = round(outside, 4)
            if outside > outside_thresh:
                rec["flags"].append("outside_consensus")
        out.append(rec)
    return out


def centre_offsets(masks: list[np.ndarray], cams: Cameras) -> list[float]:
    """Per view: the distance from the point the cameras look at (their convergence point, the
    object's centre in an orbit) to the nearest mask pixel, over the mask's bounding-box
    diagonal; 0 when the mask covers that point, inf when it is empty or the point is behind."""
    target = look_at_point(cams)
    out = []
    for i, m in enumerate(masks):
        uv, depth = project(target[None], cams.K[i], cams.w2c[i])
        rows, cols = np.nonzero(m)
        if depth[0] <= 0 or not len(rows):
            out.append(float("inf"))
            continue
        gap = float(np.hypot(cols + 0.5 - uv[0, 0], rows + 0.5 - uv[0, 1]).min())
        out.append(gap / float(np.hypot(np.ptp(cols) + 1, np.ptp(rows) + 1)))
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
