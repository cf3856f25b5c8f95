"""Procedural, feature-rich background: a textured ground disk (z = 0) under a textured dome
(a hemisphere of radius R centred at the world origin), shaded by ray casting in torch.

Textures are periodic multi-scale (1/f) noise mixed with colour blobs and a checker, made
from a seed, plus a fine periodic detail tile so high-resolution renders stay sharp. A cheap
two-level mip scheme and a footprint-based fade of the detail tile limit aliasing far away.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F

GROUND_TEX = 2048  # texels across the ground disk's bounding square
DOME_TEX = (1024, 2048)  # equirectangular texture of the upper hemisphere (rows, columns)
DETAIL_TEX = 512
DETAIL_PERIOD = 0.5  # world units per detail tile
DETAIL_AMPLITUDE = 0.25


@dataclass(frozen=True)
class Backdrop:
    radius: float
    ground: tuple[torch.Tensor, torch.Tensor]  # level 0 and level 2 mips, (1, 3, H, W)
    dome: tuple[torch.Tensor, torch.Tensor]
    detail: torch.Tensor  # (1, 1, D, D), zero mean, unit std


def fractal_noise(rng: np.random.Generator, shape: tuple[int, int], channels: int, beta: float) -> np.ndarray:
    """Periodic noise with a 1/f**beta amplitude spectrum, (channels, *shape), unit std."""
    white = rng.standard_normal((channels, *shape)).astype(np.float32)
    fy = np.fft.fftfreq(shape[0])[:, None] * shape[0]
    fx = np.fft.rfftfreq(shape[1])[None, :] * shape[1]
    freq = np.sqrt(fx ** 2 + fy ** 2)
    amp = np.where(freq < 1.5, 0.0, np.maximum(freq, 1.0) ** -beta).astype(np.float32)
    noise = scipy.fft.irfft2(scipy.fft.rfft2(white, workers=-1) * amp, s=shape, workers=-1)
    return noise / noise.std(axis=(1, 2), keepdims=True)


def albedo_texture(rng: np.random.Generator, shape: tuple[int, int], checker_cells: int) -> np.ndarray:
    """(3, H, W) colours in [0, 1]: palette blobs, per-channel 1/f noise and a soft checker."""
    palette = rng.uniform(0.15, 0.95, size=(4, 3)).astype(np.float32)
    blobs = fractal_noise(rng, shape, 2, beta=1.6)
    w1 = 1.0 / (1.0 + np.exp(-4.0 * blobs[0]))
    w2 = 1.0 / (1.0 + np.exp(-4.0 * blobs[1]))
    colour = ((palette[0][:, None, None] * w1 + palette[1][:, None, None] * (1 - w1)) * w2
              + (palette[2][:, None, None] * w1 + palette[3][:, None, None] * (1 - w1)) * (1 - w2))
    colour = colour + 0.12 * fractal_noise(rng, shape, 3, beta=0.8)
    rows = np.arange(shape[0]) * checker_cells // shape[0]
    cols = np.arange(shape[1]) * (checker_cells * shape[1] // shape[0]) // shape[1]
    checker = ((rows[:, None] + cols[None, :]) % 2).astype(np.float32)
    colour = colour * (0.78 + 0.22 * checker)
    return np.clip(colour, 0.0, 1.0).astype(np.float32)


def _mips(texture: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    level0 = torch.from_numpy(texture)[None].contiguous()
    return level0, F.avg_pool2d(level0, 4).contiguous()


@functools.lru_cache(maxsize=4)
def make_backdrop(seed: int, radius: float) -> Backdrop:
    """Build (and cache) the ground, dome and detail textures for ``seed``."""
    rng = np.random.default_rng(seed)
    ground = albedo_texture(rng, (GROUND_TEX, GROUND_TEX), checker_cells=int(round(8 * radius)))
    dome = albedo_texture(rng, DOME_TEX, checker_cells=24)
    detail = fractal_noise(rng, (DETAIL_TEX, DETAIL_TEX), 1, beta=0.6)
    return Backdrop(radius, _mips(ground), _mips(dome), torch.from_numpy(detail)[None].contiguous())


def _sample(texture: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup at grid coordinates in [-1, 1] (x right, y down) -> (N, C)."""
    grid = torch.stack([gx, gy], -1)[None, None]
    out = F.grid_sample(texture, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].T


def _textured(mips, gx, gy, footprint, texel, detail, dx, dy) -> torch.Tensor:
    """Albedo with mip blending by footprint/texel ratio and a fading periodic detail layer."""
    ratio = footprint / texel
    blend = (torch.log2(ratio.clamp(min=1.0)) / 2.0).clamp(max=1.0)[:, None]
    base = _sample(mips[0], gx, gy)
    if bool((blend > 0).any()):
        base = torch.lerp(base, _sample(mips[1], gx, gy), blend)
    fade = ((3.0 - footprint / (DETAIL_PERIOD / DETAIL_TEX)) / 2.0).clamp(0.0, 1.0)
    tile_x = torch.remainder(dx / DETAIL_PERIOD, 1.0) * 2 - 1
    tile_y = torch.remainder(dy / DETAIL_PERIOD, 1.0) * 2 - 1
    fine = _sample(detail, tile_x, tile_y)[:, 0]
    return base * (1.0 + DETAIL_AMPLITUDE * fade * fine)[:, None]


def shade_background(backdrop: Backdrop, origin: torch.Tensor, dirs: torch.Tensor, pixel_angle: float,
                     ground_light: float) -> torch.Tensor:
    """Colours (N, 3) of unit rays ``dirs`` (N, 3) from ``origin`` (3,) inside the dome;
    ``pixel_angle`` is the angular size of one sample (for texture filtering)."""
    R = backdrop.radius
    b = dirs @ origin
    c = float(origin @ origin) - R * R
    t_dome = -b + torch.sqrt((b * b - c).clamp(min=0.0))
    dz = dirs[:, 2]
    t_ground = torch.where(dz < -1e-9, -origin[2] / dz.clamp(max=-1e-9), torch.full_like(dz, math.inf))
    ground = t_ground < t_dome
    out = torch.empty_like(dirs)
    gi = torch.nonzero(ground).squeeze(1)
    di = torch.nonzero(~ground).squeeze(1)
    if len(gi):
        t = t_ground[gi]
        p = origin + t[:, None] * dirs[gi]
        footprint = t * pixel_angle / (-dz[gi]).clamp(min=0.05)
        albedo = _textured(backdrop.ground, p[:, 0] / R, -p[:, 1] / R, footprint,
                           2 * R / GROUND_TEX, backdrop.detail, p[:, 0], p[:, 1])
        out[gi] = albedo * ground_light
    if len(di):
        t = t_dome[di]
        q = (origin + t[:, None] * dirs[di]) / R
        az = torch.atan2(q[:, 1], q[:, 0])
        el = torch.asin(q[:, 2].clamp(0.0, 1.0))
        cos_inc = (dirs[di] * q).sum(1).clamp(min=0.05)
        footprint = t * pixel_angle / cos_inc
        albedo = _textured(backdrop.dome, az / math.pi, 1.0 - 4.0 * el / math.pi, footprint,
                           math.pi * R / DOME_TEX[1] * 2, backdrop.detail, az * R, el * R)
        out[di] = albedo * 0.9
    return out
