"""Triton backend of the hash grid: fused forward/backward kernels, the twin of ``encode_torch``.

One program per (block of points, level): load x, compute the 8 corner rows (dense index
``x + y*R + z*R*R`` wrapped by ``- size``, or the uint32 spatial hash ``& (size - 1)``, done
in int32 with wrapping multiplies: the low bits equal the uint32 ones), gather ``F``
contiguous features per corner in 16-byte chunks (so loads vectorise, without layout shuffles)
and interpolate trilinearly (corner order x fastest, weights ``(wz * wy) * wx`` as in the torch
twin; FMA contraction off, so cells and weights equal eager torch's). Backward:
``tl.atomic_add`` into an fp32 table gradient (scalar atomics: PTX vector reductions, 4x fewer
instructions, measured the same speed: the backward is bound by the L2's atomic throughput on
random rows, not by atomic issue; benchmarks/atomics.py and RESULTS.md; consecutive rows in one
cell, such as a point's finite-difference taps, first add up in a segmented scan and issue one
atomic per corner: ``MERGE_RUNS``) and, when x needs it, the positional gradient (atomics over
levels into ``[N, 3]``); the double backward (eikonal through analytic gradients) uses a third,
directional kernel. Levels that coarse-to-fine masks off (``level_mask``) read and write nothing.
The ops are ``torch.library`` custom ops, so ``torch.compile`` treats them as black boxes.
On CPU tensors the kernels only run under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from pipeline.errors import StageError

P1 = tl.constexpr(2654435761 - (1 << 32))  # the y prime as a wrapping int32
P2 = tl.constexpr(805459861)
# (BLOCK points, num_warps) per kernel; benchmarks/hashgrid_triton_check.py sweeps these.
TUNING = {"fwd": (128, 4), "bwd": (128, 4), "dir": (64, 4)}
LEVEL_FAST = True  # program order: all levels of a block of points together (else level by level)
INT32_LIMIT = 2 ** 31  # offsets at or beyond this use int64 arithmetic
LEVEL_SKIP = True  # levels masked off by coarse-to-fine move no memory; False: multiply afterwards
MERGE_RUNS = True  # backward: one atomic per corner for consecutive rows in one cell; False: one per row


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _program(N, L: tl.constexpr, BLOCK: tl.constexpr, LEVEL_FAST: tl.constexpr, I64: tl.constexpr):
    """(level, point offsets, point mask) of this program; a 1-D grid of L * blocks programs."""
    pid = tl.program_id(0)
    if LEVEL_FAST:  # neighbouring programs: the same points at all levels
        lvl = pid % L
        blk = pid // L
    else:  # neighbouring programs: one level at a time
        nblk = tl.cdiv(N, BLOCK)
        lvl = pid // nblk
        blk = pid % nblk
    offs_n = blk * BLOCK + tl.arange(0, BLOCK)[:, None]  # [BLOCK, 1]: no layout changes
    nmask = offs_n < N
    if I64:
        offs_n = offs_n.to(tl.int64)
    return lvl, offs_n, nmask


@triton.jit
def _cmask(nmask, cols, F: tl.constexpr, FP: tl.constexpr):
    """Mask of a feature chunk (columns ``cols``): the [BLOCK, 1] row mask when F is a power of two
    (keeps loads vectorised), else also the columns below F."""
    if F == FP:
        m = nmask
    else:
        m = nmask & (cols < F)
    return m


@triton.jit
def _level(scales_ptr, meta_ptr, lvl):
    scale = tl.load(scales_ptr + lvl)
    res = tl.load(meta_ptr + lvl * 4 + 0)
    size = tl.load(meta_ptr + lvl * 4 + 1)
    off = tl.load(meta_ptr + lvl * 4 + 2)
    hashed = tl.load(meta_ptr + lvl * 4 + 3)
    return scale, res, size, off, hashed


@triton.jit
def _gate(lmask_ptr, lvl, nmask, F: tl.constexpr, MASKED: tl.constexpr):
    """The level's weight m (coarse-to-fine: ``level_mask[lvl * F]``, 1 without a mask) and the
    point mask, off for a level with m == 0 so it moves no memory (its outputs are zeros)."""
    if MASKED:
        m = tl.load(lmask_ptr + lvl * F)
        nmask = tl.where(m != 0.0, nmask, False)
    else:
        m = 1.0
    return m, nmask


@triton.jit
def _axis(x_ptr, offs_n, nmask, d: tl.constexpr, scale, res):
    """Cell index (int32, clamped to [0, R-1]: a no-op for x in [0, 1], a guard for NaN) and frac."""
    x = tl.load(x_ptr + offs_n * 3 + d, mask=nmask, other=0.0)
    p = x * scale
    p = p + 0.5
    g = tl.floor(p)
    frac = p - g
    gi = tl.minimum(tl.maximum(g.to(tl.int32), 0), res - 1)
    return gi, frac


@triton.jit
def _corner(c: tl.constexpr, gx, gy, gz, res, size, off, hashed, F: tl.constexpr, I64: tl.constexpr):
    """Element offset (row * F) of corner c (bit 0 = x, 1 = y, 2 = z) of each point's cell."""
    cx = gx + (c & 1)
    cy = gy + ((c >> 1) & 1)
    cz = gz + ((c >> 2) & 1)
    h = (cx ^ (cy * P1) ^ (cz * P2)) & (size - 1)
    d = cx + cy * res + cz * res * res
    d = tl.where(d >= size, d - size, d)
    row = tl.where(hashed != 0, h, d) + off
    if I64:
        row = row.to(tl.int64)
    return row * F


