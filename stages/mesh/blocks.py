"""Block-wise marching cubes of an SDF *callable* over the unit cube (the mesher knows no
checkpoint, nerfstudio style), with coarse-grid skipping, per-block resume files and exact
seam welding.

Grid: ``resolution`` R cells per axis over [-1, 1]^3, samples x_i = -1 + i * h, h = 2 / R,
i = 0..R (array axes = x, y, z). Blocks of ``block_res`` cells share their face samples with
their neighbours. The SDF is negative inside; it is intersected with the unit ball
(``max(sdf, |x| - 1)``) so every surface closes inside the bounding sphere.

Skipping: a coarse grid (every ``coarse_factor``-th sample) is evaluated first. A coarse cell
is *far* when its 8 corners share a sign and all have |SDF| > ``skip_margin`` x its
half-diagonal: if |grad SDF| <= skip_margin it holds no surface, so fine samples only in far
cells are never evaluated (they take a value of the cell's sign) and marching cubes skips
them. The result is exactly the mesh of the full grid under that bound, and closed always
(where a network breaks the bound, a thin sliver of surface may be lost, never torn open).

Welding: every marching-cubes vertex lies on a grid edge; it is keyed by that global edge
(lower sample index, axis) and its position recomputed in float64 from the two sample
values, so both blocks of a seam produce the same vertex, which is merged. Values are
evaluated in fixed-size chunks so a sample gets bitwise the same value in both blocks.
"""
from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.fsutil import atomic_file
from pipeline.log import progress as progress_bar

FORMAT = 1  # bump when the block files change meaning
EDGE_TOL = 5e-4  # a marching-cubes coordinate this close to an integer lies on a grid plane
VMAX_CELLS = 8.0  # |values| are clamped to [VMAX_CELLS * T_MIN, VMAX_CELLS] cells: vertices stay
T_MIN = 2e-3  # at least T_MIN cells from a sample, so each one's grid edge is unambiguous


