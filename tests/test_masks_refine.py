"""stages.masks.refine: over a uniform backdrop the clean-colour cut adds what a short seed mask
missed and trims a backdrop rim, keeps a backdrop-coloured patch deep inside the object, and is
not used over a textured ground."""
from __future__ import annotations

import logging

import numpy as np

from stages.masks import post, refine


def _figure(h: int = 240, w: int = 320, seed: int = 0):
    """A light figure (an ellipse body, a head, spikes below) over a near-black noisy backdrop."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - 110) / 50.0) ** 2 + ((xx - 160) / 80.0) ** 2 < 1
    head = ((yy - 60) / 22.0) ** 2 + ((xx - 230) / 22.0) ** 2 < 1
    spikes = (yy > 140) & (yy < 190) & (np.abs(((xx - 100) % 40) - 20) < 12 - (yy - 140) / 5) & (xx > 90) & (xx < 230)
    truth = body | head | spikes
    img = np.clip(rng.normal(6, 3, (h, w, 3)), 0, 255)
    shade = 150 + 60 * np.cos((yy - 60) / 80.0)[..., None]  # lit top, darker bottom
    img[truth] = np.clip(shade[truth] + rng.normal(0, 6, (truth.sum(), 3)), 0, 255)
    return img.astype(np.uint8), truth


def test_refine_adds_what_the_seed_missed_over_a_uniform_backdrop():
    img, truth = _figure()
    short = truth & (np.mgrid[:240, :320][0] < 160)  # the seed stopped halfway down the spikes
    before = post.iou(short, truth)
    out = refine.refine(img, short)
    after = post.iou(out, truth)
    print(f"IoU {before:.3f} -> {after:.3f}")
    assert before < 0.95 and after > 0.98


def test_refine_trims_a_backdrop_rim_and_keeps_a_dark_patch():
    img, truth = _figure(seed=1)
    yy, xx = np.mgrid[:240, :320]
    patch = ((yy - 100) / 18.0) ** 2 + ((xx - 150) / 30.0) ** 2 < 1  # backdrop-coloured, on the body
    img[patch] = 8
    fat = post.dilate(truth, 4)
    out = refine.refine(img, fat)
    assert out[patch].mean() > 0.99  # the patch is deep inside: it comes back
    assert post.iou(out, truth) > 0.97 > post.iou(fat, truth) + 0.03


def test_uniform_backdrop_only_over_one_colour():
    img, truth = _figure()
    rng = np.random.default_rng(2)
    ground = rng.integers(0, 255, (30, 40, 3)).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    textured = np.where(truth[..., None], img, ground)
    log = logging.getLogger("test")
    assert refine.uniform_backdrop(lambda i: img, [truth, truth], log)
    assert not refine.uniform_backdrop(lambda i: textured, [truth, truth], log)
    assert not refine.uniform_backdrop(lambda i: img, [None], log)
