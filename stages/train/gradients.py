"""SDF gradients and Laplacians: 4-tap tetrahedral and 6-tap central differences, or autograd.

Tetrahedral (Neuralangelo): taps at ``x + eps * k_i`` with k = (1,-1,-1), (-1,-1,1), (-1,1,-1),
(1,1,1); ``grad = sum_i k_i f_i / (4 eps)``, ``laplacian = (sum_i f_i / 2 - 2 f(x)) / eps^2``
(since sum_i k_i k_i^T = 4 I). Central: ``grad_a = (f(x+e_a) - f(x-e_a)) / (2 eps)``,
``laplacian = sum_a (f(x+e_a) + f(x-e_a) - 2 f(x)) / eps^2``. All taps and the centre go
through the field in one batched call, each point next to its taps (``INTERLEAVE``): the taps
share grid cells with their point at the coarse levels, so the hash-grid kernels hit the cache
instead of walking the batch once per tap (3.5x faster than tap-major at 2 features, 4.9x at 8,
on random points in benchmarks/hashgrid_triton_check.py). In training, where samples along a
ray already share cells, the two layouts measured the same (benchmarks/RESULTS.md, fourth
session). The field computes the feature only at the centres (``feature_rows``): a tap's
feature is never used, and with a feature of 64-256 channels it is most of the MLP's
multiply-adds.
"""
from __future__ import annotations

from typing import Callable

import torch

TETRA = ((1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, 1.0, 1.0))
CENTRAL = ((1.0, 0.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.0, -1.0))

# field(x [M, 3], feature_rows=None) -> (sdf [M], feature [M, D]); with a slice ``feature_rows``
# the feature only at x[feature_rows] (the centres: no tap's feature is ever used)
Field = Callable[..., tuple[torch.Tensor, torch.Tensor]]

INTERLEAVE = True  # point-major tap layout (x, x + e_1, ..., x + e_k, next x, ...); False: tap-major
FEATURE_AT_CENTRES = True  # False: the field computes every tap's feature, then drops it (benchmarks)


def tap_offsets(mode: str, device=None) -> torch.Tensor:
    if mode == "tetra4":
        return torch.tensor(TETRA, device=device)
    if mode == "central6":
        return torch.tensor(CENTRAL, device=device)
    raise ValueError(f"no finite-difference taps for gradient mode {mode!r}")


def _combine(mode: str, f0: torch.Tensor, taps: torch.Tensor, eps: float | torch.Tensor):
    """Gradient (N, 3) and Laplacian (N,) from the centre value f0 (N,) and taps (K, N)."""
    if mode == "tetra4":
        k = tap_offsets(mode, f0.device).to(taps.dtype)  # (4, 3)
        grad = torch.einsum("kn,kd->nd", taps, k) / (4.0 * eps)
        lap = (taps.sum(0) * 0.5 - 2.0 * f0) / (eps * eps)
        return grad, lap
    plus, minus = taps[0::2], taps[1::2]  # (3, N) each
    grad = ((plus - minus) / (2.0 * eps)).T
    lap = (plus + minus - 2.0 * f0[None]).sum(0) / (eps * eps)
    return grad, lap


def sdf_and_gradients(field: Field, x: torch.Tensor, eps: float | torch.Tensor, mode: str,
                      need_laplacian: bool = True):
    """SDF (N,), feature (N, D), gradient (N, 3) and Laplacian (N,) (zeros for ``analytic``)."""
    if mode == "analytic":
        training = torch.is_grad_enabled()
        with torch.enable_grad():  # x keeps its own graph when it has one (refined cameras move the samples)
            xg = x if training and x.requires_grad else x.detach().requires_grad_(True)
            sdf, feat = field(xg)
            grad, = torch.autograd.grad(sdf.sum(), xg, create_graph=training)
        if not training:
            sdf, feat, grad = sdf.detach(), feat.detach(), grad.detach()
        return sdf, feat, grad, torch.zeros_like(sdf)
    offsets = torch.cat([x.new_zeros(1, 3), tap_offsets(mode, x.device).to(x.dtype)])  # (k + 1, 3), centre first
    k1, n = offsets.shape[0], x.shape[0]
    if INTERLEAVE:
        pts = (x[:, None] + eps * offsets[None]).reshape(-1, 3)
    else:
        pts = (x[None] + eps * offsets[:, None]).reshape(-1, 3)
    rows = slice(0, None, k1) if INTERLEAVE else slice(0, n)  # the centres
    sdf_all, feat = field(pts, feature_rows=rows if FEATURE_AT_CENTRES else None)
    if not FEATURE_AT_CENTRES:
        feat = feat[rows]
    if sdf_all.dtype not in (torch.float32, torch.float64):
        sdf_all = sdf_all.float()
    sdf_all = sdf_all.view(n, k1).T if INTERLEAVE else sdf_all.view(k1, n)
    grad, lap = _combine(mode, sdf_all[0], sdf_all[1:], eps)
    return sdf_all[0], feat, grad, lap if need_laplacian else torch.zeros_like(lap)
