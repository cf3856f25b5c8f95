"""The networks: SDF MLP on the hash grid (geometric init, softplus beta=100), IDR-style colour
MLP, the learned NeuS inverse standard deviation and, in scene mode, a small background field
(hash grid over mip-NeRF-360-contracted space) for everything outside the unit sphere.

Coordinates are unit-sphere coordinates; the SDF's hash grid sees ``(x / bound + 1) / 2``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stages.train.hashgrid import GridSpec, HashGrid

SH_C = (0.28209479177387814, 0.48860251190291987, 1.0925484305920792, 0.94617469575755997,
        0.31539156525251999, 0.54627421529603959, 0.59004358992664352, 2.8906114426405538,
        0.45704579946446572, 0.3731763325901154, 1.4453057213202769)


def spherical_harmonics(d: torch.Tensor, levels: int) -> torch.Tensor:
    """Real SH basis of unit directions (N, 3) up to degree ``levels - 1``: (N, levels^2)."""
    x, y, z = d.unbind(-1)
    out = [torch.full_like(x, SH_C[0])]
    if levels > 1:
        out += [-SH_C[1] * y, SH_C[1] * z, -SH_C[1] * x]
    if levels > 2:
        x2, y2, z2 = x * x, y * y, z * z
        out += [SH_C[2] * x * y, -SH_C[2] * y * z, SH_C[3] * z2 - SH_C[4], -SH_C[2] * x * z, SH_C[5] * (x2 - y2)]
    if levels > 3:
        out += [SH_C[6] * y * (3 * x2 - y2), SH_C[7] * x * y * z, SH_C[8] * y * (5 * z2 - 1),
                SH_C[9] * z * (5 * z2 - 3), SH_C[8] * x * (5 * z2 - 1), SH_C[10] * z * (x2 - y2),
                SH_C[6] * x * (x2 - 3 * y2)]
    return torch.stack(out, -1)

# Compiled: the SDF column as a fused row reduction, not a matrix-vector product (cuBLAS runs
# one N = 1 GEMM as an unaligned SIMT kernel, another pass over the hidden layer); False: GEMM.
REDUCE_SDF_COLUMN = True


class Linear(nn.Module):
    """A linear layer, optionally weight-normalised (weight = g * v / |v| row-wise)."""

    def __init__(self, n_in: int, n_out: int, weight_norm: bool):
        super().__init__()
        self.weight_norm = weight_norm
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if weight_norm:
            self.gain = nn.Parameter(torch.ones(n_out))

    def finish_init(self) -> None:
        """Call after setting ``weight``: the gain takes its row norms so outputs are unchanged."""
        if self.weight_norm:
            with torch.no_grad():
                self.gain.copy_(self.weight.norm(dim=1))

    def effective_weight(self) -> torch.Tensor:
        if not self.weight_norm:
            return self.weight
        return self.weight * (self.gain / self.weight.norm(dim=1).clamp_min(1e-12))[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def split(self, x: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Output 0 for every row of ``x``, outputs 1: only for ``x[rows]``. The SDF's last layer
        at finite-difference taps: their SDF is needed, their feature never is."""
        w, b = self.effective_weight(), self.bias
        if REDUCE_SDF_COLUMN and torch.compiler.is_compiling():
            sdf = (x * w[0]).sum(-1) + b[0]  # a row reduction that inductor fuses into the kernel making x
        else:
            sdf = F.linear(x, w[:1], b[:1])[:, 0]
        return sdf, F.linear(x[rows], w[1:], b[1:])


def grid_spec(cfg) -> GridSpec:
    return GridSpec(cfg.grid_levels, cfg.grid_features, cfg.grid_log2_table, cfg.grid_base_res, cfg.grid_max_res)


