"""See-through holes reopened in GrabCut masks over a textured ground.

GrabCut learns its object colours from every pixel labelled (probably) object. Where the seed
region covers a see-through hole (a ring's or a frame's opening: the free-space hull is a little
fatter than the object and closes small openings), the ground seen through the hole teaches the
object model the ground's colours, and the cut keeps the hole filled. Here the object model is
learned again, from the mask's core pixels that the ground model (learned from a ring around the
mask) does not explain, the cut is redone with both models frozen, and of what it removes only
the regions it encloses (holes, not the rim) and that the stereo sees the ground or the
background through (``stages.masks.evidence``) are opened: a ground-coloured patch on a textured
object takes the object's depth in the stereo, a real opening shows the ground behind it.
"""
from __future__ import annotations

import numpy as np

import stages.masks.post as post
from stages.masks import refine

GROUND_QUANTILE = 0.05  # a core pixel is unlike the ground when the ground model scores it below this quantile
                        # of the ground's own pixels
MIN_OBJECT_SHARE = 0.3  # ... and the object model needs this share of the core unlike the ground (a camouflaged
                        # object has none)
MIN_SEEN = 0.01  # a hole is opened when the stereo sees the ground or background through this share of it


def log_likelihood(model: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Log density of ``pixels`` (N, 3) under an OpenCV GrabCut GMM ``model`` (1, 65)."""
    w, mu, cov = model[0, :5], model[0, 5:20].reshape(5, 3), model[0, 20:].reshape(5, 3, 3)
    x = pixels.astype(np.float64)
    dens = np.zeros(len(x))
    for k in np.flatnonzero(w > 0):
        d = x - mu[k]
        m = np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov[k]), d)
        dens += w[k] * np.exp(-0.5 * m) / np.sqrt((2 * np.pi) ** 3 * np.linalg.det(cov[k]))
    return np.log(dens + 1e-300)


def enclosed(mask: np.ndarray) -> np.ndarray:
    """Background pixels of ``mask`` not 4-connected to the image border."""
    import cv2

    n, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return ~mask & ~np.isin(labels, border)


def open_holes(image: np.ndarray, mask: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """``mask`` (RGB ``image``) with the holes reopened that a cut with a ground-free object model
    encloses and that the stereo sees through (``seen``: bool at the image size)."""
    import cv2

    if mask.sum() < 64:
        return mask
    size = float(np.sqrt(mask.sum()))
    ring = post.dilate(mask, max(3, int(round(refine.RING * size))))
    ground = ring & ~post.dilate(mask, 2)
    core = post.erode(mask, max(1, int(round(refine.CORE * size))))
    bgr = np.ascontiguousarray(image[..., ::-1])
    local = refine.colour_models(bgr, ground, ground)
    if local is None or core.sum() < 50:
        return mask
    rng = np.random.default_rng(0)
    own = log_likelihood(local[0], refine._sample(bgr[ground], rng))
    unlike = core.copy()
    unlike[core] = log_likelihood(local[0], bgr[core]) < np.quantile(own, GROUND_QUANTILE)
    if unlike.sum() < max(50, MIN_OBJECT_SHARE * core.sum()):
        return mask
    models = refine.colour_models(bgr, ground, unlike)
    cut = refine.frozen_cut(bgr, mask, ring, models)
    holes = mask & enclosed(cut)
    if not holes.any():
        return mask
    n, labels = cv2.connectedComponents(holes.astype(np.uint8), connectivity=8)
    area = np.bincount(labels.ravel(), minlength=n)
    hits = np.bincount(labels[holes & seen], minlength=n)
    see_through = (hits >= np.maximum(1, MIN_SEEN * area)) & (np.arange(n) > 0)
    return mask & ~see_through[labels]
