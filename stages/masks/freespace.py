"""The object's hull from the cameras and what is seen behind it: no point on the object and no
colour contrast needed.

In an orbit the cameras converge on the object (``look_at_point``) and frame a ball around it
(``framed_radius``). Plane-sweep stereo of every view against its nearest neighbours gives, at
the pixels with texture, the depth of what the pixel sees; every voxel in front of that depth is
empty (free-space carving). A textureless object has no such pixels, so nothing is seen through
it and its voxels survive, while the textured ground and background behind and around it carve
the space away. The supporting plane (from the SfM points) bounds the hull from below. What is
left is a hull a little fatter than the object (the stereo window and the depth steps), which
seeds GrabCut in ``stages.masks.grabcut``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.cameras import (
    Cameras,
    framed_radius,
    look_at_point,
    orbit_distance,
    pixels_in_image,
    supporting_plane,
)
from stages.masks.post import Hull

WORK_SIDE = 256  # stereo runs on images downscaled to this long side
MAX_VIEWS = 48  # at most this many views (spread over the orbit) carve
NEIGHBOURS = 4  # each view is matched against this many nearest views ...
SINGLE_PENALTY = 0.15  # ... scoring a depth by the mean NCC of the best two of them (occlusions), or
                       # of the only one that sees the pixel less this
MAX_SPACING_DEG = 16.0  # views farther apart than this (median, nearest neighbour) are not matched
MIN_ANGLE_DEG = 2.0  # neighbours closer than this (nearly no baseline) are skipped
DEPTHS = 80  # depth hypotheses, uniform in inverse depth
WINDOW = 7  # NCC window (pixels, at WORK_SIDE)
MIN_STD = 3.0  # a pixel has texture when its window's grey std (0..255) is above this
MIN_NCC = 0.7  # ... and its best depth scores at least this NCC
MIN_GAP = 0.05  # ... by this much above any depth more than two steps away (no ambiguity)
FREE_VOTES = 2  # a voxel is empty when this many views see something behind it, and at least
FREE_MIN_SHARE = 0.1  # this share of the views that have it in frame (stereo outliers grow with views);
FREE_SHARE = 0.25  # or this share of them when they are few,
MIN_SEEN = 3  # ... or when fewer views than this (and than MIN_SEEN_SHARE of them) have it in frame
MIN_SEEN_SHARE = 0.1
MARGIN_STEPS = 1.5  # "behind" = farther by this many depth steps (and half a voxel)
RES = 72  # carving grid (coarse pass over the region's cube, then a fine pass on the survivors)
MAX_FILL = 0.15  # a coarse surviving volume over this share of the region ball's (the ball in the carving
                 # cube: REGION framed radii, less with a near camera): the views saw nothing behind it
PLANE_TOL = 0.01  # supporting plane: inliers within this share of the camera distance (SfM points; x2 stereo)
REGION = 2.0  # carving starts from a cube this many framed radii around the target (cameras kept out)
REACH = 1.0  # the object is the largest part that comes this close (x the framed radius) to the target


@dataclass
class DepthMap:
    inv_depth: np.ndarray  # (h, w) float32, inverse depth of what the pixel sees; nan: no texture
    margin: np.ndarray  # (h, w) float32, inverse-depth tolerance (MARGIN_STEPS steps; ~0 on the plane)
    K: np.ndarray  # intrinsics at the map's size
    w2c: np.ndarray


def _grey(image: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    if scale < 1.0:
        g = cv2.resize(g, (max(8, round(g.shape[1] * scale)), max(8, round(g.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA)
    return g


def neighbours(cams: Cameras, i: int, target: np.ndarray, count: int = NEIGHBOURS) -> list[int]:
    """The ``count`` views seeing ``target`` from the nearest directions (at least MIN_ANGLE_DEG)."""
    d = cams.centers - target
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    ang = np.degrees(np.arccos(np.clip(d @ d[i], -1.0, 1.0)))
    order = [j for j in np.argsort(ang) if j != i and ang[j] >= MIN_ANGLE_DEG]
    return order[:count]


def view_angle(cams: Cameras, i: int, others: list[int], target: np.ndarray) -> float:
    """Degrees between the directions from ``target`` to camera ``i`` and to the first of ``others``."""
    if not others:
        return 180.0
    a, b = cams.centers[i] - target, cams.centers[others[0]] - target
    return float(np.degrees(np.arccos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1))))


def _box(x: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.blur(x, (WINDOW, WINDOW), borderType=cv2.BORDER_REFLECT)


def sweep(i: int, grey: list[np.ndarray], K: np.ndarray, w2c: np.ndarray, nbrs: list[int],
          inv: np.ndarray) -> np.ndarray:
    """Inverse depth per pixel of view ``i`` (nan where it has no texture or no clear match):
    fronto-parallel planes at ``inv`` (1/z), NCC against each neighbour warped by the plane's
    homography, the best two neighbours averaged."""
    import cv2

    I = grey[i]
    h, w = I.shape
    mI = _box(I)
    sI = np.sqrt(np.maximum(_box(I * I) - mI * mI, 0.0))
    T = np.array([[1.0, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    to_i = np.linalg.inv(K[i]) @ T
    from_j = np.linalg.inv(T)
    scores = np.empty((len(inv), h, w), np.float32)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    ones = np.ones((grey[nbrs[0]].shape if nbrs else I.shape), np.uint8)
    # the plane at inverse depth q maps view i to neighbour j by T^-1 K_j (R + t [0 0 q]) K_i^-1 T
    # = A + q B: per neighbour A (the rotation's part) and B (the translation's), per depth a sum
    hom = []
    for j in nbrs:
        R = w2c[j][:3, :3] @ w2c[i][:3, :3].T
        t = w2c[j][:3, 3] - R @ w2c[i][:3, 3]
        KT = from_j @ K[j]
        hom.append((KT @ R @ to_i, KT @ np.outer(t, [0.0, 0.0, 1.0]) @ to_i))
    for k, q in enumerate(inv):
        first = np.full((h, w), -1.0, np.float32)  # the best and second best NCC over the neighbours
        second = first.copy()
        for j, (A, B) in zip(nbrs, hom):
            H = A + q * B
            J = cv2.warpPerspective(grey[j], H, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
            inside = cv2.warpPerspective(ones, H, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP) > 0
            mJ = _box(J)
            sJ = np.sqrt(np.maximum(_box(J * J) - mJ * mJ, 0.0))
            ncc = (_box(I * J) - mI * mJ) / np.maximum(sI * sJ, 1e-3)
            ncc[~inside] = -1.0  # outside the neighbour's image
            np.maximum(second, np.minimum(first, ncc), out=second)
            np.maximum(first, ncc, out=first)
        # two neighbours agreeing, or one alone (the other cannot see the pixel) by a stricter margin
        scores[k] = np.where(second > -1.0, 0.5 * (first + second), first - SINGLE_PENALTY)
    best = scores.argmax(0)
    top = np.take_along_axis(scores, best[None], 0)[0]
    idx = np.arange(len(inv))[:, None, None]
    far = np.abs(idx - best[None]) > 2
    second = np.where(far, scores, -1.0).max(0)
    ok = (sI > MIN_STD) & (top >= MIN_NCC) & (top - second >= MIN_GAP)
    # sub-step: the vertex of the parabola through the best score and its two neighbours
    lo_s = np.take_along_axis(scores, np.clip(best - 1, 0, len(inv) - 1)[None], 0)[0]
    hi_s = np.take_along_axis(scores, np.clip(best + 1, 0, len(inv) - 1)[None], 0)[0]
    curv = lo_s - 2 * top + hi_s
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(curv < 0, np.clip(0.5 * (lo_s - hi_s) / curv, -0.5, 0.5), 0.0)
    shift[(best == 0) | (best == len(inv) - 1)] = 0.0
    step = inv[1] - inv[0]
    return np.where(ok, inv[best] + shift * step, np.nan).astype(np.float32)


def plane_inv_depth(K: np.ndarray, w2c: np.ndarray, shape: tuple[int, int], plane) -> np.ndarray:
    """Inverse depth at which each pixel's ray meets ``plane`` (n, d); 0 where it never does."""
    h, w = shape
    v, u = np.mgrid[0:h, 0:w]
    rays = np.stack([u + 0.5, v + 0.5, np.ones_like(u)], -1).reshape(-1, 3) @ np.linalg.inv(K).T  # z = 1
    c2w = np.linalg.inv(w2c)
    n, d = np.asarray(plane[0], float), float(plane[1])
    along = rays @ (c2w[:3, :3].T @ n)  # n . (R^T ray) per unit of depth
    height = n @ c2w[:3, 3] + d  # camera's height above the plane
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(along < 0, -along / height, 0.0)
    return inv.reshape(h, w).astype(np.float32)