class SDFNetwork(nn.Module):
    """x (M, 3) unit coordinates -> SDF (M,) fp32 and feature (M, feature_dim), or the feature
    only at ``x[feature_rows]`` (the last layer's feature columns are most of the MLP's work, and
    numerical gradients need only the SDF at their taps)."""

    def __init__(self, cfg, backend: str = "torch"):
        super().__init__()
        self.bound = float(cfg.grid_bound)
        self.grid = HashGrid(grid_spec(cfg), backend)
        enc_dim = self.grid.spec.out_dim
        dims = [3 + enc_dim] + [cfg.sdf_hidden] * cfg.sdf_layers + [1 + cfg.feature_dim]
        self.layers = nn.ModuleList(Linear(a, b, cfg.weight_norm) for a, b in zip(dims[:-1], dims[1:]))
        self.register_buffer("level_mask", torch.ones(enc_dim))
        self._geometric_init(cfg.init_radius)

    def _geometric_init(self, radius: float) -> None:
        """SAL/IDR init: the output starts as |x| - radius (softplus ~ relu)."""
        last = len(self.layers) - 1
        with torch.no_grad():
            for i, lin in enumerate(self.layers):
                n_out, n_in = lin.weight.shape
                if i == last:
                    lin.weight.normal_(math.sqrt(math.pi) / math.sqrt(n_in), 1e-4)
                    lin.bias.fill_(-radius)
                else:
                    lin.weight.normal_(0.0, math.sqrt(2.0) / math.sqrt(n_out))
                    lin.bias.zero_()
                    if i == 0:
                        lin.weight[:, 3:] = 0.0
                lin.finish_init()

    def set_active_levels(self, active: int) -> None:
        f = self.grid.spec.features
        mask = torch.zeros_like(self.level_mask)
        mask[: active * f] = 1.0
        self.level_mask.copy_(mask)

    def forward(self, x: torch.Tensor, feature_rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        enc = self.grid((x / self.bound + 1.0) * 0.5, self.level_mask)
        h = torch.cat([x, enc], -1)
        for lin in self.layers[:-1]:
            h = F.softplus(lin(h), beta=100.0)
        if feature_rows is not None:
            return self.layers[-1].split(h, feature_rows)
        out = self.layers[-1](h)
        return out[:, 0], out[:, 1:]


class ColorNetwork(nn.Module):
    """IDR colour: (x, normal, SH(view dir), feature[, appearance code]) -> RGB in [0, 1]."""

    def __init__(self, cfg):
        super().__init__()
        self.sh_levels = int(cfg.sh_levels)
        n_in = 3 + 3 + self.sh_levels ** 2 + cfg.feature_dim + cfg.appearance_dim
        dims = [n_in] + [cfg.color_hidden] * cfg.color_layers + [3]
        self.layers = nn.ModuleList(Linear(a, b, cfg.weight_norm) for a, b in zip(dims[:-1], dims[1:]))
        for lin in self.layers:
            lin.finish_init()

    def forward(self, x, normal, view_dir, feature, appearance: torch.Tensor | None = None) -> torch.Tensor:
        parts = [x, normal, spherical_harmonics(view_dir, self.sh_levels), feature]
        h = torch.cat(parts if appearance is None else [*parts, appearance.to(feature.dtype)], -1)
        for lin in self.layers[:-1]:
            h = F.relu(lin(h))
        return torch.sigmoid(self.layers[-1](h).float())


def contract(x: torch.Tensor) -> torch.Tensor:
    """mip-NeRF 360 contraction: identity inside the unit ball, (2 - 1/|x|) x/|x| outside."""
    n = x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return torch.where(n <= 1.0, x, (2.0 - 1.0 / n) * x / n)


class BackgroundField(nn.Module):
    """Scene mode: density and colour of everything outside the unit sphere."""

    def __init__(self, max_res: int = 128, sh_levels: int = 3, hidden: int = 64):
        super().__init__()
        self.grid = HashGrid(GridSpec(levels=6, features=2, log2_table=16, base_res=8, max_res=max(max_res, 9)))
        self.sh_levels = sh_levels
        self.mlp = nn.Sequential(nn.Linear(self.grid.spec.out_dim + sh_levels ** 2, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 4))

    def forward(self, x: torch.Tensor, view_dir: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.grid(contract(x) * 0.25 + 0.5)
        raw = self.mlp(torch.cat([enc, spherical_harmonics(view_dir, self.sh_levels)], -1)).float()
        density = torch.exp(raw[:, 0].clamp(max=15.0) - 1.0)
        return density, torch.sigmoid(raw[:, 1:])


class NeuSModel(nn.Module):
    """All trainable parts; ``background`` is None in object mode, ``appearance`` (one code per
    training view, zeros at the start) None unless ``cfg.appearance_dim``."""

    def __init__(self, cfg, scene_mode: bool, backend: str = "torch", num_views: int = 0):
        super().__init__()
        self.sdf = SDFNetwork(cfg, backend)
        self.color = ColorNetwork(cfg)
        self.variance = nn.Parameter(torch.tensor(math.log(cfg.inv_s_init) / 10.0))
        self.background = BackgroundField(cfg.bg_max_res) if scene_mode else None
        self.appearance = None
        if cfg.appearance_dim > 0:
            self.appearance = nn.Embedding(max(1, num_views), cfg.appearance_dim)
            nn.init.zeros_(self.appearance.weight)

    def codes(self, ray_views: torch.Tensor | None, rays: int) -> torch.Tensor | None:
        """Appearance code per ray (R, A): the ray's view's, or with ``ray_views`` None (a view not
        trained on) the mean of the training views'; None without codes."""
        if self.appearance is None:
            return None
        if ray_views is None:
            return self.appearance.weight.mean(0, keepdim=True).expand(rays, -1)
        return self.appearance(ray_views)

    def inv_s(self) -> torch.Tensor:
        return torch.exp(self.variance * 10.0).clamp(1e-3, 1e6)

    def param_groups(self, lr: float, grid_mult: float, inv_s_mult: float) -> list[dict]:
        grid = [p for n, p in self.named_parameters() if n.endswith("grid.table")]
        rest = [p for n, p in self.named_parameters() if not n.endswith("grid.table") and n != "variance"]
        return [{"params": grid, "lr": lr * grid_mult, "base_lr": lr * grid_mult, "name": "grid"},
                {"params": [self.variance], "lr": lr * inv_s_mult, "base_lr": lr * inv_s_mult, "name": "inv_s",
                 "weight_decay": 0.0},
                {"params": rest, "lr": lr, "base_lr": lr, "name": "mlp"}]
