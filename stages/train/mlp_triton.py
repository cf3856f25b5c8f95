"""Fused SDF MLP head on tensor cores: ``sdf = softplus_100(x W1^T + b1) . w2`` in one kernel.

The SDF network's one hidden layer (width H) and the SDF column of its last layer, for every
row, never writing the hidden activations: a program keeps a block of rows in registers and
walks the hidden units in chunks. The hidden activations come back only at the feature rows
(``row = i * step``, ``i < count``: the centres of the finite-difference taps), where the
feature columns are applied in torch. The backward recomputes the hidden layer instead of
storing it (two kernels: one for the input gradient, row-blocked; one persistent kernel per
hidden chunk that sums the weight gradients in registers and writes one partial per program,
summed in torch, so the result does not depend on atomics' order).

Precision: the products run as 3xTF32 (``input_precision="tf32x3"``: a = big + small, three
TF32 products, about fp32's accuracy). Plain TF32 or bf16 rounding would be amplified by the
1/eps of the finite differences (benchmarks/hashgrid.py --precision: TF32 turns the normals
by ~1 degree). Only the forward of the numerical-gradient path is covered: no double backward.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pipeline.errors import StageError

BETA = tl.constexpr(100.0)
THRESHOLD = tl.constexpr(20.0)  # torch's softplus: linear above beta * z > 20
PRECISION = "tf32x3"
# (rows per block, hidden units per chunk, warps) by padded input width; benchmarks/hashgrid.py
TUNING = {64: (64, 64, 4), 128: (64, 64, 4), 256: (32, 64, 4)}
PARTIALS_PER_CHUNK = 264  # programs per hidden chunk in the weight-gradient kernel (2 per SM on H100)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supported(hidden: int, n_in: int) -> bool:
    """Shapes the kernels take: a power-of-two hidden width of 16-512, inputs up to 256 wide."""
    return 16 <= hidden <= 512 and hidden & (hidden - 1) == 0 and n_in <= 256


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _softplus(z):
    t = z * BETA
    return tl.where(t > THRESHOLD, z, (tl.maximum(t, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(t)))) / BETA)


@triton.jit
def _rows(blk, M, K, STEP, C, x_ptr, BM: tl.constexpr, KP: tl.constexpr):
    """Row offsets, row mask, centre mask and the [BM, KP] input block of row block ``blk``."""
    rows = blk * BM + tl.arange(0, BM)
    rmask = rows < M
    ks = tl.arange(0, KP)
    xb = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=rmask[:, None] & (ks < K)[None, :], other=0.0)
    centre = rmask & (rows % STEP == 0) & (rows // STEP < C)
    return rows, rmask, centre, xb


@triton.jit
def _hidden(xb, w1_ptr, b1_ptr, h0, K, BH: tl.constexpr, KP: tl.constexpr, PREC: tl.constexpr):
    """Pre-activations [BM, BH] of hidden units h0 .. h0 + BH, and W1's chunk [KP, BH] (transposed)."""
    hs = h0 + tl.arange(0, BH)
    ks = tl.arange(0, KP)
    w1t = tl.load(w1_ptr + hs[None, :] * K + ks[:, None], mask=(ks < K)[:, None], other=0.0)
    z = tl.dot(xb, w1t, input_precision=PREC) + tl.load(b1_ptr + hs)[None, :]
    return z, w1t, hs