def depth_maps(images, cams: Cameras, views: list[int], target: np.ndarray, radius: float,
               threads: int = 1) -> list[DepthMap]:
    """One DepthMap per view in ``views``, at WORK_SIDE, ``threads`` views at a time."""
    from concurrent.futures import ThreadPoolExecutor

    scale = min(1.0, WORK_SIDE / max(cams.width, cams.height))
    nb = {i: neighbours(cams, i, target) for i in views}
    needed = sorted(set(views).union(*nb.values()))
    grey = {i: _grey(images(i), scale) for i in needed}
    h, w = grey[needed[0]].shape
    S = np.diag([w / cams.width, h / cams.height, 1.0])
    K = {i: S @ cams.K[i] for i in needed}
    w2c = {i: np.linalg.inv(cams.c2w[i]) for i in needed}

    def one(i: int) -> DepthMap:
        z = float((w2c[i] @ np.append(target, 1.0))[2])
        inv = np.linspace(1.0 / max(z - 1.5 * radius, 0.2 * z), 1.0 / (20.0 * z), DEPTHS)
        inv_depth = sweep(i, grey, K, w2c, nb[i], inv)
        return DepthMap(inv_depth, np.full(inv_depth.shape, MARGIN_STEPS * (inv[0] - inv[1]), np.float32),
                        K[i], w2c[i])

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # OpenCV releases the GIL
        return list(pool.map(one, views))


