"""The last GrabCut pass's masks redone with clean colour models, over a uniform backdrop.

GrabCut learns its background colours from every pixel labelled (probably) background and its
object colours from every pixel labelled (probably) object: where the seed region stops short of
the object (the SfM points cover the lit top of a white figure, not its underside), the object's
own colours outside it teach the background model, and the cut stays short. Over a backdrop of
nearly one colour (a studio's black cloth: UNIFORM_SPREAD) the colours alone tell the two apart,
so here the models are learned once from pixels that are known, the background from everything
well away from the mask and the object from the mask's core, then frozen
(``cv2.GC_EVAL_FREEZE_MODEL``), and the cut is redone over the mask and a ring around it: object
parts the mask missed, unlike the backdrop, are added; a thin rim of backdrop is trimmed. What
the cut takes away deeper inside the mask comes back (a dark patch on the object has the
backdrop's colour too; nothing but colour says it is a see-through gap).
"""
from __future__ import annotations

import numpy as np

import stages.masks.post as post

GC_BGD, GC_FGD, GC_PR_BGD, GC_PR_FGD = 0, 1, 2, 3
UNIFORM_SPREAD = 20.0  # a backdrop is uniform when its colour spread (mean per-channel std, 0..255) is under this
RING = 0.15  # the cut may grow the mask by this share of its size (sqrt of its area)
CORE = 0.04  # the object model learns from the mask eroded by this share of its size
EDGE = 0.03  # ... and may trim a rim of the mask this deep (x its size); deeper cuts come back
NOISE = 5.0  # colour noise floor (0..255) added to every model component: a flat backdrop is near-singular
MAX_SAMPLES = 20000  # pixels per colour model


def _sample(pixels: np.ndarray, rng) -> np.ndarray:
    return pixels if len(pixels) <= MAX_SAMPLES else pixels[rng.choice(len(pixels), MAX_SAMPLES, replace=False)]


def colour_models(bgr: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """OpenCV GrabCut GMMs (1, 65 each) learned from the pixels ``bg`` and ``fg`` (bool masks) only,
    with the NOISE floor; None with fewer than 50 pixels on a side."""
    import cv2

    if bg.sum() < 50 or fg.sum() < 50:
        return None
    rng = np.random.default_rng(0)
    b, f = _sample(bgr[bg], rng), _sample(bgr[fg], rng)
    strip = np.ascontiguousarray(np.concatenate([b, f])[:, None, :])  # GrabCut's k-means ignores the layout
    labels = np.concatenate([np.full(len(b), GC_BGD, np.uint8), np.full(len(f), GC_FGD, np.uint8)])[:, None]
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    cv2.grabCut(strip, labels, None, bgd, fgd, 0, cv2.GC_INIT_WITH_MASK)  # 0 iterations: the models only
    for model in (bgd, fgd):  # layout: 5 weights, 5 means (3), 5 covariances (3x3)
        model[0, 20:] += np.tile((NOISE ** 2 * np.eye(3)).ravel(), 5)
    return bgd, fgd


def far_pixels(mask: np.ndarray) -> np.ndarray:
    """The pixels beyond the ring the cut may grow into."""
    size = float(np.sqrt(max(mask.sum(), 1)))
    return ~post.dilate(mask, max(3, int(round(RING * size))) + 2)


def far_spread(image: np.ndarray, mask: np.ndarray) -> float:
    """Colour spread (mean per-channel std, 0..255) of the pixels away from ``mask``."""
    far = far_pixels(mask)
    return float(image[far].astype(np.float32).std(0).mean()) if far.sum() >= 50 else float("inf")


def uniform_backdrop(load_image, masks: list[np.ndarray | None], log) -> bool:
    """Whether the pixels away from the masks are nearly one colour (median ``far_spread`` over the
    views under UNIFORM_SPREAD)."""
    spread = [far_spread(load_image(i), m) for i, m in enumerate(masks) if m is not None and m.any()]
    value = float(np.median(spread)) if spread else float("inf")
    if value < UNIFORM_SPREAD:
        log.info("masks: uniform backdrop (colour spread %.1f < %g): the masks are redone with its colour model",
                 value, UNIFORM_SPREAD)
    return value < UNIFORM_SPREAD


def refine(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``mask`` (RGB ``image``) redone by a cut with frozen colour models of the far backdrop and of
    the mask's core, free within a ring around the mask; what it removes deeper than EDGE comes back."""
    if mask.sum() < 64:
        return mask
    size = float(np.sqrt(mask.sum()))
    ring = post.dilate(mask, max(3, int(round(RING * size))))
    bgr = np.ascontiguousarray(image[..., ::-1])
    models = colour_models(bgr, far_pixels(mask), post.erode(mask, max(1, int(round(CORE * size)))))
    if models is None:
        return mask
    cut = frozen_cut(bgr, mask, ring, models)
    return cut | _deep_cuts(mask, cut, max(2, int(round(EDGE * size))))


def frozen_cut(bgr: np.ndarray, mask: np.ndarray, ring: np.ndarray, models) -> np.ndarray:
    """One GrabCut pass with the colour ``models`` (background, foreground) frozen, over the box
    around ``ring`` (pixels of ``mask`` probably object, the rest of ``ring`` probably background,
    beyond it background); the largest connected piece of what it calls object."""
    import cv2

    tri = np.full(mask.shape, GC_BGD, np.uint8)
    tri[ring] = GC_PR_BGD
    tri[mask] = GC_PR_FGD
    ys, xs = np.nonzero(ring)
    y0, y1 = max(ys.min() - 4, 0), min(ys.max() + 5, mask.shape[0])
    x0, x1 = max(xs.min() - 4, 0), min(xs.max() + 5, mask.shape[1])
    crop = np.ascontiguousarray(tri[y0:y1, x0:x1])
    cv2.setRNGSeed(0)
    cv2.grabCut(np.ascontiguousarray(bgr[y0:y1, x0:x1]), crop, None, models[0], models[1], 1,
                cv2.GC_EVAL_FREEZE_MODEL)
    cut = np.zeros_like(mask)
    cut[y0:y1, x0:x1] = np.isin(crop, (GC_FGD, GC_PR_FGD))
    return post.keep_largest(cut, 1)


def _deep_cuts(mask: np.ndarray, cut: np.ndarray, depth: int) -> np.ndarray:
    """The pixels of ``mask`` that ``cut`` removed more than ``depth`` pixels inside it, or in a
    region of removed pixels the mask encloses."""
    import cv2

    removed = mask & ~cut
    if not removed.any():
        return removed
    n, labels = cv2.connectedComponents(removed.astype(np.uint8), connectivity=8)
    rim = np.zeros(n, bool)
    rim[np.unique(labels[post.dilate(~mask, 1) & removed])] = True
    inside = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    return removed & (~rim[labels] | (inside > depth))
