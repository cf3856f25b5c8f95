"""Use a trained model: SDF and colour queries for the mesh stage, image rendering for
held-out views. ``model.pt`` holds the config, weights, occupancy grid and the scene similarity,
so nothing else from the training folder is needed."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import InputError
from stages.train.fields import NeuSModel
from stages.train.gradients import sdf_and_gradients
from stages.train.render import OccupancyGrid, RenderOptions, render_rays
from stages.train.rays import image_rays


def config_from_dict(data: dict):
    from pipeline.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in names})


def load_model(model_dir: Path, device="cpu") -> tuple[NeuSModel, dict]:
    path = Path(model_dir) / "model.pt"
    if not path.is_file():
        raise InputError(f"{path}: no trained model; rerun the train stage")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    cfg = config_from_dict(payload["config"])
    codes = payload["model"].get("appearance.weight")
    model = NeuSModel(cfg, scene_mode=not payload["object_mode"], num_views=0 if codes is None else len(codes))
    model.load_state_dict(payload["model"])
    model.sdf.set_active_levels(int(payload["active_levels"]))
    model = model.to(device).eval()
    payload["cfg"] = cfg
    return model, payload


class SdfQuery:
    """``query(points_unit [N, 3]) -> sdf [N]`` (unit-sphere units), chunked, no autograd.
    ``query.world(points_world)`` answers in world units; ``unit_to_world`` / ``world_to_unit``
    are the 4x4 similarities of scene.json."""

    def __init__(self, model: NeuSModel, payload: dict, chunk: int = 1 << 18):
        self.model, self.chunk = model, chunk
        self.device = next(model.parameters()).device
        self.unit_to_world = np.asarray(payload["scene"]["unit_to_world"], dtype=np.float64)
        self.world_to_unit = np.asarray(payload["scene"]["world_to_unit"], dtype=np.float64)
        self.scale = float(np.cbrt(np.linalg.det(self.unit_to_world[:3, :3])))
        self.eps = float(payload["eps"])

    @torch.no_grad()
    def __call__(self, points_unit: torch.Tensor) -> torch.Tensor:
        pts = torch.as_tensor(points_unit, dtype=torch.float32).to(self.device)
        out = [self.model.sdf(pts[i:i + self.chunk])[0] for i in range(0, len(pts), self.chunk)]
        return torch.cat(out) if out else pts.new_zeros(0)

    def world(self, points_world: torch.Tensor) -> torch.Tensor:
        w2u = torch.as_tensor(self.world_to_unit, dtype=torch.float32, device=self.device)
        pts = torch.as_tensor(points_world, dtype=torch.float32).to(self.device)
        return self(pts @ w2u[:3, :3].T + w2u[:3, 3]) * self.scale


def load_sdf(model_dir: Path, device="cpu") -> SdfQuery:
    model, payload = load_model(model_dir, device)
    return SdfQuery(model, payload)


def load_color(model_dir: Path, device="cpu", chunk: int = 1 << 16):
    """``color(points_unit [N, 3]) -> rgb [N, 3]`` in [0, 1], seen head-on (view dir = -normal)."""
    model, payload = load_model(model_dir, device)
    eps = float(payload["eps"])

    @torch.no_grad()
    def color(points_unit: torch.Tensor) -> torch.Tensor:
        pts = torch.as_tensor(points_unit, dtype=torch.float32).to(device)
        out = []
        for i in range(0, len(pts), chunk):
            p = pts[i:i + chunk]
            _, feat, grad, _ = sdf_and_gradients(model.sdf, p, eps, "central6", need_laplacian=False)
            normal = torch.nn.functional.normalize(grad, dim=-1)
            out.append(model.color(p, normal, -normal, feat, model.codes(None, len(p))))
        return torch.cat(out) if out else pts.new_zeros(0, 3)

    color.unit_to_world = np.asarray(payload["scene"]["unit_to_world"])
    return color


@torch.no_grad()
def render_image(model: NeuSModel, occ: OccupancyGrid | None, K: np.ndarray, c2w_unit: np.ndarray, width: int,
                 height: int, opts: RenderOptions, chunk: int = 4096, bg: float | None = 0.0) -> np.ndarray:
    """Render one view (H, W, 3) float32 in [0, 1]; ``bg`` is the colour behind the object
    (object mode) or None (scene mode: the background field)."""
    device = next(model.parameters()).device
    origins, dirs = image_rays(K, c2w_unit, width, height, device)
    opts = dataclasses.replace(opts, perturb=False)
    n = origins.shape[0]
    out = torch.empty(n, 3, device=device)
    for i in range(0, n, chunk):
        o, d = origins[i:i + chunk], dirs[i:i + chunk]
        m = o.shape[0]
        if m < chunk:  # keep one shape for compiled networks
            o = torch.cat([o, o[:1].expand(chunk - m, 3)])
            d = torch.cat([d, d[:1].expand(chunk - m, 3)])
        bgc = None if bg is None else torch.full((o.shape[0], 3), float(bg), device=device)
        out[i:i + m] = render_rays(model, o, d, occ, opts, bgc)["rgb"][:m]
    return out.view(height, width, 3).clamp(0, 1).cpu().numpy()
