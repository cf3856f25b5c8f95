"""Multi-resolution hash grid encoding with the tiny-cuda-nn parameter layout.

One flat table ``[sum(level_sizes), F]`` (fp32), level l in rows ``offsets[l]:offsets[l+1]``,
exactly as tcnn's ``HashGrid`` stores its parameters, so a checkpoint loads in either backend.
Level l: ``scale_l = base * b**l - 1`` (float32 math as in tcnn), ``resolution_l =
ceil(scale_l) + 1``; a level whose ``resolution_l**3`` fits in ``2**log2_table`` is stored
densely (index ``x + y*R + z*R*R``), finer levels are hashed (``x ^ y*2654435761 ^
z*805459861``, uint32) modulo the level size. Inputs lie in [0, 1]^3; a point's grid position
is ``x * scale_l + 0.5``, trilinearly interpolated from its 8 corner entries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

PRIMES = (1, 2654435761, 805459861)
MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class GridSpec:
    levels: int = 16
    features: int = 2
    log2_table: int = 19
    base_res: int = 16
    max_res: int = 2048

    @property
    def per_level_scale(self) -> float:
        if self.levels == 1:
            return 1.0
        return math.exp((math.log(self.max_res) - math.log(self.base_res)) / (self.levels - 1))

    def scales(self) -> np.ndarray:
        """Per-level float32 scales, computed like tcnn's ``grid_scale``."""
        log2s = np.log2(np.float32(self.per_level_scale))
        lv = np.arange(self.levels, dtype=np.float32)
        return (np.exp2(lv * log2s) * np.float32(self.base_res) - np.float32(1.0)).astype(np.float32)

    def resolutions(self) -> np.ndarray:
        return np.ceil(self.scales()).astype(np.int64) + 1

    def sizes(self) -> np.ndarray:
        """Table rows per level: res^3 rounded up to a multiple of 8, at most 2**log2_table."""
        dense = self.resolutions().astype(np.float64) ** 3
        dense = np.minimum(dense, 2.0 ** 31)
        rounded = (np.ceil(dense / 8.0) * 8).astype(np.int64)
        return np.minimum(rounded, 1 << self.log2_table)

    def hashed(self) -> np.ndarray:
        return self.resolutions().astype(np.float64) ** 3 > self.sizes()

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes())]).astype(np.int64)

    @property
    def num_entries(self) -> int:
        return int(self.offsets()[-1])

    @property
    def out_dim(self) -> int:
        return self.levels * self.features

    def cell_size(self, level: int, bound: float = 1.0) -> float:
        """Edge of a level's grid cell in the coordinates that map [-bound, bound] to [0, 1]."""
        return 2.0 * bound / float(self.scales()[level])


def _corner_bits(device) -> torch.Tensor:
    """(8, 3) int64: corner c has offset (c & 1, c >> 1 & 1, c >> 2 & 1) (tcnn's order)."""
    c = torch.arange(8, device=device)
    return torch.stack([c & 1, (c >> 1) & 1, (c >> 2) & 1], -1)


def _weights(frac: torch.Tensor) -> torch.Tensor:
    """Trilinear weights (N, L, 8) from fractional positions (N, L, 3), corner order x fastest."""
    wx = torch.stack([1 - frac[..., 0], frac[..., 0]], -1)
    wy = torch.stack([1 - frac[..., 1], frac[..., 1]], -1)
    wz = torch.stack([1 - frac[..., 2], frac[..., 2]], -1)
    w = wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]
    return w.flatten(-3)


