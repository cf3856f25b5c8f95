"""Fused SDF MLP head (stages/train/mlp_triton.py) against torch: forward+backward rows/s.

    PYTHONPATH=. python benchmarks/sdf_mlp.py --out sdf_mlp.json               # CUDA
    PYTHONPATH=. python benchmarks/sdf_mlp.py --tune 64,64,4 32,64,4 64,32,4  # (rows, hidden chunk, warps)

Rows as in a training step's SDF call: x and its 4 tetrahedral taps (131072 x 5 rows), the hash
grid's 16 levels x F features plus x as input, one hidden layer of 256, the feature (64) only at
the centres. torch: the same in fp32 eager and with torch.compile. Markdown table last; JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hashgrid import sync, timed  # noqa: E402
from stages.train import mlp_triton as mt  # noqa: E402


def torch_head(x, w1, b1, w2, rows):
    h = F.softplus(F.linear(x, w1, b1), beta=100.0)
    return h @ w2, h[rows]


def case(name: str, fn, m: int, k: int, hidden: int, feature_dim: int, device, repeats: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=g) * 0.3
    params = [torch.randn(hidden, k, device=device, generator=g) * 0.2, torch.zeros(hidden, device=device),
              torch.randn(hidden, device=device, generator=g) * 0.1,
              torch.randn(feature_dim, hidden, device=device, generator=g) * 0.1]
    for p in params:
        p.requires_grad_(True)
    x.requires_grad_(True)
    rows = slice(0, None, 5)

    def step():
        for t in params + [x]:
            t.grad = None
        s, h = fn(x, *params[:3], rows)
        (s.square().sum() + F.linear(h, params[3]).square().sum()).backward()
    sec, peak = timed(step, device, repeats)
    return {"case": name, "rows": m, "inputs": k, "hidden": hidden, "per_second": m / sec, "ms": 1000 * sec,
            "peak_gib": peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=131072 * 5)
    ap.add_argument("--features", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--feature-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tune", nargs="*", default=[], help="tunings to try for the fused kernels: BM,BH,WARPS")
    ap.add_argument("--precision", default=mt.PRECISION, help="tf32x3 (training), tf32 or ieee: what the products cost")
    ap.add_argument("--no-torch", action="store_true", help="only the fused kernels")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    mt.PRECISION = args.precision
    rows = []
    for f in args.features:
        k = 3 + 16 * f
        kp = max(64, 1 << (k - 1).bit_length())
        dims = (args.rows, k, args.hidden, args.feature_dim, device, args.repeats)
        if not args.no_torch:
            rows.append(case("torch eager", torch_head, *dims))
            rows.append(case("torch compiled", torch.compile(torch_head, dynamic=False), *dims))
        default = mt.TUNING[kp]
        for tune in [None] + [tuple(int(v) for v in t.split(",")) for t in args.tune]:
            mt.TUNING[kp] = tune or default
            try:
                rows.append(case(f"fused {args.precision} {mt.TUNING[kp]}", mt.sdf_head, *dims))
            except Exception as exc:  # a tuning that does not compile (registers, shared memory) is a result
                rows.append({"case": f"fused {mt.TUNING[kp]}", "inputs": k, "error": f"{type(exc).__name__}: {exc}"[:200]})
            sync(device)
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        mt.TUNING[kp] = default
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "rows": rows}, indent=1))
    print("| case | inputs | rows | M rows/s | ms | peak GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | {r['inputs']} | | error: {r['error'][:90]} | | |")
        else:
            print(f"| {r['case']} | {r['inputs']} | {r['rows']} | {r['per_second'] / 1e6:.1f} | {r['ms']:.2f} | "
                  f"{r['peak_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