def depth_points(maps: list[DepthMap], count: int = 20000) -> np.ndarray:
    """World points (M, 3) at the textured pixels of ``maps``, ``count`` at most (a fixed stride)."""
    out = []
    for m in maps:
        v, u = np.nonzero(np.isfinite(m.inv_depth) & (m.inv_depth > 0))
        z = 1.0 / m.inv_depth[v, u]
        cam = np.stack([u + 0.5, v + 0.5, np.ones_like(z)], 1) @ np.linalg.inv(m.K).T * z[:, None]
        c2w = np.linalg.inv(m.w2c)
        out.append(cam @ c2w[:3, :3].T + c2w[:3, 3])
    pts = np.concatenate(out) if out else np.zeros((0, 3))
    return pts[:: max(1, len(pts) // count)]


def snap_to_plane(maps: list[DepthMap], plane) -> None:
    """Pixels whose depth lands on ``plane`` (within their margin) take the plane's exact depth and
    no margin: the plane is known from many points, far better than one pixel's match."""
    for m in maps:
        on_plane = plane_inv_depth(m.K, m.w2c, m.inv_depth.shape, plane)
        ground = np.abs(m.inv_depth - on_plane) <= m.margin  # nan: False
        m.inv_depth[ground], m.margin[ground] = on_plane[ground], 0.0


def carve_free(maps: list[DepthMap], lo: np.ndarray, size: float, res: int, plane=None,
               init: np.ndarray | None = None) -> np.ndarray:
    """Occupancy (res, res, res): voxels that fewer than FREE_VOTES views see something behind,
    and above ``plane`` (n, d) by a voxel when given."""
    voxel = size / res
    alive = np.arange(res ** 3, dtype=np.int64) if init is None else np.flatnonzero(init)
    ijk = np.stack([alive // (res * res), (alive // res) % res, alive % res], 1)
    pts = (np.asarray(lo) + (ijk + 0.5) * voxel).astype(np.float32)
    if plane is not None:
        above = pts @ plane[0].astype(np.float32) + np.float32(plane[1]) > voxel
        alive, pts = alive[above], pts[above]
    free = np.zeros(len(alive), np.int32)
    seen_by = np.zeros(len(alive), np.int32)
    for m in maps:
        sel, row, col, z = pixels_in_image(pts, m.K, m.w2c, m.inv_depth.shape)
        seen_by[sel] += 1
        behind = 1.0 / (z + 0.5 * voxel) > m.inv_depth[row, col] + m.margin[row, col]  # nan compares False
        free[sel[behind]] += 1
    occ = np.zeros(res ** 3, bool)
    observed = seen_by >= max(MIN_SEEN, MIN_SEEN_SHARE * len(maps))
    carved = (free >= np.maximum(FREE_VOTES, FREE_MIN_SHARE * seen_by)) | ((free >= 1) & (free >= FREE_SHARE * seen_by))
    occ[alive[~carved & observed]] = True
    return occ.reshape(res, res, res)


def _component(occ: np.ndarray, lo: np.ndarray, voxel: float, target: np.ndarray, reach: float) -> np.ndarray:
    """The largest connected part of ``occ`` that comes within ``reach`` of ``target``."""
    from scipy.ndimage import label

    lab, n = label(occ)
    if n <= 1:
        return occ
    idx = np.argwhere(occ)
    dist = np.linalg.norm(lo + (idx + 0.5) * voxel - target, axis=1)
    sizes = np.bincount(lab[occ], minlength=n + 1)
    near = set(lab[tuple(idx[dist <= max(reach, dist.min() + voxel)].T)].tolist())
    return lab == max(near, key=lambda c: sizes[c])


@dataclass
class Stereo:
    """The depth maps of ``views`` (ground pixels snapped to ``plane``) around ``target``."""
    views: list[int]
    maps: list[DepthMap]
    plane: tuple | None  # (n, d) with n.x + d > 0 on the cameras' side
    target: np.ndarray
    radius: float  # framed radius
    info: dict


def stereo(images, cams: Cameras, points: np.ndarray, threads: int = 1) -> tuple[Stereo | None, dict]:
    """Depth maps of up to MAX_VIEWS views and the supporting plane (or None, with the reason)."""
    target = look_at_point(cams)
    radius = framed_radius(cams, target)
    views = sorted(range(len(cams)), key=lambda i: (i * 0.6180339887) % 1.0)[:MAX_VIEWS]
    scale = orbit_distance(cams, target)
    spacing = float(np.median([view_angle(cams, i, neighbours(cams, i, target, 1), target) for i in views]))
    if spacing > MAX_SPACING_DEG:
        return None, {"views": len(views), "reason": f"the views are {spacing:.0f} deg apart (stereo needs at most "
                                                     f"{MAX_SPACING_DEG:g})"}
    maps = depth_maps(images, cams, views, target, radius, threads)
    plane, source = (supporting_plane(points, cams, PLANE_TOL * scale), "sfm points") if len(points) >= 50 \
        else (None, "")
    if plane is None:  # no SfM points (known cameras) or none on a plane: the stereo points
        plane, source = supporting_plane(depth_points(maps), cams, 2 * PLANE_TOL * scale), "stereo"
    if plane is not None:
        snap_to_plane(maps, plane)
    info: dict = {"views": len(views), "framed_radius": round(radius, 6), "plane": source if plane else None,
                  "textured_share": round(float(np.mean([np.isfinite(m.inv_depth).mean() for m in maps])), 4)}
    return Stereo(views, maps, plane, target, radius, info), dict(info)


def add_views(st: Stereo, images, cams: Cameras, views, threads: int = 1) -> None:
    """Depth maps (snapped to the plane) for the ``views`` that ``st`` lacks, added to it (GrabCut
    seeded from what the stereo sees through needs one in every view, past MAX_VIEWS too)."""
    new = sorted(set(views) - set(st.views))
    if not new:
        return
    maps = depth_maps(images, cams, new, st.target, st.radius, threads)
    if st.plane is not None:
        snap_to_plane(maps, st.plane)
    st.views.extend(new)
    st.maps.extend(maps)


def object_hull(images, cams: Cameras, points: np.ndarray, log: logging.Logger,
                threads: int = 1, st: Stereo | None = None) -> tuple[Hull | None, dict]:
    """The object's hull (or None, with the reason in the info dict), carved from ``st`` (computed
    here when not given)."""
    if st is None:
        st, info = stereo(images, cams, points, threads)
        if st is None:
            return None, info
    info = dict(st.info)
    maps, plane, target, radius, views = st.maps, st.plane, st.target, st.radius, st.views
    source = info["plane"]
    nearest = float(np.linalg.norm(cams.centers - target, axis=1).min())
    reach = min(REGION * radius, 0.8 * nearest)  # an object cut by the frame border is larger than the framed ball
    lo, size = target - reach, 2.0 * reach
    coarse = carve_free(maps, lo, size, RES // 2, plane)
    fill = float(coarse.mean() / (np.pi / 6))  # the surviving volume over the region ball's (the ball in the cube)
    info["coarse_fill"] = round(fill, 4)
    if not coarse.any() or fill > MAX_FILL:
        info["reason"] = "nothing was left" if not coarse.any() else (
            f"a volume of {fill:.0%} of the region ball ({reach / radius:.2g} framed radii) survived the carving "
            "(too little seen behind it)")
        return None, info
    voxel = size / (RES // 2)
    coarse = _component(coarse, lo, voxel, target, REACH * radius)
    idx = np.argwhere(coarse)
    lo2 = lo + (idx.min(0) - 1) * voxel
    hi2 = lo + (idx.max(0) + 2) * voxel
    size2 = float((hi2 - lo2).max())
    lo2 = (lo2 + hi2) / 2 - size2 / 2
    fine = carve_free(maps, lo2, size2, RES, plane)
    if not fine.any():
        info["reason"] = "nothing was left at the fine level"
        return None, info
    info["fine_voxels"] = int(fine.sum())
    fine = _component(fine, lo2, size2 / RES, target, REACH * radius)
    info["voxels"] = int(fine.sum())
    log.info("masks: free-space hull from %d views (%.0f%% of pixels textured), %d voxels%s", len(views),
             100 * info["textured_share"], info["voxels"], f", above the supporting plane ({source})" if plane else "")
    return Hull(fine, lo2, size2 / RES), info
