"""What the views say against a set of masks, whatever seeded them.

- Seen through: a pixel whose plane-sweep depth (``stages.masks.freespace``) lands on the supporting
  plane, or far behind the region the cameras frame, sees the ground or the background: no object
  is in front of it. A mask whose inside (less the band where the stereo window straddles the
  object's edge) holds many such pixels covers the ground, not the object.
- Floating: an object stands on the supporting plane, so the visual hull carved from its masks
  reaches down to it. A hull that stops well above the plane has lost what carries the object
  (thin legs carved away by the stereo window, or cut by GrabCut).
"""
from __future__ import annotations

import numpy as np

from pipeline.cameras import Cameras
from stages.masks.post import Hull, erode

EDGE_BAND = 4  # px at the stereo size: the mask's edge band (half the NCC window and a pixel) is not judged
FAR_RADII = 2.0  # a depth more than this many framed radii behind the target is the background
FRAME_MAX = 0.5  # a frame whose mask's inside is seen through more than this is flagged "seen_through"
MAX_SEEN_THROUGH = 0.25  # masks whose inside is seen through more than this on average are implausible
MAX_FLOAT = 0.2  # a hull whose lowest point is more than this share of its height above the plane floats
MIN_SEEN_IMAGE = 0.1  # the stereo seeds GrabCut when it sees through this share of the image (median view)
UP_COS = 0.85  # the plane counts as the ground when its normal is this close to the cameras' up (~32 deg)


def seen_through_map(st, k: int) -> np.ndarray:
    """Pixels (at the stereo size) of the ``k``-th stereo view that see the ground or the far background."""
    m = st.maps[k]
    z = float((m.w2c @ np.append(st.target, 1.0))[2])
    far = m.inv_depth < 1.0 / (max(z, 1e-9) + FAR_RADII * st.radius)  # nan compares False
    return np.isfinite(m.inv_depth) & ((m.margin == 0) | far)


def usable(st) -> bool:
    """Whether the stereo sees the ground or background in enough of the image to seed GrabCut."""
    return bool(st.views) and float(np.median([seen_through_map(st, k).mean() for k in range(len(st.views))])) \
        >= MIN_SEEN_IMAGE


def seen_maps(st, shape: tuple[int, int]) -> dict[int, np.ndarray]:
    """Per stereo view index: ``seen_through_map`` resampled to the image ``shape`` (H, W)."""
    import cv2

    return {i: cv2.resize(seen_through_map(st, k).astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
            for k, i in enumerate(st.views)}


def seen_through(masks: list[np.ndarray], st) -> list[float | None]:
    """Per frame: the share of the mask's inside (EDGE_BAND eroded) that the stereo sees through;
    None for frames without a depth map or with no inside left."""
    import cv2

    out: list[float | None] = [None] * len(masks)
    for k, i in enumerate(st.views):
        seen = seen_through_map(st, k)
        small = cv2.resize(masks[i].astype(np.uint8), seen.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        inside = erode(small, EDGE_BAND)
        if inside.any():
            out[i] = float((inside & seen).sum() / inside.sum())
    return out


def float_gap(hull: Hull | None, plane, cams: Cameras) -> float | None:
    """Height of the hull's lowest voxel above the plane over the hull's height; None without a hull
    or a plane that is the ground (its normal near the cameras' up)."""
    if hull is None or plane is None or not hull.occ.any():
        return None
    n, d = np.asarray(plane[0], float), float(plane[1])
    up = -cams.c2w[:, :3, 1].mean(0)  # OpenCV cameras: y points down in the image
    if np.linalg.norm(up) < 1e-9 or abs(n @ up) / np.linalg.norm(up) < UP_COS:
        return None
    h = hull.centres(only_surface=False) @ n + d
    return float(h.min() / max(h.max() - h.min(), 1e-12))
