"""The hash-grid backward's other floor: how many fp32 atomic adds per second the GPU takes into a
table gradient of one level's size, at random rows (the fine levels' pattern: a point's 8
corners hash to unrelated rows, F features each), and what that allows the grid at 16 levels.

    PYTHONPATH=. python benchmarks/atomics.py --out atomics.json               # H100, < 1 min
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/atomics.py --device cpu --tiny

At F = 2 every level's table fits in L2, so HBM bandwidth does not bound the grid
(benchmarks/hashgrid_triton_check.py computes that floor); the L2's atomic units do. One
point's backward is 16 levels x 8 corners x F atomics, fewer only where rows share a cell.
Prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from hashgrid_triton_check import timed


@triton.jit
def _scatter(table_ptr, row_ptr, val_ptr, n, F: tl.constexpr, BLOCK: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """ROW_BLOCK: one [BLOCK, F] atomic, a row's F floats in neighbouring lanes (as the grid's
    backward kernel issues them); else one [BLOCK] atomic per feature."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row = tl.load(row_ptr + offs, mask=mask, other=0)
    v = tl.load(val_ptr + offs, mask=mask, other=0.0)
    if ROW_BLOCK:
        cols = tl.arange(0, F)[None, :]
        tl.atomic_add(table_ptr + row[:, None] * F + cols, v[:, None] + 0.0 * cols, mask=mask[:, None],
                      sem="relaxed")
    else:
        for f in tl.static_range(F):
            tl.atomic_add(table_ptr + row * F + f, v, mask=mask, sem="relaxed")


def atomic_rate(features: int, log2_table: int, n: int, device, iters: int, row_block: bool,
                block: int = 256) -> dict:
    """fp32 atomic adds per second: n random rows of a (2^log2_table, F) table, F adds each."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = torch.randint(0, 1 << log2_table, (n,), generator=g).to(device)
    vals = torch.rand(n, generator=g).to(device)
    table = torch.zeros((1 << log2_table) * features, device=device)
    grid = (triton.cdiv(n, block),)
    warmup = 1
    sec = timed(lambda: _scatter[grid](table, rows, vals, n, F=features, BLOCK=block, ROW_BLOCK=row_block),
                device, iters, warmup)
    want = float(vals.double().sum()) * features * (iters + warmup)
    if abs(float(table.double().sum()) - want) > 1e-3 * abs(want):  # every add landed
        raise RuntimeError(f"atomic sums wrong: {float(table.double().sum())} vs {want}")
    return {"features": features, "pattern": "row block" if row_block else "per feature",
            "table_mib": table.numel() * 4 / 2**20, "adds": n * features, "ms": 1000 * sec,
            "adds_per_s": n * features / sec}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--features", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--log2-table", type=int, default=22)
    ap.add_argument("--levels", type=int, default=16)
    ap.add_argument("--rows", type=int, default=1 << 23, help="atomic rows per launch (8 corners x 1M points)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.log2_table, args.rows, args.iters = 10, 4096, 1
    device = torch.device(args.device)
    rows = []
    for f in args.features:
        for row_block in (True, False):
            r = atomic_rate(f, args.log2_table, args.rows, device, args.iters, row_block)
            r["grid_points_per_s_bound"] = r["adds_per_s"] / (args.levels * 8 * f)  # backward atomics alone
            rows.append(r)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "args": vars(args) | {"out": str(args.out)},
            "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(info, indent=1))
    print(f"\nrandom fp32 atomic adds, {info['device']}, 2^{args.log2_table}-row table, {args.levels} levels\n")
    print("| F | pattern | table MiB | G adds/s | ms per launch | grid fwd+bwd bound, M points/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['features']} | {r['pattern']} | {r['table_mib']:.0f} | {r['adds_per_s'] / 1e9:.1f} | "
              f"{r['ms']:.2f} | {r['grid_points_per_s_bound'] / 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