@triton.jit
def _dz(z, ds, dhc_ptr, rows, centre, hs, w2, STEP, H: tl.constexpr):
    """d loss / d pre-activation: (ds * w2 + the feature rows' d hidden) * sigmoid(beta z)."""
    dh = ds[:, None] * w2[None, :]
    dh += tl.load(dhc_ptr + (rows // STEP)[:, None] * H + hs[None, :], mask=centre[:, None], other=0.0)
    t = z * BETA
    return dh * tl.where(t > THRESHOLD, 1.0, tl.sigmoid(t))


@triton.jit
def _fwd_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, s_ptr, hc_ptr, M, K, STEP, C,
                H: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr):
    rows, rmask, centre, xb = _rows(tl.program_id(0), M, K, STEP, C, x_ptr, BM, KP)
    s = tl.zeros([BM], dtype=tl.float32)
    for h0 in tl.static_range(0, H, BH):
        z, _, hs = _hidden(xb, w1_ptr, b1_ptr, h0, K, BH, KP, PREC)
        h = _softplus(z)
        s += tl.sum(h * tl.load(w2_ptr + hs)[None, :], axis=1)
        tl.store(hc_ptr + (rows // STEP)[:, None] * H + hs[None, :], h, mask=centre[:, None])
    tl.store(s_ptr + rows, s, mask=rmask)


@triton.jit
def _bwd_x_kernel(ds_ptr, dhc_ptr, x_ptr, w1_ptr, b1_ptr, w2_ptr, dx_ptr, M, K, STEP, C,
                  H: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr):
    rows, rmask, centre, xb = _rows(tl.program_id(0), M, K, STEP, C, x_ptr, BM, KP)
    ds = tl.load(ds_ptr + rows, mask=rmask, other=0.0)
    dx = tl.zeros([BM, KP], dtype=tl.float32)
    for h0 in tl.static_range(0, H, BH):
        z, w1t, hs = _hidden(xb, w1_ptr, b1_ptr, h0, K, BH, KP, PREC)
        dz = _dz(z, ds, dhc_ptr, rows, centre, hs, tl.load(w2_ptr + hs), STEP, H)
        dx += tl.dot(dz, tl.trans(w1t), input_precision=PREC)
    ks = tl.arange(0, KP)
    tl.store(dx_ptr + rows[:, None] * K + ks[None, :], dx, mask=rmask[:, None] & (ks < K)[None, :])


@triton.jit
def _bwd_w_kernel(ds_ptr, dhc_ptr, x_ptr, w1_ptr, b1_ptr, w2_ptr, pw_ptr, pb_ptr, pw2_ptr, M, K, STEP, C, P,
                  ITERS: tl.constexpr, H: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr):
    """Program (p, chunk): rows blocks p, p + P, ... of one hidden chunk; writes partial sums."""
    p = tl.program_id(0)
    h0 = tl.program_id(1) * BH
    hs = h0 + tl.arange(0, BH)
    w2 = tl.load(w2_ptr + hs)
    acc_w = tl.zeros([BH, KP], dtype=tl.float32)
    acc_b = tl.zeros([BH], dtype=tl.float32)
    acc_w2 = tl.zeros([BH], dtype=tl.float32)
    for i in range(0, ITERS):  # a constexpr bound (the interpreter cannot loop to a runtime one); blocks
        # past the end have all rows masked
        rows, rmask, centre, xb = _rows(p + i * P, M, K, STEP, C, x_ptr, BM, KP)
        ds = tl.load(ds_ptr + rows, mask=rmask, other=0.0)
        z, _, _ = _hidden(xb, w1_ptr, b1_ptr, h0, K, BH, KP, PREC)
        dz = _dz(z, ds, dhc_ptr, rows, centre, hs, w2, STEP, H)
        acc_w += tl.dot(tl.trans(dz), xb, input_precision=PREC)
        acc_b += tl.sum(dz, axis=0)
        acc_w2 += tl.sum(ds[:, None] * _softplus(z), axis=0)
    ks = tl.arange(0, KP)
    tl.store(pw_ptr + p * H * K + hs[:, None] * K + ks[None, :], acc_w, mask=(ks < K)[None, :])
    tl.store(pb_ptr + p * H + hs, acc_b)
    tl.store(pw2_ptr + p * H + hs, acc_w2)


# ----------------------------------------------------------------------------- ops

def _shape(x: torch.Tensor, w1: torch.Tensor):
    m, k = x.shape
    kp = max(16, triton.next_power_of_2(k))
    bm, bh, warps = TUNING[max(64, kp)]
    h = w1.shape[0]
    return m, k, h, kp, bm, min(bh, h), warps


@torch.library.custom_op("meshpipe::sdf_mlp_fwd", mutates_args=())
def sdf_mlp_fwd(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                step: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, k, h, kp, bm, bh, warps = _shape(x, w1)
    s = x.new_empty(m)
    hc = x.new_empty(count, h)
    if m:
        _fwd_kernel[(triton.cdiv(m, bm),)](x, w1, b1, w2, s, hc, m, k, step, count, H=h, KP=kp, BM=bm, BH=bh,
                                           PREC=PRECISION, num_warps=warps)
    return s, hc


@sdf_mlp_fwd.register_fake
def _(x, w1, b1, w2, step, count):
    return x.new_empty(x.shape[0]), x.new_empty(count, w1.shape[0])


@torch.library.custom_op("meshpipe::sdf_mlp_bwd", mutates_args=())
def sdf_mlp_bwd(ds: torch.Tensor, dhc: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                w2: torch.Tensor, step: int, count: int,
                need_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k, h, kp, bm, bh, warps = _shape(x, w1)
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    # ITERS row blocks per program, a power of two (few distinct compiles), about PARTIALS_PER_CHUNK programs
    iters = triton.next_power_of_2(triton.cdiv(triton.cdiv(max(m, 1), bm), PARTIALS_PER_CHUNK))
    parts = triton.cdiv(triton.cdiv(max(m, 1), bm), iters)
    pw, pb, pw2 = x.new_zeros(parts, h, k), x.new_zeros(parts, h), x.new_zeros(parts, h)
    if m:
        args = (ds, dhc, x, w1, b1, w2)
        if need_x:
            _bwd_x_kernel[(triton.cdiv(m, bm),)](*args, dx, m, k, step, count, H=h, KP=kp, BM=bm, BH=bh,
                                                 PREC=PRECISION, num_warps=warps)
        _bwd_w_kernel[(parts, h // bh)](*args, pw, pb, pw2, m, k, step, count, parts, ITERS=iters, H=h, KP=kp, BM=bm, BH=bh,
                                        PREC=PRECISION, num_warps=warps)
    return dx, pw.sum(0), pb.sum(0), pw2.sum(0)


@sdf_mlp_bwd.register_fake
def _(ds, dhc, x, w1, b1, w2, step, count, need_x):
    return x.new_empty(x.shape if need_x else (0,)), torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2)


def _setup(ctx, inputs, output):
    x, w1, b1, w2, step, count = inputs
    ctx.save_for_backward(x, w1, b1, w2)
    ctx.rows = (step, count)


def _backward(ctx, ds, dhc):
    x, w1, b1, w2 = ctx.saved_tensors
    dx, dw1, db1, dw2 = sdf_mlp_bwd(ds.contiguous(), dhc.contiguous(), x, w1, b1, w2, *ctx.rows,
                                    ctx.needs_input_grad[0])
    return (dx if ctx.needs_input_grad[0] else None), dw1, db1, dw2, None, None


sdf_mlp_fwd.register_autograd(_backward, setup_context=_setup)


def feature_row_span(rows: slice, m: int) -> tuple[int, int]:
    """(step, count) of a feature-row slice that starts at row 0."""
    start, stop, step = rows.indices(m)
    if start != 0 or step < 1:
        raise StageError(f"fused SDF MLP: feature rows must start at 0 with a positive step, got {rows}")
    return step, len(range(0, stop, step))


def sdf_head(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softplus_100(x W1^T + b1) . w2`` for every row, hidden activations at ``x[rows]``)."""
    if not (x.is_cuda or interpreting()):
        raise StageError(f"the fused SDF MLP runs on CUDA tensors, got a {x.device.type} tensor; use sdf_mlp=torch")
    if not supported(w1.shape[0], x.shape[1]):
        raise StageError(f"the fused SDF MLP takes a power-of-two hidden width of 16-512 and up to 256 inputs, "
                         f"got width {w1.shape[0]} and {x.shape[1]} inputs; use sdf_mlp=torch")
    step, count = feature_row_span(rows, x.shape[0])
    return sdf_mlp_fwd(x.float().contiguous(), w1.float().contiguous(), b1.float().contiguous(),
                       w2.float().contiguous(), step, count)
