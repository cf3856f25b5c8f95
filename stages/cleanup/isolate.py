"""``cleanup.isolate``: cut the object out of a scene-mode mesh in 3D.

Without masks (the masks stage set implausible masks aside, or ``masks.method=none``) the mesh
holds the object and what it stands on. The object is what stands on the supporting plane near
the point the cameras look at: the plane is fitted (RANSAC, ``pipeline.cameras.supporting_plane``)
to the SfM points inside the bounding sphere, the faces at or below it (within ``CUT_MARGIN`` of
the sphere radius) are cut, and the pieces that reach within ``REACH`` of the radius of the
sphere's centre are kept; the cleanup stage then closes the opening the cut leaves at the bottom.
With no plane (too few points on it, or cameras on both sides) nothing is cut and the stage says so.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import StageError

CUT_MARGIN = 0.02  # the ground slab cut: this share of the sphere radius above the plane
REACH = 0.5  # a piece is the object's when it comes within this share of the radius of the centre


def wanted(mode: str, have_masks: bool, masks_dir: Path | None) -> bool:
    """Whether to isolate a mesh trained without masks: ``always``; ``fallback`` only when the
    masks stage set its masks aside (masks.json ``fallback``); ``never``. Never with masks."""
    if have_masks or mode == "never":
        return False
    if mode == "always":
        return True
    try:
        return masks_dir is not None and "fallback" in json.loads((Path(masks_dir) / "masks.json").read_text())
    except (OSError, ValueError):
        return False


def ground_plane(sfm_points_dir: Path, cams) -> tuple[np.ndarray, float] | None:
    """The supporting plane (n, d), n pointing to the cameras, of the stage's points, or None."""
    from pipeline.cameras import orbit_distance, supporting_plane

    path = Path(sfm_points_dir) / "points.npy"
    points = np.load(path).astype(np.float64) if path.is_file() else np.zeros((0, 3))
    return supporting_plane(points, cams, 0.01 * orbit_distance(cams))


def cut(vertices: np.ndarray, faces: np.ndarray, plane, center, radius: float) -> tuple[np.ndarray, dict]:
    """Which faces are the object's: above the plane slab, in pieces that reach near ``center``.
    Returns (keep per face, info); raises StageError when nothing is left near the centre."""
    from stages.cleanup.topology import components

    n, d = np.asarray(plane[0], np.float64), float(plane[1])
    height = vertices @ n + d
    above = np.flatnonzero((height[faces] > CUT_MARGIN * radius).all(1))
    if len(above) == 0:
        raise StageError("cleanup: nothing of the mesh stands above the supporting plane; "
                         "set cleanup.isolate=never to keep the whole scene")
    labels = components(vertices, faces[above])
    uniq, inv = np.unique(labels, return_inverse=True)
    near = np.full(len(uniq), np.inf)
    dist = np.linalg.norm(vertices - np.asarray(center, np.float64), axis=1)
    np.minimum.at(near, inv, dist[faces[above]].min(1))
    close = near < REACH * radius
    if not close.any():
        raise StageError(f"cleanup: no surface within {REACH:g} sphere radii of the scene centre once the "
                         "ground is cut; set cleanup.isolate=never to keep the whole scene")
    keep = np.zeros(len(faces), bool)
    keep[above[close[inv]]] = True
    info = {"method": "support_plane", "plane": [*n.round(6).tolist(), round(d, 6)],
            "faces_below_plane": int(len(faces) - len(above)), "pieces": int(len(uniq)),
            "pieces_kept": int(close.sum()), "faces_kept": int(keep.sum())}
    return keep, info
