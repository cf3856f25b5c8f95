"""Render one view of a synthetic scene: rasterised, textured, Lambertian-shaded object over
the ray-cast background, supersampled s x s and box-filtered.

Mask rule: a pixel is object when at least half of its s*s samples hit the object (with s = 1:
when the pixel centre hits it). Cameras follow ``pipeline.cameras`` (OpenCV axes, pixel centres
at +0.5); the supersampled intrinsics are ``diag(s, s, 1) @ K``, which keeps that convention.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.synthetic.background import Backdrop, shade_background
from pipeline.synthetic.mesh import ObjectMesh
from pipeline.raster import rasterize

LIGHT_DIR = (0.35, -0.45, 0.82)  # towards the light, world frame (z up)
AMBIENT, DIFFUSE = 0.38, 0.62
MASK_RULE = "object coverage >= 0.5 of the s x s supersamples of a pixel (s = supersample; s = 1: pixel centre)"


@dataclass
class Scene:
    obj: ObjectMesh
    backdrop: Backdrop | None  # None: flat ``background_rgb``
    background_rgb: torch.Tensor  # (3,) in [0, 1]
    light: torch.Tensor  # (3,) unit vector towards the light


def make_scene(obj: ObjectMesh, backdrop: Backdrop | None, background_rgb) -> Scene:
    light = torch.tensor(LIGHT_DIR, dtype=torch.float32)
    rgb = torch.tensor(background_rgb, dtype=torch.float32) / 255.0
    return Scene(obj, backdrop, rgb, light / light.norm())


@functools.lru_cache(maxsize=4)
def _camera_dirs(fx: float, fy: float, cx: float, cy: float, width: int, height: int) -> torch.Tensor:
    """Unit camera-frame directions (H*W, 3) through all pixel centres, row-major."""
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float32) + 0.5,
                          torch.arange(width, dtype=torch.float32) + 0.5, indexing="ij")
    d = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(u)], -1).reshape(-1, 3)
    return d / d.norm(dim=1, keepdim=True)


def _camera_rays(K: np.ndarray, c2w: np.ndarray, width: int, height: int, pix: torch.Tensor) -> torch.Tensor:
    """Unit world directions (N, 3) through the centres of flat pixel indices ``pix``."""
    dirs = _camera_dirs(float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]), width, height)
    return dirs[pix] @ torch.as_tensor(c2w[:3, :3], dtype=torch.float32).T


def _shade_object(scene: Scene, face: torch.Tensor, bary: torch.Tensor, view_dirs: torch.Tensor) -> torch.Tensor:
    """Lambertian colours (N, 3) of object samples (two-sided normals, textured or per-vertex)."""
    attrs = (scene.obj.corner_attrs[face] * bary[:, :, None]).sum(1)
    normal = attrs[:, -3:]
    normal = normal / normal.norm(dim=1, keepdim=True).clamp(min=1e-8)
    facing = torch.where((normal * view_dirs).sum(1, keepdim=True) > 0, -1.0, 1.0)
    lambert = (normal * facing) @ scene.light
    if scene.obj.texture is not None:
        uv = attrs[:, :2]
        uv = torch.where((uv < 0) | (uv > 1), torch.remainder(uv, 1.0), uv)
        grid = torch.stack([uv[:, 0] * 2 - 1, 1 - uv[:, 1] * 2], -1)[None, None]
        albedo = F.grid_sample(scene.obj.texture, grid, mode="bilinear", padding_mode="border",
                               align_corners=False)[0, :, 0].T
    else:
        albedo = attrs[:, :3]
    return albedo * (AMBIENT + DIFFUSE * lambert.clamp(min=0.0))[:, None]


def _box_filter(samples: torch.Tensor) -> torch.Tensor:
    """Sum (H, s, W, s, ...) over both sample axes (strided adds: faster than ``sum`` here)."""
    rows = samples[:, 0]
    for i in range(1, samples.shape[1]):
        rows = rows + samples[:, i]
    out = rows[:, :, 0]
    for j in range(1, samples.shape[3]):
        out = out + rows[:, :, j]
    return out


def render_view(scene: Scene, K: np.ndarray, c2w: np.ndarray, width: int, height: int,
                supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Render one camera: RGB (H, W, 3) uint8 and object mask (H, W) bool (rule: ``MASK_RULE``)."""
    s = int(supersample)
    Ws, Hs = width * s, height * s
    Ks = np.diag([s, s, 1.0]) @ K
    w2c = torch.as_tensor(np.linalg.inv(c2w), dtype=torch.float32)
    cam = scene.obj.vertices @ w2c[:3, :3].T + w2c[:3, 3]
    z = cam[:, 2]
    xy = cam[:, :2] / z[:, None].clamp(min=1e-6) * torch.tensor([Ks[0, 0], Ks[1, 1]], dtype=torch.float32) \
        + torch.tensor([Ks[0, 2], Ks[1, 2]], dtype=torch.float32)
    face, bary = rasterize(xy, z, scene.obj.faces, Ws, Hs)
    hit = face >= 0
    rgb = torch.empty((Ws * Hs, 3), dtype=torch.float32)
    obj_pix = torch.nonzero(hit).squeeze(1)
    bg_pix = torch.nonzero(~hit).squeeze(1)
    if len(obj_pix):
        dirs = _camera_rays(Ks, c2w, Ws, Hs, obj_pix)
        rgb[obj_pix] = _shade_object(scene, face[obj_pix], bary[obj_pix], dirs)
    if len(bg_pix):
        if scene.backdrop is None:
            rgb[bg_pix] = scene.background_rgb
        else:
            dirs = _camera_rays(Ks, c2w, Ws, Hs, bg_pix)
            origin = torch.as_tensor(c2w[:3, 3], dtype=torch.float32)
            ground_light = AMBIENT + DIFFUSE * max(float(scene.light[2]), 0.0)
            rgb[bg_pix] = shade_background(scene.backdrop, origin, dirs, 1.0 / float(Ks[0, 0]), ground_light)
    rgb, coverage = _box_filter(rgb.view(height, s, width, s, 3)), _box_filter(hit.view(height, s, width, s).int())
    rgb = rgb / (s * s)
    image = (rgb.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).numpy()
    return image, (2 * coverage >= s * s).numpy()
