"""NeuS volume rendering with occupancy-grid sample placement.

Each ray's segment inside the unit sphere is cut into ``samples_per_ray`` sections of equal
mass under a piecewise-constant density: 1 in occupied cells of the occupancy grid (cells
whose |SDF| is small), ``empty_weight`` elsewhere. Empty space thus gets few, long sections
and the surface many short ones, with a fixed sample count (fixed shapes for torch.compile).
A section's alpha is NeuS's, from the SDF and its gradient at the section midpoint. In scene
mode a background field is sampled outside the sphere and merged in depth order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stages.train.gradients import sdf_and_gradients


@dataclass
class RenderOptions:
    samples: int = 32
    candidates: int = 256
    empty_weight: float = 0.02
    eps: float = 1e-3
    grad_mode: str = "tetra4"
    cos_anneal: float = 1.0
    bg_samples: int = 32
    perturb: bool = True
    amp_dtype: torch.dtype | None = None
    near_min: float = 0.05


def sphere_hits(o: torch.Tensor, d: torch.Tensor, near_min: float = 0.05):
    """Entry/exit distances of unit-direction rays with the unit sphere; zero-length on a miss."""
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - 1.0
    disc = b * b - c
    inside = disc > 0  # sqrt of 1, not of 0, on a miss: a finite gradient when the rays have one (refine_cameras)
    sq = torch.where(inside, torch.sqrt(torch.where(inside, disc, torch.ones_like(disc))), torch.zeros_like(disc))
    near, far = (-b - sq).clamp_min(near_min), -b + sq
    hit = inside & (far > near)
    zero = torch.zeros_like(near)
    return torch.where(hit, near, zero), torch.where(hit, far, zero), hit


class OccupancyGrid:
    """Boolean grid over [-1, 1]^3; a cell is occupied when the surface may pass near it."""

    def __init__(self, res: int, device):
        self.res = int(res)
        self.occ = torch.ones(self.res ** 3, dtype=torch.bool, device=device)
        lin = (torch.arange(self.res, device=device, dtype=torch.float32) + 0.5) / self.res * 2.0 - 1.0
        z, y, x = torch.meshgrid(lin, lin, lin, indexing="ij")
        self.centres = torch.stack([x, y, z], -1).reshape(-1, 3)
        self.half_diag = 3 ** 0.5 / self.res
        self.inside = self.centres.norm(dim=-1) < 1.0 + self.half_diag

    def lookup(self, pts: torch.Tensor) -> torch.Tensor:
        ijk = ((pts + 1.0) * 0.5 * self.res).long().clamp(0, self.res - 1)
        return self.occ[(ijk[..., 2] * self.res + ijk[..., 1]) * self.res + ijk[..., 0]]

    @torch.no_grad()
    def update(self, sdf_fn, inv_s: float, margin_cells: float, margin_s: float, chunk: int = 1 << 18) -> float:
        """Recompute from ``sdf_fn`` at the cell centres; returns the occupied fraction."""
        thr = margin_cells * self.half_diag + margin_s / max(float(inv_s), 1e-6)
        occ = torch.empty_like(self.occ)
        for start in range(0, self.centres.shape[0], chunk):
            pts = self.centres[start:start + chunk]
            if pts.shape[0] < chunk and start > 0:  # keep one shape for compiled fields
                pts = torch.cat([pts, pts.new_zeros(chunk - pts.shape[0], 3)])
            occ[start:start + chunk] = (sdf_fn(pts)[0].abs() < thr)[: min(chunk, occ.shape[0] - start)]
        self.occ = occ & self.inside
        return float(self.occ.float().mean())

    def state_dict(self) -> dict:
        return {"res": self.res, "occ": self.occ.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if int(state["res"]) != self.res:
            raise ValueError(f"occupancy grid resolution {state['res']} != {self.res}")
        self.occ = state["occ"].to(self.occ.device)


def place_samples(o, d, near, far, grid: OccupancyGrid | None, opts: RenderOptions):
    """Section midpoints and lengths (R, N) along the rays (see the module docstring)."""
    r, m, n = o.shape[0], opts.candidates, opts.samples
    cell = ((far - near) / m)[:, None]  # (R, 1)
    u = (torch.arange(m, device=o.device, dtype=o.dtype) + 0.5) / m
    if grid is None:
        pdf = torch.ones(r, m, device=o.device)
    else:
        t_c = near[:, None] + (far - near)[:, None] * u
        pdf = grid.lookup(o[:, None] + t_c[..., None] * d[:, None]).float() + opts.empty_weight
    mass = pdf * cell
    cum = torch.cat([torch.zeros_like(mass[:, :1]), mass.cumsum(1)], 1)  # (R, M+1)
    k = torch.linspace(0.0, 1.0, n + 1, device=o.device).expand(r, n + 1)
    if opts.perturb:
        jitter = (torch.rand(r, n - 1, device=o.device) - 0.5) / n
        k = torch.cat([k[:, :1], k[:, 1:-1] + jitter, k[:, -1:]], 1)
    s = k * cum[:, -1:]
    j = (torch.searchsorted(cum.contiguous(), s.contiguous(), right=True) - 1).clamp(0, m - 1)
    frac = (s - cum.gather(1, j)) / mass.gather(1, j).clamp_min(1e-12)
    t = near[:, None] + (j.float() + frac.clamp(0.0, 1.0)) * cell
    return 0.5 * (t[:, 1:] + t[:, :-1]), (t[:, 1:] - t[:, :-1]).clamp_min(0.0)


def neus_alpha(sdf, grad, dirs, dists, inv_s, cos_anneal: float):
    """NeuS section opacity from the midpoint SDF, its gradient and the section length."""
    true_cos = (dirs * grad).sum(-1)
    iter_cos = -(F.relu(-true_cos * 0.5 + 0.5) * (1.0 - cos_anneal) + F.relu(-true_cos) * cos_anneal)
    prev_cdf = torch.sigmoid((sdf - iter_cos * dists * 0.5) * inv_s)
    next_cdf = torch.sigmoid((sdf + iter_cos * dists * 0.5) * inv_s)
    alpha = ((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)).clamp(0.0, 1.0)
    return alpha * (dists > 0)


def composite(alpha: torch.Tensor) -> torch.Tensor:
    """Weights (R, N) of front-to-back alpha compositing."""
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-7], 1), 1)[:, :-1]
    return alpha * trans


def background_samples(o, d, t_start, n: int, perturb: bool):
    """Scene mode: sections on [t_start, inf) uniform in s = t (t < c), c (2 - c / t) (t >= c),
    c = the camera's distance to the centre (linear up to the centre's depth, then disparity)."""
    c = o.norm(dim=-1, keepdim=True).clamp_min(1.0)
    t0 = t_start[:, None]
    s0 = torch.where(t0 < c, t0, c * (2.0 - c / t0.clamp_min(1e-6)))
    k = torch.linspace(0.0, 1.0, n + 1, device=o.device).expand(o.shape[0], n + 1)
    if perturb:
        k = torch.cat([k[:, :1], k[:, 1:-1] + (torch.rand(o.shape[0], n - 1, device=o.device) - 0.5) / n, k[:, -1:]], 1)
    s = s0 + k * (2.0 * c * 0.999 - s0).clamp_min(0.0)
    t = torch.where(s < c, s, c * c / (2.0 * c - s))
    return 0.5 * (t[:, 1:] + t[:, :-1]), t[:, 1:] - t[:, :-1]


def render_rays(model, o, d, grid, opts: RenderOptions, bg_color: torch.Tensor | None = None,
                extra_points: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> dict:
    """Render rays (R, 3) in unit coordinates. Returns rgb (R, 3), opacity (R,), depth (R,) and the
    per-sample sdf, gradient, laplacian and ``valid`` (samples on rays that hit the sphere).
    ``extra_points`` (E, 3) ride along in the same SDF call (one compiled graph); their SDF
    comes back as ``extra_sdf``. ``codes`` (R, A): the rays' appearance codes (``NeuSModel.codes``;
    None: the mean code when the model has codes)."""
    near, far, hit = sphere_hits(o, d, opts.near_min)
    mids, dists = place_samples(o, d, near, far, grid, opts)
    r, n = mids.shape
    pts = (o[:, None] + mids[..., None] * d[:, None]).reshape(-1, 3)
    dirs = d[:, None].expand(r, n, 3).reshape(-1, 3)
    n_extra = 0 if extra_points is None else extra_points.shape[0]
    if n_extra:
        pts = torch.cat([pts, extra_points.to(pts.dtype)])
    sdf, feat, grad, lap = sdf_and_gradients(model.sdf, pts, opts.eps, opts.grad_mode)
    extra_sdf = sdf[r * n:]
    if n_extra:
        pts, sdf, feat, grad, lap = pts[:r * n], sdf[:r * n], feat[:r * n], grad[:r * n], lap[:r * n]
    normal = F.normalize(grad, dim=-1)
    codes = model.codes(None, r) if codes is None else codes
    app = None if codes is None else codes[:, None].expand(r, n, codes.shape[-1]).reshape(r * n, -1)
    with torch.autocast(pts.device.type, dtype=opts.amp_dtype or torch.bfloat16, enabled=opts.amp_dtype is not None):
        rgb = model.color(pts, normal, dirs, feat, app).float().view(r, n, 3)
    alpha = neus_alpha(sdf, grad, dirs, dists.reshape(-1), model.inv_s(), opts.cos_anneal).view(r, n)
    if model.background is not None:
        weights, color = _merge_background(model, o, d, mids, alpha, rgb, opts, far, hit)
    else:
        weights = composite(alpha)
        color = (weights[..., None] * rgb).sum(1)
    fg_w = weights[:, :n]
    opacity = fg_w.sum(1)
    if bg_color is not None:
        color = color + (1.0 - opacity)[:, None] * bg_color
    depth = (fg_w * mids).sum(1) / opacity.clamp_min(1e-6)
    valid = hit[:, None].expand(r, n).reshape(-1)
    return {"rgb": color, "opacity": opacity, "depth": depth, "sdf": sdf, "grad": grad, "lap": lap,
            "valid": valid, "inv_s": model.inv_s().detach(), "extra_sdf": extra_sdf}


def _merge_background(model, o, d, mids, alpha, rgb, opts: RenderOptions, far, hit):
    """Composite foreground and background samples together in depth order (NeRF++: on a ray
    that enters the sphere the background lives only behind it, never between the camera and
    the sphere, where it could veil the object). Returns weights whose first N columns are the
    foreground samples', and the colour."""
    r, n = mids.shape
    t_start = torch.where(hit, far, torch.full_like(far, opts.near_min))
    t_bg, dist_bg = background_samples(o, d, t_start, opts.bg_samples, opts.perturb)
    pts = (o[:, None] + t_bg[..., None] * d[:, None]).reshape(-1, 3)
    dirs = d[:, None].expand(r, opts.bg_samples, 3).reshape(-1, 3)
    with torch.autocast(pts.device.type, dtype=opts.amp_dtype or torch.bfloat16, enabled=opts.amp_dtype is not None):
        density, rgb_bg = model.background(pts, dirs)
    behind = (t_bg >= far[:, None]) | ~hit[:, None]
    outside = (pts.norm(dim=-1) >= 1.0) & behind.reshape(-1)
    alpha_bg = (1.0 - torch.exp(-density.float() * dist_bg.reshape(-1))) * outside.float()
    t_all = torch.cat([mids, t_bg], 1)
    a_all = torch.cat([alpha, alpha_bg.view(r, -1)], 1)
    c_all = torch.cat([rgb, rgb_bg.float().view(r, -1, 3)], 1)
    order = torch.argsort(t_all, dim=1)
    w_sorted = composite(a_all.gather(1, order))
    weights = torch.empty_like(w_sorted).scatter_(1, order, w_sorted)
    color = (weights[..., None] * c_all).sum(1)
    return weights, color