@triton.jit
def _wsel(c: tl.constexpr, bit: tl.constexpr, f):
    """The 1-D weight of corner c along the axis of ``bit``: f or 1 - f, and its d/df sign."""
    if (c >> bit) & 1:
        w = f
        s = 1.0
    else:
        w = 1.0 - f
        s = -1.0
    return w, s


@triton.jit
def _runs(x_ptr, offs_n, nmask, gx, gy, gz, scale, res, N, BLOCK: tl.constexpr):
    """Runs of consecutive rows in one cell of this level ([BLOCK, 1] start and end flags, int32):
    a point's finite-difference taps, and neighbouring samples along a ray at the coarse levels."""
    r = tl.arange(0, BLOCK)[:, None]
    prev, nxt = nmask & (r > 0), nmask & (r < BLOCK - 1) & (offs_n + 1 < N)
    px, _ = _axis(x_ptr, offs_n - 1, prev, 0, scale, res)
    py, _ = _axis(x_ptr, offs_n - 1, prev, 1, scale, res)
    pz, _ = _axis(x_ptr, offs_n - 1, prev, 2, scale, res)
    qx, _ = _axis(x_ptr, offs_n + 1, nxt, 0, scale, res)
    qy, _ = _axis(x_ptr, offs_n + 1, nxt, 1, scale, res)
    qz, _ = _axis(x_ptr, offs_n + 1, nxt, 2, scale, res)
    start = ~prev | (px != gx) | (py != gy) | (pz != gz)
    end = ~nxt | (qx != gx) | (qy != gy) | (qz != gz)
    return start.to(tl.int32), end


@triton.jit
def _seg_combine(a, fa, b, fb):
    return tl.where(fb != 0, b, a + b), fa | fb


@triton.jit
def _run_sums(v, start):
    """Inclusive sums of ``v`` [BLOCK, FC] down each run (restarting where ``start``): at a run's
    last row, the run's total."""
    total, _ = tl.associative_scan((v, tl.broadcast_to(start, v.shape)), axis=0, combine_fn=_seg_combine)
    return total


