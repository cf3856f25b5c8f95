"""stages.masks.holes: a plain ring over a textured ground whose GrabCut mask filled its opening gets
the opening back where the stereo sees the ground through it; a ground-coloured patch on the object,
which the stereo does not see through, stays."""
from __future__ import annotations

import logging

import numpy as np

from pipeline.config import MaskConfig
from stages.masks import grabcut, holes, post


def _ground(h: int, w: int, seed: int) -> np.ndarray:
    """Blocks of warm and green colours with pixel noise (the synthetic scenes' ground is like this)."""
    rng = np.random.default_rng(seed)
    palette = np.array([[200, 170, 60], [190, 80, 50], [70, 160, 90], [220, 200, 120], [120, 60, 40]])
    blocks = palette[rng.integers(0, len(palette), (h // 8 + 1, w // 8 + 1))].repeat(8, 0).repeat(8, 1)[:h, :w]
    return np.clip(blocks + rng.normal(0, 12, (h, w, 3)), 0, 255)


def _ring(h: int = 240, w: int = 320, seed: int = 0):
    """A plain blue ring (outer radius 60, opening 26) on the ground; the truth and the filled disk."""
    rng = np.random.default_rng(seed + 1)
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - 120, xx - 160)
    truth, disk = (r < 60) & (r >= 26), r < 60
    img = _ground(h, w, seed)
    img[truth] = np.clip(np.array([60, 110, 200]) + rng.normal(0, 5, (truth.sum(), 3)), 0, 255)
    seen = ~disk | (r < 26)  # the stereo sees the ground outside and through the opening ...
    seen &= rng.random((h, w)) < 0.1  # ... at a tenth of its pixels
    return img.astype(np.uint8), truth, disk, seen


def test_open_holes_reopens_a_see_through_opening():
    img, truth, disk, seen = _ring()
    out = holes.open_holes(img, disk, seen)
    before, after = post.iou(disk, truth), post.iou(out, truth)
    print(f"IoU {before:.3f} -> {after:.3f}")
    assert before < 0.85 and after > 0.97


def test_last_pass_reopens_holes_the_cleanup_filled():
    """The last GrabCut pass (cleanup, then the textured-ground polish) on the filled mask."""
    img, truth, disk, seen = _ring(seed=2)
    stats: dict = {}
    polish = grabcut._polisher(lambda i: img, [disk], MaskConfig(), logging.getLogger("test"), stats, {0: seen})
    out = polish(0, disk)
    assert post.iou(out, truth) > 0.97 and stats["holes_opened"] == 1
    assert post.iou(grabcut._polisher(lambda i: img, [disk], MaskConfig(), logging.getLogger("test"), {})(0, disk),
                    truth) < 0.85  # without the stereo nothing is reopened


def test_a_ground_coloured_patch_the_stereo_does_not_see_through_stays():
    img, truth, disk, seen = _ring(seed=3)
    yy, xx = np.mgrid[:240, :320]
    patch = np.hypot(yy - 120, xx - 205) < 10  # on the ring's right side, ground-coloured
    img[patch] = [200, 170, 60]
    seen[patch] = False
    out = holes.open_holes(img, disk, seen)
    assert out[patch].all()
    assert post.iou(out, truth) > 0.95
