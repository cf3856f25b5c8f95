"""Pure metric functions of the evaluate stage: Chamfer-L1 / F-score between point sets,
silhouette IoU (mesh rasterised into a camera vs a mask), PSNR, and the similarity alignment
(Umeyama via ``pipeline.align``, trimmed rigid ICP) that brings a reconstruction into the ground-truth frame.

Conventions: 4x4 similarity ``T`` acts on column points, ``x' = T @ [x, 1]``; cameras follow
``pipeline.cameras`` (OpenCV axes, pixel centres at +0.5). Everything takes numpy arrays.
"""
from __future__ import annotations

import numpy as np


def nearest_distances(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Distance of every point of ``src`` to its nearest neighbour in ``dst`` (scipy cKDTree)."""
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(dst).query(src, k=1, workers=-1)
    return dist


def chamfer_fscore(pred_points: np.ndarray, gt_points: np.ndarray, thresholds) -> dict:
    """Chamfer-L1 and F-scores between two point samples of surfaces.

    accuracy = mean distance pred -> gt, completeness = mean distance gt -> pred,
    chamfer_l1 = their average. For each absolute threshold tau: precision = share of pred
    points within tau of gt, recall = share of gt points within tau of pred, F = harmonic mean.
    """
    return _summary(nearest_distances(pred_points, gt_points), nearest_distances(gt_points, pred_points), thresholds)


def _summary(d_pred: np.ndarray, d_gt: np.ndarray, thresholds) -> dict:
    acc, comp = float(d_pred.mean()), float(d_gt.mean())
    scores = []
    for tau in thresholds:
        p = float((d_pred <= tau).mean())
        r = float((d_gt <= tau).mean())
        f = 2.0 * p * r / (p + r) if p + r > 0 else 0.0
        scores.append({"tau": float(tau), "precision": p, "recall": r, "fscore": f})
    return {"accuracy": acc, "completeness": comp, "chamfer_l1": 0.5 * (acc + comp), "fscores": scores}


def surface_distances(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, k: int = 8,
                      samples: int | None = None, seed: int = 0) -> np.ndarray:
    """Distance of every point to the surface of a triangle mesh, without the sampling floor of
    :func:`nearest_distances` (a perfect mesh scored on 200k/100k samples reads 0.12 % of its
    diagonal: benchmarks/RESULTS.md). Candidate faces per point: those of its ``k`` nearest among
    the face centroids and ``samples`` area-weighted surface samples (default 4 per face, 100k to
    1M; scipy cKDTree); the distance
    is the least exact point-triangle distance over them (``trimesh.triangles.closest_point``).
    When the true nearest face is not a candidate the result errs high, never below the truth."""
    import trimesh
    from scipy.spatial import cKDTree

    points = np.asarray(points, np.float64)
    tris = np.asarray(vertices, np.float64)[np.asarray(faces)]
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    samples = samples or int(np.clip(4 * len(tris), 100_000, 1_000_000))
    sampled, sampled_face = trimesh.sample.sample_surface(mesh, samples, seed=seed)
    sites = np.concatenate([tris.mean(1), np.asarray(sampled)])
    site_face = np.concatenate([np.arange(len(tris)), np.asarray(sampled_face)])
    k = min(k, len(sites))
    _, idx = cKDTree(sites).query(points, k=k, workers=-1)
    cand = site_face[np.asarray(idx).reshape(len(points), k)]
    best = np.full(len(points), np.inf)
    for j in range(k):  # k vectorised passes keep memory at one (N, 3, 3) block
        near = trimesh.triangles.closest_point(tris[cand[:, j]], points)
        best = np.minimum(best, np.linalg.norm(near - points, axis=1))
    return best


def chamfer_fscore_surface(pred_points: np.ndarray, pred_mesh: tuple, gt_points: np.ndarray, gt_mesh: tuple,
                           thresholds) -> dict:
    """:func:`chamfer_fscore` with point-to-surface distances: accuracy = mean distance of the
    predicted samples to the GT surface, completeness = of the GT samples to the predicted
    surface (meshes as ``(vertices, faces)``). Zero for a perfect mesh at any sample count."""
    d_pred = surface_distances(pred_points, *gt_mesh)
    d_gt = surface_distances(gt_points, *pred_mesh)
    return _summary(d_pred, d_gt, thresholds)


def object_region(points: np.ndarray, lo, hi, margin: float, floor: float | None = None,
                  floor_margin: float = 0.0) -> np.ndarray:
    """Boolean mask of ``points`` inside the box ``[lo - margin, hi + margin]`` (the object's
    ground-truth bounds grown by ``margin``); with ``floor`` (z of a supporting plane, world z up)
    the box starts at ``floor + floor_margin`` instead, so the plane itself is left out."""
    lo = np.asarray(lo, np.float64) - margin
    hi = np.asarray(hi, np.float64) + margin
    if floor is not None:
        lo[2] = floor + floor_margin
    return np.all((points >= lo) & (points <= hi), axis=1)


def psnr(pred: np.ndarray, gt: np.ndarray, max_val: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two images with values in [0, max_val]."""
    mse = float(np.mean((np.asarray(pred, np.float64) - np.asarray(gt, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(max_val ** 2 / mse))


def silhouette_iou(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    pred, gt = np.asarray(pred_mask, bool), np.asarray(gt_mask, bool)
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def project_vertices(vertices: np.ndarray, K: np.ndarray, c2w: np.ndarray):
    """Vertex pixel coordinates (V, 2) and camera depths (V,) as float32 torch tensors."""
    import torch

    w2c = np.linalg.inv(c2w)
    cam = np.asarray(vertices, np.float64) @ w2c[:3, :3].T + w2c[:3, 3]
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        xy = cam[:, :2] / np.maximum(z, 1e-9)[:, None] * np.array([K[0, 0], K[1, 1]]) + K[:2, 2]
    xy = np.where(np.isfinite(xy), xy, -1e6)
    return torch.as_tensor(xy, dtype=torch.float32), torch.as_tensor(z, dtype=torch.float32)


def render_silhouette(vertices: np.ndarray, faces: np.ndarray, K: np.ndarray, c2w: np.ndarray,
                      width: int, height: int, supersample: int = 2) -> np.ndarray:
    """Boolean (height, width) mask of the mesh seen by one camera.

    Rendered at ``supersample`` x the resolution; a pixel is covered when at least half of its
    samples hit a face (the rule of ``pipeline.synthetic`` masks).
    """
    import torch

    from pipeline.raster import rasterize

    s = int(supersample)
    Ks = np.diag([s, s, 1.0]) @ K
    xy, z = project_vertices(vertices, Ks, c2w)
    face, _ = rasterize(xy, z, torch.as_tensor(np.asarray(faces), dtype=torch.int64), width * s, height * s)
    hit = (face >= 0).view(height, s, width, s).sum((1, 3))
    return (2 * hit >= s * s).numpy()


# ---------------------------------------------------------------- alignment

def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> np.ndarray:
    """Least-squares similarity mapping points ``src`` (N, 3) onto ``dst`` as a 4x4 matrix
    (``pipeline.align.umeyama`` returns it as (s, R, t))."""
    from pipeline.align import umeyama as fit

    s, R, t = fit(src, dst, with_scale=with_scale)
    T = np.eye(4)
    T[:3, :3] = s * R
    T[:3, 3] = t
    return T


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float64) @ T[:3, :3].T + T[:3, 3]


def similarity_scale(T: np.ndarray) -> float:
    return float(np.cbrt(abs(np.linalg.det(T[:3, :3]))))


def icp_refine(src: np.ndarray, dst: np.ndarray, init: np.ndarray, iterations: int = 20,
               trim: float = 0.8, tol: float = 1e-7, with_scale: bool = False) -> tuple[np.ndarray, dict]:
    """Trimmed rigid ICP: refine similarity ``init`` (src -> dst) by rigid updates.

    Each step pairs every transformed src point with its nearest dst point, keeps the ``trim``
    share with the smallest distances (so parts missing on one side do not pull) and applies
    the best rigid motion. Returns the refined 4x4 and {"iterations", "rmse_before", "rmse_after"}.
    """
    from scipy.spatial import cKDTree

    tree = cKDTree(dst)
    T = np.array(init, np.float64)
    rmse_first = rmse = None
    done = 0
    for done in range(1, iterations + 1):
        moved = transform_points(T, src)
        dist, idx = tree.query(moved, k=1, workers=-1)
        keep = dist <= np.quantile(dist, trim)
        rmse = float(np.sqrt(np.mean(dist[keep] ** 2)))
        rmse_first = rmse if rmse_first is None else rmse_first
        step = umeyama(moved[keep], dst[idx[keep]], with_scale=with_scale)
        T = step @ T
        if np.linalg.norm(step - np.eye(4)) < tol:
            break
    dist, _ = tree.query(transform_points(T, src), k=1, workers=-1)
    rmse_after = float(np.sqrt(np.mean(np.sort(dist)[: max(1, int(trim * len(dist)))] ** 2)))
    return T, {"iterations": done, "rmse_before": rmse_first, "rmse_after": rmse_after}


def cube_rotations() -> list[np.ndarray]:
    """The 24 proper rotations that map the coordinate axes onto themselves."""
    import itertools

    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            R = np.zeros((3, 3))
            R[range(3), perm] = signs
            if np.linalg.det(R) > 0:
                out.append(R)
    return out


def align_by_shape(src: np.ndarray, dst: np.ndarray, iterations: int = 30) -> tuple[np.ndarray, dict]:
    """Similarity src -> dst with no correspondences: centroids and RMS radii give the start;
    the principal axes of src are mapped onto those of dst in each of the 24 axis orders and
    signs, each start is refined by scaled trimmed ICP, and the best fit wins."""
    c_src, c_dst = src.mean(0), dst.mean(0)
    scale = np.sqrt(((dst - c_dst) ** 2).sum(1).mean() / ((src - c_src) ** 2).sum(1).mean())
    axes_src = np.linalg.svd(src - c_src, full_matrices=False)[2].T  # columns: principal axes
    axes_dst = np.linalg.svd(dst - c_dst, full_matrices=False)[2].T
    for axes in (axes_src, axes_dst):
        if np.linalg.det(axes) < 0:
            axes[:, 2] *= -1
    best = None
    for P in cube_rotations():
        R = axes_dst @ P @ axes_src.T
        T0 = np.eye(4)
        T0[:3, :3] = scale * R
        T0[:3, 3] = c_dst - scale * R @ c_src
        T, info = icp_refine(src, dst, T0, iterations, with_scale=True)
        if best is None or info["rmse_after"] < best[1]["rmse_after"]:
            best = (T, info)
    return best


def motion_size(T: np.ndarray) -> tuple[float, float]:
    """(rotation angle in degrees, translation length) of the rotation part of a similarity."""
    s = similarity_scale(T)
    R = T[:3, :3] / s
    angle = np.degrees(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)))
    return float(angle), float(np.linalg.norm(T[:3, 3]))
