"""Camera refinement (``train.refine_cameras``): a small pose correction per training view,
optimised with the SDF by the same loss, as nerfstudio's camera optimiser does (SO3xR3).

A view's correction is a 6-vector in the camera's own axes (OpenCV: x right, y down, z
forward): an axis-angle rotation ``omega`` (radians) and a translation ``t`` (unit-sphere
units), applied on the right: ``c2w' = c2w [exp(omega) | t]``, i.e. ``R' = R exp(omega)`` and
``c' = c + R t``. On a ray of that view: ``o' = o + R t``, ``d' = R exp(omega) R^T d`` (still
unit length). In camera axes the weakly seen motions (roll about the optical axis, motion
along it) are coordinates of their own, which Adam then moves as fast as the others; in world
axes they mix with the strongly seen ones (with the analytic scene's exact SDF held fixed,
tests/test_refine_cameras.py: 60-66 % of a 2 degree error recovered, against 43-48 % in world
axes). The corrections start at zero: the input
poses, exactly (the rays are bit-identical: ``d + R ((exp(0) - I) R^T d) = d + 0``). Views are
the ray sampler's, the training views only: held-out views are never rendered in training and
keep their input poses.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def skew(v: torch.Tensor) -> torch.Tensor:
    """(N, 3) vectors -> (N, 3, 3) cross-product matrices: ``skew(v) @ x = v x x``."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], -1).reshape(*v.shape[:-1], 3, 3)


def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    """Rodrigues: axis-angle (N, 3) -> rotation matrices (N, 3, 3). Stable and differentiable at
    and near 0 (sinc forms: ``sin t / t`` and ``(1 - cos t) / t^2 = sinc(t / 2)^2 / 2``); 0 gives
    the identity exactly."""
    theta = (omega * omega).sum(-1).clamp_min(torch.finfo(omega.dtype).tiny).sqrt()[..., None, None]
    a = torch.sinc(theta / torch.pi)  # torch.sinc(x) = sin(pi x) / (pi x)
    b = 0.5 * torch.sinc(theta / (2 * torch.pi)) ** 2
    k = skew(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def correct_rays(delta: torch.Tensor, rotations: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor,
                 ray_views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays (R, 3) of views ``ray_views`` (R,) moved by the corrections ``delta`` (V, 6) of
    cameras whose camera-to-world rotations are ``rotations`` (V, 3, 3)."""
    eye = torch.eye(3, dtype=delta.dtype, device=delta.device)
    turn = (so3_exp(delta[:, :3]) - eye)[ray_views]  # every view (a fixed shape), then per ray; exactly 0 at 0
    rot = rotations[ray_views]
    turned = torch.einsum("rij,rj->ri", turn, torch.einsum("rji,rj->ri", rot, dirs))  # (exp(omega) - I) R^T d
    moves = torch.einsum("rij,rkj->rki", rot, torch.stack([turned, delta[ray_views, 3:]], 1))  # R (...), R t
    return origins + moves[:, 1], dirs + moves[:, 0]


def correct_c2w(delta: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world matrices (V, 4, 4) with the corrections (V, 6) applied (float64)."""
    rot = so3_exp(torch.as_tensor(delta, dtype=torch.float64)[:, :3]).numpy()
    out = np.array(c2w, dtype=np.float64, copy=True)
    out[:, :3, 3] += np.einsum("nij,nj->ni", out[:, :3, :3], np.asarray(delta, np.float64)[:, 3:])
    out[:, :3, :3] = out[:, :3, :3] @ rot
    return out


class CameraCorrections(nn.Module):
    """The trainable corrections ``delta`` (V, 6) of V cameras with camera-to-world matrices
    ``c2w`` (V, 4, 4: the ray sampler's), zero at the start. The state dict holds ``delta`` only."""

    def __init__(self, c2w: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(len(c2w), 6, dtype=c2w.dtype, device=c2w.device))
        self.register_buffer("rotations", c2w[:, :3, :3].clone(), persistent=False)

    def forward(self, origins: torch.Tensor, dirs: torch.Tensor, ray_views: torch.Tensor):
        """The rays (R, 3) of the views ``ray_views`` (R,) of the corrected cameras."""
        return correct_rays(self.delta, self.rotations, origins, dirs, ray_views)

    def param_group(self, lr: float) -> dict:
        """The AdamW group: its own learning rate, no weight decay (``stages.train.loop.setup``)."""
        return {"params": [self.delta], "lr": lr, "base_lr": lr, "name": "cameras", "weight_decay": 0.0}

    def magnitudes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per view: rotation angle (degrees) and translation length (unit-sphere units)."""
        d = self.delta.detach()
        return torch.rad2deg(d[:, :3].norm(dim=-1)), d[:, 3:].norm(dim=-1)

    def metrics(self) -> dict[str, torch.Tensor]:
        """Device scalars for the loss curve (read with the step's other metrics)."""
        rot, trans = self.magnitudes()
        return {"cam_rot_deg": rot.mean(), "cam_trans": trans.mean()}

    def summary(self, names: list[str]) -> dict:
        """For train.json: the corrections of the named views and their mean and max."""
        rot, trans = (t.cpu().double().numpy() for t in self.magnitudes())
        return {"views": list(names), "delta": self.delta.detach().cpu().double().numpy().round(8).tolist(),
                "rotation_deg": rot.round(6).tolist(), "translation": trans.round(8).tolist(),
                "rotation_deg_mean": float(rot.mean()), "rotation_deg_max": float(rot.max()),
                "translation_mean": float(trans.mean()), "translation_max": float(trans.max()),
                "note": "per training view: delta = (axis-angle rotation in radians, translation in unit-sphere "
                        "units: x sphere_radius for world units), both in the camera's axes (OpenCV), applied "
                        "on the right: c2w' = c2w [exp(rotation) | translation]. Held-out views "
                        "(train.holdout_every) are not trained and keep their input poses, as do the later "
                        "stages (mesh culling, evaluation)."}


def perturb_c2w(c2w: np.ndarray, rot_deg: float, trans: float, seed: int = 0) -> np.ndarray:
    """Poses to refine, for tests and benchmarks: each camera turned by ``rot_deg`` degrees about
    its centre (a random axis) and its centre moved by ``trans`` (a random direction)."""
    rng = np.random.default_rng(seed)
    axes, moves = rng.normal(size=(2, len(c2w), 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    moves /= np.linalg.norm(moves, axis=1, keepdims=True)
    return correct_c2w(np.concatenate([np.radians(rot_deg) * axes, trans * moves], 1), c2w)


def pose_errors(c2w: np.ndarray, gt_c2w: np.ndarray) -> dict:
    """Per view: rotation error (degrees) and centre distance, in the frame both are given in
    (no alignment: with the corrections in the ground truth's frame, the gauge is fixed)."""
    from pipeline.align import rotation_angle_deg

    c2w, gt_c2w = np.asarray(c2w, np.float64), np.asarray(gt_c2w, np.float64)
    rot = rotation_angle_deg(c2w[:, :3, :3], gt_c2w[:, :3, :3])
    centre = np.linalg.norm(c2w[:, :3, 3] - gt_c2w[:, :3, 3], axis=1)
    return {"rotation_deg": rot, "center": centre, "rotation_deg_mean": float(rot.mean()),
            "rotation_deg_max": float(rot.max()), "center_mean": float(centre.mean()),
            "center_max": float(centre.max())}
