"""Training losses: RGB L1, eikonal, curvature, mask BCE (the SfM-point loss is a masked mean |SDF|)."""
from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    w = valid.to(x.dtype)
    return (x * w).sum() / w.sum().clamp_min(1.0)


def rgb_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs().mean()


def eikonal(grad: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean (|grad f| - 1)^2 over valid samples."""
    return masked_mean((grad.norm(dim=-1) - 1.0) ** 2, valid)


def curvature(lap: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean |laplacian f| over valid samples (Neuralangelo's curvature loss)."""
    return masked_mean(lap.abs(), valid)


def mask_bce(opacity: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy written out: ``F.binary_cross_entropy`` asserts its input lies in
    [0, 1], which a NaN (a diverged step, undone a step later by the loop) breaks, on CUDA by a
    device-side assert that ends the process."""
    p, m = opacity.clamp(1e-3, 1.0 - 1e-3), mask.to(opacity.dtype)
    return -(m * torch.log(p) + (1.0 - m) * torch.log1p(-p)).mean()


def psnr_tensor(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR as a 0-d tensor (no host sync), for values read later."""
    mse = ((pred.float() - target.float()) ** 2).mean()
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(psnr_tensor(pred, target))


def total(terms: dict[str, torch.Tensor], weights: dict) -> torch.Tensor:
    """Weighted sum of the terms named in ``weights`` (floats or 0-d tensors; a term weighted 0
    stays in the sum, so the set of terms, and a compiled graph, need not change)."""
    out = None
    for name, w in weights.items():
        if name in terms:
            out = terms[name] * w if out is None else out + terms[name] * w
    return out
