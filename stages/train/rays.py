"""Ray batches: a few views per step, pixels uniform or (object mode) a share inside the masks.

Pixel convention of ``pipeline.cameras``: pixel (row i, column j) covers [j, j+1) x [i, i+1);
rays go through a uniformly jittered point of the pixel. Cameras are unit-sphere c2w (OpenCV
axes). All randomness comes from the global torch generator of the device (checkpointed).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RayBatch:
    origins: torch.Tensor  # (R, 3) unit coordinates
    dirs: torch.Tensor  # (R, 3) unit vectors
    rgb: torch.Tensor  # (R, 3) in [0, 1]
    mask: torch.Tensor | None  # (R,) bool, object mode
    views: torch.Tensor  # (V,) indices into the scene's views used by this batch
    ray_views: torch.Tensor  # (R,) each ray's view as an index into the sampler's views (camera corrections)


def camera_rays(K: torch.Tensor, c2w: torch.Tensor, uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-ray intrinsics (R, 3, 3) / c2w (R, 4, 4) and pixel coords (R, 2) -> origins, unit dirs."""
    x = (uv[:, 0] - K[:, 0, 2]) / K[:, 0, 0]
    y = (uv[:, 1] - K[:, 1, 2]) / K[:, 1, 1]
    cam = torch.stack([x, y, torch.ones_like(x)], -1)
    dirs = torch.einsum("rij,rj->ri", c2w[:, :3, :3], cam)
    return c2w[:, :3, 3], dirs / dirs.norm(dim=-1, keepdim=True)


class RaySampler:
    """Holds the training images (uint8) and masks on the device and draws ray batches."""

    def __init__(self, images: np.ndarray, masks: np.ndarray | None, K: np.ndarray, c2w: np.ndarray,
                 view_ids: np.ndarray, device: torch.device):
        self.device = device
        self.view_ids = torch.as_tensor(view_ids, dtype=torch.long, device=device)
        self.images = torch.as_tensor(images, device=device)  # (V, H, W, 3) uint8
        self.num_views, self.height, self.width = self.images.shape[:3]
        self.K = torch.as_tensor(K, dtype=torch.float32, device=device)
        self.c2w = torch.as_tensor(c2w, dtype=torch.float32, device=device)
        self.masks = None
        if masks is not None:
            m = torch.as_tensor(masks, device=device).reshape(self.num_views, -1)
            counts = m.sum(1)
            self.masks = m
            self.mask_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            self.mask_pixels = torch.nonzero(m.reshape(-1)).squeeze(1) % (self.height * self.width)

    def _pick_views(self, n_rays: int, n_views: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_views = max(1, min(n_views, self.num_views))
        views = torch.randperm(self.num_views, device=self.device)[:n_views]
        per_ray = views[torch.arange(n_rays, device=self.device) % n_views]
        return views, per_ray

    def _pick_pixels(self, vr: torch.Tensor, in_mask: int) -> torch.Tensor:
        hw = self.height * self.width
        flat = torch.floor(torch.rand(len(vr), device=self.device) * hw).long().clamp_max(hw - 1)
        if self.masks is not None and in_mask > 0:
            v = vr[:in_mask]
            start, count = self.mask_offsets[v], self.mask_offsets[v + 1] - self.mask_offsets[v]
            pick = start + torch.floor(torch.rand(in_mask, device=self.device) * count).long()
            pick = torch.minimum(pick, (start + count - 1).clamp_min(0))
            inside = self.mask_pixels[pick.clamp_max(max(len(self.mask_pixels) - 1, 0))] \
                if len(self.mask_pixels) else flat[:in_mask]
            flat = torch.cat([torch.where(count > 0, inside, flat[:in_mask]), flat[in_mask:]])
        return flat

    def sample(self, n_rays: int, n_views: int, mask_fraction: float) -> RayBatch:
        views, vr = self._pick_views(n_rays, n_views)
        in_mask = int(round(n_rays * mask_fraction)) if self.masks is not None else 0
        flat = self._pick_pixels(vr, in_mask)
        row, col = flat // self.width, flat % self.width
        jitter = torch.rand(n_rays, 2, device=self.device)
        uv = torch.stack([col.float() + jitter[:, 0], row.float() + jitter[:, 1]], -1)
        origins, dirs = camera_rays(self.K[vr], self.c2w[vr], uv)
        rgb = self.images[vr, row, col].float() / 255.0
        mask = self.masks[vr, flat] if self.masks is not None else None
        return RayBatch(origins, dirs, rgb, mask, self.view_ids[views], vr)


def image_rays(K: np.ndarray, c2w: np.ndarray, width: int, height: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """All pixel-centre rays of one camera (unit coordinates), row-major: origins, dirs (H*W, 3)."""
    j, i = torch.meshgrid(torch.arange(width, device=device), torch.arange(height, device=device), indexing="xy")
    uv = torch.stack([j.reshape(-1) + 0.5, i.reshape(-1) + 0.5], -1).float()
    n = uv.shape[0]
    Kt = torch.as_tensor(K, dtype=torch.float32, device=device)[None].expand(n, 3, 3)
    Ct = torch.as_tensor(c2w, dtype=torch.float32, device=device)[None].expand(n, 4, 4)
    return camera_rays(Kt, Ct, uv)