@dataclass(frozen=True)
class Grid:
    resolution: int
    block_res: int
    coarse_factor: int
    skip_margin: float

    @property
    def h(self) -> float:
        return 2.0 / self.resolution

    @property
    def blocks_per_axis(self) -> int:
        return -(-self.resolution // self.block_res)

    def block(self, index: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """First global sample index (3,) and number of cells (3,) of a block."""
        start = np.asarray(index, np.int64) * self.block_res
        return start, np.minimum(self.block_res, self.resolution - start)

    def block_outside_sphere(self, index) -> bool:
        start, cells = self.block(index)
        lo, hi = start * self.h - 1.0, (start + cells) * self.h - 1.0
        return float(np.linalg.norm(np.clip(0.0, lo, hi))) > 1.0


def check_grid(grid: Grid) -> None:
    """Raise ValueError when the grid sizes do not nest."""
    if grid.resolution < 2 or grid.block_res < 2 or grid.coarse_factor < 1:
        raise ValueError("resolution and block_res must be >= 2, coarse_factor >= 1")
    if grid.resolution % grid.coarse_factor or grid.block_res % grid.coarse_factor:
        raise ValueError(f"resolution ({grid.resolution}) and block_res ({grid.block_res}) must be "
                         f"multiples of coarse_factor ({grid.coarse_factor})")


class Evaluator:
    """Calls ``sdf_fn`` only on chunks of exactly ``chunk`` points (the last one padded), so a
    sample's value never depends on its batch (GEMM kernels may differ by batch size), and
    bounds the result by the unit ball."""

    def __init__(self, sdf_fn: Callable, device, chunk: int):
        self.sdf_fn, self.device, self.chunk = sdf_fn, device, int(chunk)
        self.samples = 0

    def __call__(self, points):
        import torch

        out = torch.empty(len(points), dtype=torch.float32, device=points.device)
        with torch.no_grad():
            for s in range(0, len(points), self.chunk):
                part = points[s:s + self.chunk]
                n = len(part)
                if n < self.chunk:
                    part = torch.cat([part, part[-1:].expand(self.chunk - n, 3)])
                out[s:s + n] = self.sdf_fn(part).reshape(-1)[:n].float()
        self.samples += len(points)
        return torch.maximum(out, radius(points) - 1.0)


def radius(points):
    """|x| per row (faster than ``Tensor.norm(dim=1)`` on the CPU)."""
    return (points * points).sum(1).sqrt()


def sample_points(index, grid: Grid):
    """World-independent unit-cube positions of integer global sample indices (M, 3).
    One expression everywhere, so equal indices give bitwise equal points."""
    return index.float() * grid.h - 1.0


def coarse_values(ev: Evaluator, grid: Grid, step_chunks: int = 8) -> np.ndarray:
    """SDF on every ``coarse_factor``-th sample, (Rc+1)^3 float32 on the CPU. Points whose
    ball bound alone makes them far (|x| - 1 > threshold) are not evaluated."""
    import torch

    f, n = grid.coarse_factor, grid.resolution // grid.coarse_factor + 1
    thr = far_threshold(grid)
    out = np.empty(n ** 3, np.float32)
    step = ev.chunk * step_chunks
    for s in range(0, n ** 3, step):
        flat = torch.arange(s, min(s + step, n ** 3), device=ev.device)
        idx = torch.stack([flat // (n * n), (flat // n) % n, flat % n], 1) * f
        pts = sample_points(idx, grid)
        vals = radius(pts) - 1.0
        inside = vals <= thr
        if inside.any():
            vals[inside] = ev(pts[inside])
        out[s:s + len(flat)] = vals.cpu().numpy()
    return out.reshape(n, n, n)


def far_threshold(grid: Grid) -> float:
    if grid.skip_margin <= 0:
        return math.inf
    return grid.skip_margin * 0.5 * math.sqrt(3.0) * grid.h * grid.coarse_factor


def near_cells(cv, thr: float):
    """Coarse cells (n0, n1, n2) that may hold surface, from corner values (n0+1, n1+1, n2+1)."""
    n0, n1, n2 = (s - 1 for s in cv.shape)
    closest = any_pos = all_pos = None
    for a, b, c in itertools.product((0, 1), repeat=3):
        corner = cv[a:a + n0, b:b + n1, c:c + n2]
        pos = corner >= 0
        if closest is None:
            closest, any_pos, all_pos = corner.abs(), pos.clone(), pos.clone()
        else:
            closest = closest.minimum(corner.abs())
            any_pos |= pos
            all_pos &= pos
    return (any_pos & ~all_pos) | (closest <= thr)


def candidate_blocks(coarse: np.ndarray, grid: Grid, device) -> np.ndarray:
    """(nb, nb, nb) bool: blocks with a near coarse cell inside or one cell around them (the
    only blocks with samples to evaluate), found in one pass over the coarse grid."""
    import torch
    import torch.nn.functional as F

    near = near_cells(torch.from_numpy(coarse).to(device), far_threshold(grid)).float()[None, None]
    near = F.max_pool3d(near, 3, stride=1, padding=1)  # the halo cell
    bc = grid.block_res // grid.coarse_factor
    return F.max_pool3d(near, bc, stride=bc, ceil_mode=True)[0, 0].bool().cpu().numpy()


def _or_neighbours(a, first: int, lengths):
    """``out[i] = a[first + i] | a[first + i + 1]`` along each of the 3 axes (``lengths`` = out shape)."""
    for axis, n in enumerate(lengths):
        a = a.narrow(axis, first, n) | a.narrow(axis, first + 1, n)
    return a


def block_values(ev: Evaluator, grid: Grid, coarse: np.ndarray, index):
    """Values of one block ((c+1)^3 float32, numpy) and the marching-cubes mask, or None when
    no sample of the block is needed.

    A sample is *needed* (evaluated) when one of the up to 8 coarse cells around it is near;
    this depends on its global position only (the coarse cells of the neighbouring blocks
    count), so both blocks of a seam agree on every face value. Other samples get a clamped
    value of the sign of their nearest coarse sample. The blocks thus march one global grid of
    values: the mesh is closed whatever the SDF, and equals the full-grid mesh when
    |grad SDF| <= skip_margin."""
    import torch

    f, h, dev = grid.coarse_factor, grid.h, ev.device
    start, cells = grid.block(index)
    cs, cc = start // f, cells // f
    rc = grid.resolution // f
    lo_s, hi_s = np.maximum(cs - 1, 0), np.minimum(cs + cc + 1, rc)  # coarse samples with a halo cell
    cv = torch.from_numpy(np.ascontiguousarray(
        coarse[lo_s[0]:hi_s[0] + 1, lo_s[1]:hi_s[1] + 1, lo_s[2]:hi_s[2] + 1])).to(dev)
    near = torch.zeros(tuple(int(c) + 2 for c in cc), dtype=torch.bool, device=dev)  # halo cell coords
    o = lo_s - (cs - 1)
    near[o[0]:o[0] + cv.shape[0] - 1, o[1]:o[1] + cv.shape[1] - 1, o[2]:o[2] + cv.shape[2] - 1] = \
        near_cells(cv, far_threshold(grid))
    fine = near.repeat_interleave(f, 0).repeat_interleave(f, 1).repeat_interleave(f, 2)  # from cell cs*f - f
    # a sample is needed when the fine cell just below or above it (on each axis) is near
    need = _or_neighbours(fine, f - 1, [int(c) + 1 for c in cells])
    if not bool(need.any()):
        return None
    vmax = VMAX_CELLS * h
    sign = torch.where(cv >= 0, vmax, -vmax)
    nearest = [(torch.arange(int(c) + 1, device=dev) + f // 2) // f + int(cs[a] - lo_s[a]) for a, c in enumerate(cells)]
    vals = sign[nearest[0]][:, nearest[1]][:, :, nearest[2]].contiguous()
    idx = torch.nonzero(need)
    vals[need] = ev(sample_points(idx + torch.as_tensor(start, device=dev), grid))
    mag = vals.abs().clamp(min=vmax * T_MIN, max=vmax)
    vals = torch.where(vals >= 0, mag, -mag)
    # a cell can hold surface only when one of its corners was evaluated
    mc_mask = torch.zeros_like(need)
    mc_mask[1:, 1:, 1:] = _or_neighbours(need, 0, [int(c) for c in cells])  # skimage marches [i-1, i] at mask[i]
    return vals.cpu().numpy(), mc_mask.cpu().numpy()


def march_block(vals: np.ndarray, mc_mask: np.ndarray, start: np.ndarray, grid: Grid) -> dict:
    """Marching cubes on one block; vertices keyed by their global grid edge (-1: a vertex
    inside a cell, never shared), positions in unit-cube coordinates (float64)."""
    from skimage.measure import marching_cubes

    empty = {"keys": np.zeros(0, np.int64), "pos": np.zeros((0, 3)), "faces": np.zeros((0, 3), np.int32)}
    # every corner counts: the mask marks a cell at its upper corner, so the lower face layers
    # of the block are never in vals[mc_mask], yet may hold the only crossing of the block
    if not mc_mask.any() or not (vals < 0).any() or not (vals > 0).any():
        return empty
    try:
        verts, faces, _, _ = marching_cubes(vals, 0.0, mask=mc_mask, allow_degenerate=True)
    except RuntimeError:  # "No surface found": the masked cells hold no crossing
        return empty
    c = verts.astype(np.float64)
    off = np.abs(c - np.rint(c)) > EDGE_TOL
    lower = np.rint(c).astype(np.int64)
    on_edge = np.flatnonzero(off.sum(1) == 1)
    axis = off[on_edge].argmax(1)
    lower[on_edge, axis] = np.floor(c[on_edge, axis]).astype(np.int64)
    upper = lower[on_edge].copy()
    upper[np.arange(len(on_edge)), axis] += 1
    v0, v1 = vals[tuple(lower[on_edge].T)].astype(np.float64), vals[tuple(upper.T)].astype(np.float64)
    crossing = (v0 >= 0) != (v1 >= 0)
    on_edge, axis, v0, v1 = on_edge[crossing], axis[crossing], v0[crossing], v1[crossing]
    pos = c.copy()
    pos[on_edge] = lower[on_edge]
    pos[on_edge, axis] += v0 / (v0 - v1)
    n = grid.resolution + 1
    g = lower[on_edge] + start
    keys = np.full(len(c), -1, np.int64)
    keys[on_edge] = ((g[:, 0] * n + g[:, 1]) * n + g[:, 2]) * 3 + axis
    return {"keys": keys, "pos": (pos + start) * grid.h - 1.0, "faces": faces.astype(np.int32)}


def weld(parts: list[dict]) -> tuple[np.ndarray, np.ndarray, int]:
    """Merge block meshes by edge key. Returns vertices (V, 3) float64, faces (F, 3) int64 and
    the number of degenerate faces dropped (0 for a consistent grid)."""
    if not parts:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64), 0
    keys = np.concatenate([p["keys"] for p in parts])
    pos = np.concatenate([p["pos"] for p in parts])
    offsets = np.cumsum([0] + [len(p["keys"]) for p in parts[:-1]])
    faces = np.concatenate([p["faces"].astype(np.int64) + o for p, o in zip(parts, offsets)])
    lone = keys < 0
    keys = keys.copy()
    keys[lone] = -2 - np.arange(int(lone.sum()))  # unique: never merged
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    faces = inverse.reshape(-1)[faces]
    ok = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    return pos[first], faces[ok], int((~ok).sum())


def _block_path(blocks_dir: Path, index) -> Path:
    return blocks_dir / f"b{index[0]:03d}_{index[1]:03d}_{index[2]:03d}.npz"


def _save_block(path: Path, data: dict) -> None:
    with atomic_file(path, durable=False) as fh:
        np.savez(fh, **data)


def _prepare_blocks_dir(blocks_dir: Path, grid: Grid) -> None:
    """Keep block files only when they were made with the same grid."""
    meta = {"format": FORMAT, **asdict(grid)}
    meta_path = blocks_dir / "grid.json"
    if blocks_dir.exists() and (not meta_path.exists() or json.loads(meta_path.read_text()) != meta):
        shutil.rmtree(blocks_dir)
    blocks_dir.mkdir(parents=True, exist_ok=True)
    for tmp in blocks_dir.glob(".*.tmp"):
        tmp.unlink()
    meta_path.write_text(json.dumps(meta))


def compute_mesh(sdf_fn: Callable, resolution: int = 512, block_res: int = 128, device="cpu", *,
                 coarse_factor: int = 8, skip_margin: float = 2.0, chunk: int = 1 << 18,
                 blocks_dir: Path | None = None, workers: int = 0, progress: bool = False,
                 stats: dict | None = None, helpers: Sequence[tuple[Callable, str]] = ()
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Mesh the zero level set of ``sdf_fn`` (torch (N, 3) -> (N,), unit-cube coordinates,
    negative inside) inside the unit sphere. Returns vertices (V, 3) float64 in unit-cube
    coordinates and faces (F, 3) int64, outward oriented. ``blocks_dir`` holds one file per
    finished block (a rerun skips those; the caller removes the folder); None = a temporary
    folder. ``stats`` (a dict) receives counts and timings. Memory is bounded by one block.
    ``helpers``: (sdf_factory, device) pairs, each a spawned process that meshes an equal share
    of the blocks with ``sdf_factory(device)`` (picklable); the mesh is the same bit for bit."""
    import torch

    t0 = time.perf_counter()
    grid = Grid(int(resolution), int(block_res), int(coarse_factor), float(skip_margin))
    check_grid(grid)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tmp_dir = None
    if blocks_dir is None:
        tmp_dir = tempfile.mkdtemp(prefix="mesh_blocks_")
        blocks_dir = Path(tmp_dir)
    try:
        _prepare_blocks_dir(Path(blocks_dir), grid)
        counts, done = _run_blocks(sdf_fn, grid, device, chunk, Path(blocks_dir), workers, progress, helpers)
        parts = []
        for index in done:
            with np.load(_block_path(Path(blocks_dir), index)) as z:
                parts.append({k: z[k] for k in ("keys", "pos", "faces")})
        vertices, faces, dropped = weld(parts)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    if stats is not None:
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        stats.update(counts, resolution=grid.resolution, block_res=grid.block_res,
                     coarse_factor=grid.coarse_factor, skip_margin=grid.skip_margin,
                     vertices=len(vertices), faces=len(faces), degenerate_faces_dropped=dropped,
                     seconds=round(time.perf_counter() - t0, 3), peak_gpu_bytes=int(peak), processes=1 + len(helpers))
    return vertices, faces


def _run_blocks(sdf_fn, grid: Grid, device, chunk: int, blocks_dir: Path, workers: int, progress: bool,
                helpers: Sequence[tuple[Callable, str]]):
    """Coarse pass, then the blocks to evaluate dealt round-robin to this process and the
    helpers; returns the counts and the indices of the blocks that have a file, in a fixed order."""
    ev = Evaluator(sdf_fn, device, chunk)
    counts = {"blocks_total": grid.blocks_per_axis ** 3, "blocks_outside_sphere": 0, "blocks_far": 0,
              "blocks_evaluated": 0, "blocks_resumed": 0}
    coarse = coarse_values(ev, grid)
    candidates = candidate_blocks(coarse, grid, device)
    done, todo = [], []
    for index in itertools.product(range(grid.blocks_per_axis), repeat=3):
        if grid.block_outside_sphere(index):
            counts["blocks_outside_sphere"] += 1
        elif _block_path(blocks_dir, index).exists():
            counts["blocks_resumed"] += 1
            done.append(index)
        elif not candidates[index]:
            counts["blocks_far"] += 1
        else:
            todo.append(index)
    shares = [todo[k::1 + len(helpers)] for k in range(1 + len(helpers))]
    pool = ProcessPoolExecutor(len(helpers), mp_context=multiprocessing.get_context("spawn")) if helpers else None
    try:
        jobs = [pool.submit(_helper, factory, dev, grid, chunk, coarse, share, blocks_dir)
                for (factory, dev), share in zip(helpers, shares[1:])]
        results = [march_blocks(ev, grid, coarse, shares[0], blocks_dir, workers, progress)]
        results += [job.result() for job in jobs]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    done += [index for written, _ in results for index in written]
    counts["samples_evaluated"] = sum(samples for _, samples in results)
    counts["blocks_evaluated"] = len(done) - counts["blocks_resumed"]
    counts["blocks_far"] += len(todo) - counts["blocks_evaluated"]
    counts["samples_dense"] = (grid.resolution + 1) ** 3
    return counts, sorted(done)


def _helper(sdf_factory: Callable, device: str, grid: Grid, chunk: int, coarse: np.ndarray, todo: list,
            blocks_dir: Path) -> tuple[list, int]:
    """A helper process: its own SDF on its own device, marching its share of the blocks."""
    import torch

    ev = Evaluator(sdf_factory(device), torch.device(device), chunk)
    return march_blocks(ev, grid, coarse, todo, blocks_dir, 0, False)


def march_blocks(ev: Evaluator, grid: Grid, coarse: np.ndarray, todo: list, blocks_dir: Path, workers: int,
                 progress: bool) -> tuple[list, int]:
    """Evaluate the blocks ``todo`` on ``ev``'s device (this thread) and march them in a thread
    pool, each into its block file; returns the blocks that got a file and the samples evaluated
    (the coarse pass's included when ``ev`` made it)."""
    written, pending = [], []
    workers = workers or max(1, min(16, (os.cpu_count() or 2) - 1))

    def finish(index, vals, mask):
        _save_block(_block_path(blocks_dir, index), march_block(vals, mask, grid.block(index)[0], grid))

    # On the CPU, torch's own threads spin while a marching thread runs: march inline there.
    inline = ev.device.type == "cpu"
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index in progress_bar(todo, progress, desc="mesh blocks", unit="block"):
            out = block_values(ev, grid, coarse, index)
            if out is None:
                continue
            if inline:
                finish(index, *out)
            else:
                pending.append(pool.submit(finish, index, *out))
            written.append(index)
            while len(pending) > 2 * workers:
                pending.pop(0).result()
        for job in pending:
            job.result()
    return written, ev.samples
