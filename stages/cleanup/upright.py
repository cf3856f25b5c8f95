"""``cleanup.up_axis``: export the mesh turned so that the ground it stands on is horizontal.

The up direction comes from the cameras: a camera is held level, so its x axis (the image's
horizontal) is horizontal, and the cameras of an orbit, facing the object from many directions,
have x axes that span the horizontal plane; up is the direction perpendicular to all of them (the
least-squares normal), signed by the cameras' image-up vectors. Cameras that all face one way
(their x axes nearly parallel) use the mean image-up vector instead. The exported mesh is rotated
so that this direction becomes +z (or +y), its lowest point is put at height 0 (the object stands
on the plane through the origin) and its footprint is centred on the origin. ``cleanup.json``
records the 4x4 ``export_from_world`` and its inverse ``world_from_export``, which takes the
exported files back to the cameras' frame.
"""
from __future__ import annotations

import numpy as np

from pipeline.cameras import Cameras

AXES = {"z": np.array([0.0, 0.0, 1.0]), "y": np.array([0.0, 1.0, 0.0])}
MIN_SPREAD = 0.05  # the x axes span a plane: 2nd eigenvalue of their scatter >= this x the largest


def camera_up(cams: Cameras) -> tuple[np.ndarray, str]:
    """The world's up direction (unit) seen from the cameras, and how it was found."""
    image_up = -cams.c2w[:, :3, 1].sum(0)  # OpenCV camera y points down the image
    image_up /= max(np.linalg.norm(image_up), 1e-12)
    horizons = cams.c2w[:, :3, 0]
    values, vectors = np.linalg.eigh(horizons.T @ horizons)
    if values[1] < MIN_SPREAD * values[2]:
        return image_up, "mean of the cameras' image-up vectors"
    normal = vectors[:, 0]
    return (normal if normal @ image_up >= 0 else -normal), "normal to the cameras' horizons"


def rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest proper rotation (3x3) taking unit vector ``a`` to unit vector ``b``."""
    v, c = np.cross(a, b), float(a @ b)
    if c < -1.0 + 1e-12:  # opposite: half a turn about any axis perpendicular to a
        axis = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
        axis /= np.linalg.norm(axis)
        return 2.0 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def upright(vertices: np.ndarray, cams: Cameras, axis: str) -> tuple[np.ndarray, dict]:
    """``vertices`` turned so the cameras' up is ``axis`` ("z" or "y"), standing at height 0 and
    centred on the origin; and the record for cleanup.json."""
    up, method = camera_up(cams)
    transform = np.eye(4)
    transform[:3, :3] = rotation_between(up, AXES[axis])
    turned = vertices @ transform[:3, :3].T
    lo, hi = turned.min(0), turned.max(0)
    shift = -0.5 * (lo + hi)
    k = int(np.argmax(AXES[axis]))
    shift[k] = -lo[k]
    transform[:3, 3] = shift
    return turned + shift, {"axis": axis, "method": method, "world_up": up.tolist(),
                            "export_from_world": transform.tolist(),
                            "world_from_export": np.linalg.inv(transform).tolist()}
