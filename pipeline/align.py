"""Similarity alignment of estimated cameras to ground truth, and camera error measures.

``umeyama`` finds the similarity (s, R, t) with ``dst ~ s R src + t`` in the least-squares
sense (Umeyama 1991). ``camera_errors`` aligns estimated camera centres to ground-truth
centres with it and reports rotation errors (degrees) and centre errors (world units of the
ground truth); ``relative_rotation_errors`` needs no alignment at all. Camera-to-world
matrices are 4x4 with OpenCV axes (``pipeline.cameras``).
"""
from __future__ import annotations

import numpy as np


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R (3,3), t (3,)) minimising sum |dst_i - (s R src_i + t)|^2 over (N, 3) points."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3 or len(src) < 3:
        raise ValueError(f"umeyama needs two (N>=3, 3) arrays of the same shape, got {src.shape}, {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1.0
    R = U @ D @ Vt
    var_s = (xs ** 2).sum() / len(src)
    s = float(np.trace(np.diag(S) @ D) / var_s) if with_scale else 1.0
    t = mu_d - s * R @ mu_s
    return s, R, t


def apply_similarity(c2w: np.ndarray, s: float, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Camera-to-world matrices (N, 4, 4) moved by the world similarity x -> s R x + t."""
    out = np.array(c2w, dtype=np.float64, copy=True)
    out[:, :3, :3] = R @ out[:, :3, :3]
    out[:, :3, 3] = s * out[:, :3, 3] @ R.T + t
    return out


def rotation_angle_deg(Ra: np.ndarray, Rb: np.ndarray) -> np.ndarray:
    """Angle (degrees) of Ra^T Rb for stacks (N, 3, 3) of rotations."""
    rel = np.einsum("nji,njk->nik", Ra, Rb)
    cos = (np.trace(rel, axis1=1, axis2=2) - 1.0) / 2.0
    skew = np.stack([rel[:, 2, 1] - rel[:, 1, 2], rel[:, 0, 2] - rel[:, 2, 0], rel[:, 1, 0] - rel[:, 0, 1]], 1)
    sin = np.linalg.norm(skew, axis=1) / 2.0  # atan2 stays accurate near 0 (arccos does not)
    return np.degrees(np.arctan2(sin, cos))


def relative_rotation_errors(est_c2w: np.ndarray, gt_c2w: np.ndarray) -> np.ndarray:
    """Errors (degrees) of the relative rotation over all camera pairs; independent of alignment."""
    Re, Rg = est_c2w[:, :3, :3], gt_c2w[:, :3, :3]
    i, j = np.triu_indices(len(Re), k=1)
    rel_e = np.einsum("nji,njk->nik", Re[i], Re[j])  # R_i^T R_j
    rel_g = np.einsum("nji,njk->nik", Rg[i], Rg[j])
    return rotation_angle_deg(rel_e, rel_g)


def camera_errors(est_c2w: np.ndarray, gt_c2w: np.ndarray) -> dict:
    """Align ``est`` to ``gt`` by the camera centres and return error statistics.

    Keys: ``rotation_deg`` / ``center`` (per camera, after alignment; centre errors in GT world
    units), their medians and maxima, ``relative_rotation_deg_median`` and the similarity.
    """
    est_c2w, gt_c2w = np.asarray(est_c2w, np.float64), np.asarray(gt_c2w, np.float64)
    s, R, t = umeyama(est_c2w[:, :3, 3], gt_c2w[:, :3, 3])
    aligned = apply_similarity(est_c2w, s, R, t)
    rot = rotation_angle_deg(aligned[:, :3, :3], gt_c2w[:, :3, :3])
    centre = np.linalg.norm(aligned[:, :3, 3] - gt_c2w[:, :3, 3], axis=1)
    rel = relative_rotation_errors(est_c2w, gt_c2w)
    return {
        "rotation_deg": rot, "center": centre,
        "rotation_deg_median": float(np.median(rot)), "rotation_deg_max": float(rot.max()),
        "center_median": float(np.median(centre)), "center_max": float(centre.max()),
        "relative_rotation_deg_median": float(np.median(rel)) if len(rel) else 0.0,
        "scale": s, "R": R, "t": t,
    }