def _dense_index(grid: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """(N, L, 8) dense indices from integer corners-origin (N, L, 3) and per-level res (L,)."""
    r = res[:, None]  # (L, 1)
    bits = _corner_bits(grid.device)  # (8, 3)
    base = (grid[..., 0] + grid[..., 1] * res + grid[..., 2] * res * res).to(torch.int32)  # (N, L)
    corner = (bits[:, 0][None] + bits[:, 1][None] * r + bits[:, 2][None] * r * r).to(torch.int32)  # (L, 8)
    return base[..., None] + corner[None]


def _hash_index(grid: torch.Tensor) -> torch.Tensor:
    """(N, L, 8) spatial hashes of the 8 corners of each cell: the uint32 bits held in int32
    (the per-axis products are formed in int64, reduced mod 2**32 and reinterpreted)."""
    def axis(d: int) -> torch.Tensor:
        g = grid[..., d]
        h = torch.stack([(g * PRIMES[d]) & MASK32, ((g + 1) * PRIMES[d]) & MASK32], -1)
        return torch.where(h >= 1 << 31, h - (1 << 32), h).to(torch.int32)
    hx, hy, hz = axis(0), axis(1), axis(2)
    h = hz[..., :, None, None] ^ hy[..., None, :, None] ^ hx[..., None, None, :]
    return h.flatten(-3)


def _encode_group(x01: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, res: torch.Tensor,
                  sizes: torch.Tensor, offsets: torch.Tensor, hashed: bool) -> torch.Tensor:
    """Encode levels that are all dense or all hashed: (N, 3) -> (N, L_group, F)."""
    pos = x01[:, None, :] * scales[None, :, None] + 0.5
    grid_f = torch.floor(pos)
    frac = pos - grid_f
    grid = grid_f.to(torch.int64)
    size = sizes[None, :, None].to(torch.int32)  # int32 indices: tables stay below 2**31 rows
    if hashed:  # hashed levels have 2**log2_table rows
        idx = _hash_index(grid) & (size - 1)
    else:  # dense index < 2 * size (corners reach R only on the upper faces)
        idx = _dense_index(grid, res)
        idx = torch.where(idx >= size, idx - size, idx)
    idx = idx + offsets[None, :, None].to(torch.int32)
    n, lv = x01.shape[0], scales.shape[0]
    feats = table.index_select(0, idx.reshape(-1).long()).view(n, lv, 8, table.shape[1])
    w = _weights(frac).to(feats.dtype)
    return (feats * w[..., None]).sum(2)


def encode_torch(x01: torch.Tensor, table: torch.Tensor, spec: GridSpec, buffers: dict) -> torch.Tensor:
    """Pure-PyTorch encoding: points in [0, 1]^3 (N, 3) -> features (N, L * F)."""
    x01 = x01.float().clamp(0.0, 1.0)
    outs = []
    for group, hashed in (("dense", False), ("hashed", True)):
        sc = buffers[f"{group}_scales"]
        if sc.numel() == 0:
            continue
        outs.append(_encode_group(x01, table, sc, buffers[f"{group}_res"], buffers[f"{group}_sizes"],
                                  buffers[f"{group}_offsets"], hashed))
    return torch.cat(outs, 1).reshape(x01.shape[0], spec.out_dim)


def encode_reference(x01: torch.Tensor, table: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """Slow, obviously-correct twin of :func:`encode_torch`: a loop over levels and corners."""
    x01 = x01.float().clamp(0.0, 1.0)
    scales, res, sizes = spec.scales(), spec.resolutions(), spec.sizes()
    hashed, offsets = spec.hashed(), spec.offsets()
    out = []
    for lv in range(spec.levels):
        pos = x01 * float(scales[lv]) + 0.5
        cell = torch.floor(pos)
        frac = pos - cell
        cell = cell.long()
        acc = torch.zeros(x01.shape[0], spec.features, dtype=table.dtype)
        for c in range(8):
            off = torch.tensor([c & 1, (c >> 1) & 1, (c >> 2) & 1])
            corner = cell + off
            w = torch.ones(x01.shape[0], dtype=table.dtype)
            for d in range(3):
                w = w * (frac[:, d] if off[d] else 1 - frac[:, d])
            if hashed[lv]:
                idx = torch.zeros(x01.shape[0], dtype=torch.long)
                for d in range(3):
                    idx = idx ^ ((corner[:, d] * PRIMES[d]) % (1 << 32))
            else:
                r = int(res[lv])
                idx = corner[:, 0] + corner[:, 1] * r + corner[:, 2] * r * r
            idx = idx % int(sizes[lv]) + int(offsets[lv])
            acc = acc + w[:, None] * table[idx]
        out.append(acc)
    return torch.cat(out, 1)


class HashGrid(nn.Module):
    """Hash grid over [0, 1]^3 with parameter ``table`` [entries, F]; backend "torch" or "tcnn"."""

    def __init__(self, spec: GridSpec, backend: str = "torch", init_scale: float = 1e-4):
        super().__init__()
        self.spec = spec
        self.table = nn.Parameter(torch.empty(spec.num_entries, spec.features).uniform_(-init_scale, init_scale))
        hashed = spec.hashed()
        for group, sel in (("dense", ~hashed), ("hashed", hashed)):
            self.register_buffer(f"{group}_scales", torch.from_numpy(spec.scales()[sel].copy()), persistent=False)
            self.register_buffer(f"{group}_res", torch.from_numpy(spec.resolutions()[sel].copy()), persistent=False)
            self.register_buffer(f"{group}_sizes", torch.from_numpy(spec.sizes()[sel].copy()), persistent=False)
            self.register_buffer(f"{group}_offsets", torch.from_numpy(spec.offsets()[:-1][sel].copy()), persistent=False)
        self.backend = "torch"
        self._tcnn = None
        self.set_backend(backend)

    def set_backend(self, backend: str) -> None:
        if backend == "tcnn":
            from stages.train.external import make_tcnn_grid
            self._tcnn = make_tcnn_grid(self.spec)
        if backend == "triton":
            try:
                import stages.train.hashgrid_triton  # noqa: F401  (triton is optional)
            except ImportError as exc:
                from pipeline.errors import StageError
                raise StageError(f"grid backend triton needs the triton package ({exc}); "
                                 "use grid_backend=torch") from exc
        self.backend = backend

    def _buffers_dict(self) -> dict:
        return {name: buf for name, buf in self.named_buffers(recurse=False)}

    def forward(self, x01: torch.Tensor, level_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Features (N, L * F) of points in [0, 1]^3, times ``level_mask`` (L * F, constant within a
        level: coarse-to-fine) if given. The triton kernels skip the levels whose mask is 0."""
        if self.backend == "triton":  # CUDA tensors only (CPU under TRITON_INTERPRET=1)
            from stages.train.hashgrid_triton import encode_triton
            return encode_triton(x01, self.table, self.spec, self._buffers_dict(), level_mask=level_mask)
        if self.backend == "tcnn" and x01.is_cuda:
            enc = self._tcnn(x01, self.table)
        else:
            enc = encode_torch(x01, self.table, self.spec, self._buffers_dict())
        return enc if level_mask is None else enc * level_mask
