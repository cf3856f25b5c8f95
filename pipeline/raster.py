"""A vectorised z-buffer triangle rasteriser in torch (CPU or GPU, no OpenGL).

Pixel convention as in ``pipeline.cameras``: pixel (row i, column j) is sampled at its centre
(u, v) = (j + 0.5, i + 0.5). A pixel is covered by a triangle when its centre lies inside it
(closed edges, so shared edges never leave cracks). Barycentrics are perspective-correct.
"""
from __future__ import annotations

import torch

_EMPTY = torch.iinfo(torch.int64).max


def _face_setup(xy: torch.Tensor, z: torch.Tensor, faces: torch.Tensor, width: int, height: int, near: float):
    """Per-face screen bounding boxes (pixel index ranges) and inverse edge matrices."""
    tri = xy[faces]  # (F, 3, 2)
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    keep = (z[faces] > near).all(1) & (det.abs() > 1e-10) & torch.isfinite(det)
    lo = tri.min(1).values - 0.5
    hi = tri.max(1).values - 0.5
    x0 = torch.ceil(lo[:, 0].clamp(-1, width)).long().clamp(min=0)
    y0 = torch.ceil(lo[:, 1].clamp(-1, height)).long().clamp(min=0)
    x1 = torch.floor(hi[:, 0].clamp(-1, width)).long().clamp(max=width - 1)
    y1 = torch.floor(hi[:, 1].clamp(-1, height)).long().clamp(max=height - 1)
    bw, bh = (x1 - x0 + 1).clamp(min=0), (y1 - y0 + 1).clamp(min=0)
    count = torch.where(keep, bw * bh, torch.zeros_like(bw))
    safe = torch.where(keep, det, torch.ones_like(det))
    # (b1, b2) = inv([e1 e2]) @ (p - v0); rows of the inverse 2x2 matrix:
    inv = torch.stack([e2[:, 1], -e2[:, 0], -e1[:, 1], e1[:, 0]], 1) / safe[:, None]
    return tri[:, 0], inv, x0, y0, bw, count


def _barycentric(px, py, origin, inv):
    """Screen-space barycentrics (N, 3) of points for per-point face data ``origin``, ``inv``."""
    dx, dy = px - origin[:, 0], py - origin[:, 1]
    b1 = inv[:, 0] * dx + inv[:, 1] * dy
    b2 = inv[:, 2] * dx + inv[:, 3] * dy
    return torch.stack([1.0 - b1 - b2, b1, b2], 1)


def _depth(bary: torch.Tensor, inv_z: torch.Tensor) -> torch.Tensor:
    """Camera depth from screen barycentrics: 1/z is affine in screen space."""
    return 1.0 / (bary * inv_z).sum(1)


def _splat(keys: torch.Tensor, origin, inv, x0, y0, bw, count, faces_sel, inv_z_faces, width):
    """Depth-test the candidate pixels of the faces ``faces_sel`` into ``keys`` (in place)."""
    counts = count[faces_sel]
    fid = torch.repeat_interleave(faces_sel, counts)
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(int(counts.sum()), device=keys.device) - torch.repeat_interleave(start, counts)
    w = bw[fid]
    x = x0[fid] + local % w
    y = y0[fid] + torch.div(local, w, rounding_mode="floor")
    bary = _barycentric(x.float() + 0.5, y.float() + 0.5, origin[fid], inv[fid])
    inside = (bary >= -1e-6).all(1)
    fid, x, y, bary = fid[inside], x[inside], y[inside], bary[inside]
    depth = _depth(bary, inv_z_faces[fid]).float()
    key = (depth.view(torch.int32).long() << 32) | fid  # positive floats sort like their bits
    keys.scatter_reduce_(0, y * width + x, key, reduce="amin")


def rasterize(xy: torch.Tensor, z: torch.Tensor, faces: torch.Tensor, width: int, height: int,
              near: float = 1e-3, chunk: int = 4_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterise triangles given vertex pixel coordinates ``xy`` (V, 2), camera depths ``z`` (V,)
    and ``faces`` (F, 3). Triangles with a vertex closer than ``near`` are dropped (no clipping).

    Returns the visible face per pixel (H*W,) int64 (-1 where empty, row-major) and its
    perspective-correct barycentrics (H*W, 3) float32 (zero where empty).
    """
    xy, z = xy.float(), z.float()
    origin, inv, x0, y0, bw, count = _face_setup(xy, z, faces, width, height, near)
    inv_z_faces = 1.0 / z[faces].clamp(min=near)
    keys = torch.full((width * height,), _EMPTY, dtype=torch.int64, device=xy.device)
    active = torch.nonzero(count > 0).squeeze(1)
    if len(active):
        ends = torch.cumsum(count[active], 0)
        bounds = torch.searchsorted(ends, torch.arange(chunk, int(ends[-1]) + chunk, chunk, device=xy.device))
        lo = 0
        for hi in sorted(set(bounds.clamp(max=len(active) - 1).tolist())):
            sel = active[lo:hi + 1]
            _splat(keys, origin, inv, x0, y0, bw, count, sel, inv_z_faces, width)
            lo = hi + 1
    hit = keys != _EMPTY
    face = torch.full((width * height,), -1, dtype=torch.int64, device=xy.device)
    bary = torch.zeros((width * height, 3), dtype=torch.float32, device=xy.device)
    pix = torch.nonzero(hit).squeeze(1)
    if len(pix):
        fid = keys[pix] & 0xFFFFFFFF
        px = (pix % width).float() + 0.5
        py = torch.div(pix, width, rounding_mode="floor").float() + 0.5
        b = _barycentric(px, py, origin[fid], inv[fid]).clamp(min=0.0)
        b = b * inv_z_faces[fid]  # perspective correction: weight by 1/z_i, renormalise
        face[pix] = fid
        bary[pix] = b / b.sum(1, keepdim=True)
    return face, bary