@triton.jit
def _fwd_kernel(x_ptr, table_ptr, out_ptr, scales_ptr, meta_ptr, lmask_ptr, N,
                F: tl.constexpr, FP: tl.constexpr, FC: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr,
                I64: tl.constexpr, LEVEL_FAST: tl.constexpr, MASKED: tl.constexpr):
    lvl, offs_n, rmask = _program(N, L, BLOCK, LEVEL_FAST, I64)
    scale, res, size, off, hashed = _level(scales_ptr, meta_ptr, lvl)
    m, nmask = _gate(lmask_ptr, lvl, rmask, F, MASKED)
    gx, fx = _axis(x_ptr, offs_n, nmask, 0, scale, res)
    gy, fy = _axis(x_ptr, offs_n, nmask, 1, scale, res)
    gz, fz = _axis(x_ptr, offs_n, nmask, 2, scale, res)
    cols = tl.arange(0, FC)[None, :]
    for h in tl.static_range(FP // FC):  # 16-byte feature chunks (index math is CSE'd across them)
        cmask = _cmask(nmask, cols + h * FC, F, FP)
        acc = tl.zeros([BLOCK, FC], tl.float32)
        for c in tl.static_range(8):
            e = _corner(c, gx, gy, gz, res, size, off, hashed, F, I64) + h * FC
            wx, sx = _wsel(c, 0, fx)
            wy, sy = _wsel(c, 1, fy)
            wz, sz = _wsel(c, 2, fz)
            acc += ((wz * wy) * wx) * tl.load(table_ptr + e + cols, mask=cmask, other=0.0)
        optr = out_ptr + offs_n * (L * F) + lvl * F + h * FC + cols
        tl.store(optr, (acc * m).to(out_ptr.dtype.element_ty), mask=_cmask(rmask, cols + h * FC, F, FP),
                 eviction_policy="evict_first")


@triton.jit
def _bwd_kernel(gout_ptr, x_ptr, table_ptr, gtable_ptr, gx_ptr, scales_ptr, meta_ptr, lmask_ptr, N,
                F: tl.constexpr, FP: tl.constexpr, FC: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr,
                I64: tl.constexpr, LEVEL_FAST: tl.constexpr, MASKED: tl.constexpr,
                NEED_TABLE: tl.constexpr, NEED_X: tl.constexpr, MERGE: tl.constexpr):
    """dL/dtable += g * w_c (atomics); dL/dx += scale * sum_c dw_c/dfrac (g . T_c) (atomics);
    g is the output gradient times the level's weight m. MERGE: rows that run in one cell add
    their table gradients up first and issue one atomic per corner (at the run's last row)."""
    lvl, offs_n, nmask = _program(N, L, BLOCK, LEVEL_FAST, I64)
    scale, res, size, off, hashed = _level(scales_ptr, meta_ptr, lvl)
    m, nmask = _gate(lmask_ptr, lvl, nmask, F, MASKED)
    gx, fx = _axis(x_ptr, offs_n, nmask, 0, scale, res)
    gy, fy = _axis(x_ptr, offs_n, nmask, 1, scale, res)
    gz, fz = _axis(x_ptr, offs_n, nmask, 2, scale, res)
    if MERGE:
        start, end = _runs(x_ptr, offs_n, nmask, gx, gy, gz, scale, res, N, BLOCK)
    cols = tl.arange(0, FC)[None, :]
    dfx = tl.zeros([BLOCK, 1], tl.float32)
    dfy = tl.zeros([BLOCK, 1], tl.float32)
    dfz = tl.zeros([BLOCK, 1], tl.float32)
    for h in tl.static_range(FP // FC):
        cmask = _cmask(nmask, cols + h * FC, F, FP)
        g = tl.load(gout_ptr + offs_n * (L * F) + lvl * F + h * FC + cols, mask=cmask, other=0.0,
                    eviction_policy="evict_first").to(tl.float32) * m  # read once: keep L2 for the table
        for c in tl.static_range(8):
            ptrs = _corner(c, gx, gy, gz, res, size, off, hashed, F, I64) + h * FC + cols
            wx, sx = _wsel(c, 0, fx)
            wy, sy = _wsel(c, 1, fy)
            wz, sz = _wsel(c, 2, fz)
            if NEED_TABLE:
                if MERGE:
                    tl.atomic_add(gtable_ptr + ptrs, _run_sums(g * ((wz * wy) * wx), start), mask=cmask & end,
                                  sem="relaxed")
                else:
                    tl.atomic_add(gtable_ptr + ptrs, g * ((wz * wy) * wx), mask=cmask, sem="relaxed")
            if NEED_X:
                q = tl.sum(tl.load(table_ptr + ptrs, mask=cmask, other=0.0) * g, axis=1, keep_dims=True)
                dfx += sx * (wz * wy) * q
                dfy += sy * (wz * wx) * q
                dfz += sz * (wy * wx) * q
    if NEED_X:
        tl.atomic_add(gx_ptr + offs_n * 3 + 0, dfx * scale, mask=nmask, sem="relaxed")
        tl.atomic_add(gx_ptr + offs_n * 3 + 1, dfy * scale, mask=nmask, sem="relaxed")
        tl.atomic_add(gx_ptr + offs_n * 3 + 2, dfz * scale, mask=nmask, sem="relaxed")


@triton.jit
def _dir_kernel(v_ptr, gout_ptr, x_ptr, table_ptr, ydot_ptr, gtable_ptr, gx_ptr, scales_ptr, meta_ptr, lmask_ptr, N,
                F: tl.constexpr, FP: tl.constexpr, FC: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr,
                I64: tl.constexpr, LEVEL_FAST: tl.constexpr, MASKED: tl.constexpr,
                NEED_Y: tl.constexpr, NEED_TABLE: tl.constexpr, NEED_X: tl.constexpr):
    """Double backward of dL/dx along v [N, 3]: d(v . dx)/d(gout) = J v (the directional derivative
    of the output, ``ydot``), d/d(table) (atomics of g * u_c) and d/dx (mixed second derivatives);
    all scaled by the level's weight m."""
    lvl, offs_n, rmask = _program(N, L, BLOCK, LEVEL_FAST, I64)
    scale, res, size, off, hashed = _level(scales_ptr, meta_ptr, lvl)
    m, nmask = _gate(lmask_ptr, lvl, rmask, F, MASKED)
    gx, fx = _axis(x_ptr, offs_n, nmask, 0, scale, res)
    gy, fy = _axis(x_ptr, offs_n, nmask, 1, scale, res)
    gz, fz = _axis(x_ptr, offs_n, nmask, 2, scale, res)
    vx = tl.load(v_ptr + offs_n * 3 + 0, mask=nmask, other=0.0) * scale
    vy = tl.load(v_ptr + offs_n * 3 + 1, mask=nmask, other=0.0) * scale
    vz = tl.load(v_ptr + offs_n * 3 + 2, mask=nmask, other=0.0) * scale
    cols = tl.arange(0, FC)[None, :]
    hx = tl.zeros([BLOCK, 1], tl.float32)
    hy = tl.zeros([BLOCK, 1], tl.float32)
    hz = tl.zeros([BLOCK, 1], tl.float32)
    for h in tl.static_range(FP // FC):
        cmask = _cmask(nmask, cols + h * FC, F, FP)
        rows = offs_n * (L * F) + lvl * F + h * FC + cols
        if NEED_TABLE or NEED_X:
            g = tl.load(gout_ptr + rows, mask=cmask, other=0.0).to(tl.float32) * m
        acc = tl.zeros([BLOCK, FC], tl.float32)
        for c in tl.static_range(8):
            ptrs = _corner(c, gx, gy, gz, res, size, off, hashed, F, I64) + h * FC + cols
            wx, sx = _wsel(c, 0, fx)
            wy, sy = _wsel(c, 1, fy)
            wz, sz = _wsel(c, 2, fz)
            u = sx * (wz * wy) * vx + sy * (wz * wx) * vy + sz * (wy * wx) * vz  # scale * dw_c/dfrac . v
            if NEED_TABLE:
                tl.atomic_add(gtable_ptr + ptrs, g * u, mask=cmask, sem="relaxed")
            if NEED_Y or NEED_X:
                t = tl.load(table_ptr + ptrs, mask=cmask, other=0.0)
                if NEED_Y:
                    acc += u * t
                if NEED_X:  # d2w/dfa dfb = sa * sb * w_other (a != b); diagonal terms vanish
                    q = tl.sum(t * g, axis=1, keep_dims=True) * scale
                    hx += (sx * sy * wz * vy + sx * sz * wy * vz) * q
                    hy += (sx * sy * wz * vx + sy * sz * wx * vz) * q
                    hz += (sx * sz * wy * vx + sy * sz * wx * vy) * q
        if NEED_Y:
            tl.store(ydot_ptr + rows, acc * m, mask=_cmask(rmask, cols + h * FC, F, FP))
    if NEED_X:
        tl.atomic_add(gx_ptr + offs_n * 3 + 0, hx, mask=nmask, sem="relaxed")
        tl.atomic_add(gx_ptr + offs_n * 3 + 1, hy, mask=nmask, sem="relaxed")
        tl.atomic_add(gx_ptr + offs_n * 3 + 2, hz, mask=nmask, sem="relaxed")


# ----------------------------------------------------------------------------- launches

_TABLES: dict = {}


def level_tables(spec, buffers: dict | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level ``scales`` (L,) fp32 and ``meta`` (L, 4) int32 = (res, size, row offset, hashed)."""
    if buffers is not None and torch.compiler.is_compiling():  # traceable: from the module's buffers
        cat = lambda k: torch.cat([buffers[f"dense_{k}"], buffers[f"hashed_{k}"]])  # noqa: E731
        flag = torch.cat([torch.zeros_like(buffers["dense_res"]), torch.ones_like(buffers["hashed_res"])])
        return cat("scales"), torch.stack([cat("res"), cat("sizes"), cat("offsets"), flag], 1).to(torch.int32)
    key = (spec, str(device))
    if key not in _TABLES:
        if spec.num_entries >= 2 ** 31:
            raise StageError(f"hash grid with {spec.num_entries} rows is too large for the triton backend "
                             "(int32 rows); lower grid_log2_table or use grid_backend=torch")
        hashed = spec.hashed()
        if hashed.any() and not hashed[int(np.argmax(hashed)):].all():
            raise StageError("hash grid levels must be dense first, then hashed")
        meta = np.stack([spec.resolutions(), spec.sizes(), spec.offsets()[:-1], hashed], 1).astype(np.int32)
        _TABLES[key] = (torch.from_numpy(spec.scales().copy()).to(device), torch.from_numpy(meta).to(device))
    return _TABLES[key]


def _launch(kernel, which: str, n: int, levels: int, features: int, entries: int, *args,
            lmask: torch.Tensor, **flags) -> None:
    """Launch a kernel over ``args`` plus the level mask (``lmask``, empty: none; the kernel then
    gets any pointer in its place and MASKED off)."""
    block, warps = TUNING[which]
    fp = triton.next_power_of_2(features)
    big = max(n * levels * features, entries * features, n * 3) >= INT32_LIMIT
    masked = lmask.numel() > 0
    kernel[(triton.cdiv(n, block) * levels,)](
        *args, lmask.float().contiguous() if masked else args[0], n, F=features, FP=fp, FC=min(fp, 4), L=levels,
        BLOCK=block, I64=big, LEVEL_FAST=LEVEL_FAST, MASKED=masked, num_warps=warps, enable_fp_fusion=False, **flags)


def _dims(x: torch.Tensor, table: torch.Tensor, scales: torch.Tensor):
    return x.shape[0], scales.shape[0], table.shape[1], table.shape[0]


@torch.library.custom_op("meshpipe::hashgrid_fwd", mutates_args=())
def hashgrid_fwd(x: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, meta: torch.Tensor,
                 lmask: torch.Tensor, out_bf16: bool) -> torch.Tensor:
    n, lv, f, e = _dims(x, table, scales)
    out = torch.empty(n, lv * f, device=x.device, dtype=torch.bfloat16 if out_bf16 else torch.float32)
    if n:
        _launch(_fwd_kernel, "fwd", n, lv, f, e, x, table, out, scales, meta, lmask=lmask)
    return out


@hashgrid_fwd.register_fake
def _(x, table, scales, meta, lmask, out_bf16):
    return x.new_empty(x.shape[0], scales.shape[0] * table.shape[1],
                       dtype=torch.bfloat16 if out_bf16 else torch.float32)


@torch.library.custom_op("meshpipe::hashgrid_bwd", mutates_args=())
def hashgrid_bwd(gout: torch.Tensor, x: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, meta: torch.Tensor,
                 lmask: torch.Tensor, need_table: bool, need_x: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, lv, f, e = _dims(x, table, scales)
    gtable = torch.zeros_like(table) if need_table else table.new_empty(0)
    gx = torch.zeros_like(x) if need_x else x.new_empty(0)
    if n and (need_table or need_x):
        _launch(_bwd_kernel, "bwd", n, lv, f, e, gout, x, table, gtable if need_table else table,
                gx if need_x else x, scales, meta, lmask=lmask, NEED_TABLE=need_table, NEED_X=need_x,
                MERGE=MERGE_RUNS and need_table)
    return gtable, gx


@hashgrid_bwd.register_fake
def _(gout, x, table, scales, meta, lmask, need_table, need_x):
    return (table.new_empty(table.shape if need_table else (0,)), x.new_empty(x.shape if need_x else (0,)))


@torch.library.custom_op("meshpipe::hashgrid_dir", mutates_args=())
def hashgrid_dir(v: torch.Tensor, gout: torch.Tensor, x: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                 meta: torch.Tensor, lmask: torch.Tensor, need_y: bool, need_table: bool,
                 need_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, lv, f, e = _dims(x, table, scales)
    ydot = x.new_empty(n, lv * f) if need_y else x.new_empty(0)
    gtable = torch.zeros_like(table) if need_table else table.new_empty(0)
    gx = torch.zeros_like(x) if need_x else x.new_empty(0)
    if n and (need_y or need_table or need_x):
        _launch(_dir_kernel, "dir", n, lv, f, e, v, gout, x, table, ydot if need_y else x,
                gtable if need_table else table, gx if need_x else x, scales, meta, lmask=lmask,
                NEED_Y=need_y, NEED_TABLE=need_table, NEED_X=need_x)
    return ydot, gtable, gx


@hashgrid_dir.register_fake
def _(v, gout, x, table, scales, meta, lmask, need_y, need_table, need_x):
    n, lv, f, _ = _dims(x, table, scales)
    return (x.new_empty((n, lv * f) if need_y else (0,)), table.new_empty(table.shape if need_table else (0,)),
            x.new_empty(x.shape if need_x else (0,)))


# ----------------------------------------------------------------------------- autograd

def _fwd_setup(ctx, inputs, output):
    x, table, scales, meta, lmask, _ = inputs
    ctx.save_for_backward(x, table, scales, meta, lmask)


def _fwd_backward(ctx, gout):
    x, table, scales, meta, lmask = ctx.saved_tensors
    need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gtable, gx = hashgrid_bwd(gout.contiguous(), x, table, scales, meta, lmask, need_table, need_x)
    return (gx if need_x else None), (gtable if need_table else None), None, None, None, None


def _bwd_setup(ctx, inputs, output):
    gout, x, table, scales, meta, lmask, need_table, need_x = inputs
    ctx.save_for_backward(gout, x, table, scales, meta, lmask)
    ctx.made = (need_table, need_x)
    ctx.set_materialize_grads(False)


def _bwd_backward(ctx, g_table, g_x):
    """Grads of (gtable, gx) w.r.t. (gout, x, table): gtable is linear in gout (its adjoint is the
    forward with ``g_table`` as the table); gx goes through the directional kernel."""
    gout, x, table, scales, meta, lmask = ctx.saved_tensors
    want_g, want_x, want_t = ctx.needs_input_grad[:3]
    d_g = d_x = d_t = None
    if g_table is not None and ctx.made[0]:
        g_table = g_table.contiguous()
        if want_g:
            d_g = hashgrid_fwd(x, g_table, scales, meta, lmask, False)
        if want_x:
            d_x = hashgrid_bwd(gout, x, g_table, scales, meta, lmask, False, True)[1]
    if g_x is not None and ctx.made[1] and (want_g or want_x or want_t):
        y, t, h = hashgrid_dir(g_x.contiguous(), gout, x, table, scales, meta, lmask, want_g, want_t, want_x)
        if want_g:
            d_g = y if d_g is None else d_g + y
        if want_x:
            d_x = h if d_x is None else d_x + h
        if want_t:
            d_t = t
    if d_g is not None:
        d_g = d_g.to(gout.dtype)
    return d_g, d_x, d_t, None, None, None, None, None


hashgrid_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)
hashgrid_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


def encode_triton(x01: torch.Tensor, table: torch.Tensor, spec, buffers: dict | None = None,
                  out_dtype: torch.dtype = torch.float32, level_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of ``encode_torch``: points in [0, 1]^3 (N, 3) -> features (N, L * F), times
    ``level_mask`` (L * F, constant within each level) if given; levels whose mask is 0 read nothing."""
    if not (x01.is_cuda or interpreting()):
        raise StageError(f"grid backend triton runs on CUDA tensors, got a {x01.device.type} tensor; "
                         "use grid_backend=torch on CPU")
    if table.device != x01.device:
        raise StageError(f"hash grid table on {table.device} but points on {x01.device}")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise StageError(f"triton hash grid outputs float32 or bfloat16, not {out_dtype}")
    x = x01.float().clamp(0.0, 1.0).contiguous()
    scales, meta = level_tables(spec, buffers, x.device)
    skip = level_mask is not None and LEVEL_SKIP
    lmask = level_mask.detach() if skip else x.new_empty(0)
    out = hashgrid_fwd(x, table.float().contiguous(), scales, meta, lmask, out_dtype == torch.bfloat16)
    return out if skip or level_mask is None else out * level_mask
