"""Hash-grid speed: forward+backward points/s and peak memory per backend, side by side.

    PYTHONPATH=. python benchmarks/hashgrid.py --out hashgrid.json            # Neuralangelo size, N = 2^20
    PYTHONPATH=. python benchmarks/hashgrid.py --tiny --out /tmp/hg.json      # CPU smoke test

Backends: torch eager, torch compiled (``torch.compile``), triton (stages/train/hashgrid_triton.py;
CUDA) alone and under ``torch.compile`` (the MLP compiled around the custom op), tcnn (only if
tinycudann imports).
Also a full SDF step (x + numerical-gradient taps through grid and 1x256 MLP, eikonal +
curvature, backward) per backend, in samples/s. Prints a markdown table last; JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.train.external import tcnn_available  # noqa: E402
from stages.train.gradients import sdf_and_gradients  # noqa: E402
from stages.train.hashgrid import GridSpec, HashGrid  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> tuple[float, float]:
    """Seconds per call (median after a warm-up call) and peak memory in GiB (CUDA only)."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


GRID_BACKEND = {"eager": "torch", "compiled": "torch", "triton": "triton", "triton_compiled": "triton",
                "tcnn": "tcnn"}


def grid_case(spec: GridSpec, backend: str, n: int, device, repeats: int) -> dict:
    grid = HashGrid(spec, GRID_BACKEND[backend]).to(device)
    call = grid
    if backend.endswith("compiled"):
        call = torch.compile(grid, dynamic=False)
    x = torch.rand(n, 3, device=device)
    w = torch.randn(n, spec.out_dim, device=device)

    def step():
        grid.table.grad = None
        (call(x) * w).sum().backward()
    sec, peak = timed(step, device, repeats)
    return {"case": "grid fwd+bwd", "backend": backend, "features": spec.features, "n": n,
            "per_second": n / sec, "ms": 1000 * sec, "peak_gib": peak}


class TinySdf(torch.nn.Module):
    def __init__(self, spec: GridSpec, hidden: int, backend: str):
        super().__init__()
        self.grid = HashGrid(spec, backend)
        self.l1 = torch.nn.Linear(3 + spec.out_dim, hidden)
        self.l2 = torch.nn.Linear(hidden, 1 + 64)

    def forward(self, x):
        h = torch.nn.functional.softplus(self.l1(torch.cat([x, self.grid((x + 1) * 0.5)], -1)), beta=100)
        out = self.l2(h)
        return out[:, 0], out[:, 1:]


def sdf_step_case(spec: GridSpec, backend: str, n: int, device, repeats: int, taps: str) -> dict:
    model = TinySdf(spec, 256, GRID_BACKEND[backend]).to(device)
    field = torch.compile(model, dynamic=False) if backend.endswith("compiled") else model
    x = torch.rand(n, 3, device=device) * 1.2 - 0.6

    def step():
        model.zero_grad(set_to_none=True)
        sdf, feat, grad, lap = sdf_and_gradients(field, x, 1e-3, taps)
        loss = sdf.abs().mean() + 0.1 * ((grad.norm(dim=-1) - 1) ** 2).mean() + 5e-4 * lap.abs().mean() + feat.mean()
        loss.backward()
    sec, peak = timed(step, device, repeats)
    return {"case": f"sdf step {taps}", "backend": backend, "features": spec.features, "n": n,
            "per_second": n / sec, "ms": 1000 * sec, "peak_gib": peak}


def run_case(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as exc:  # a backend failing (compile errors, OOM) is a result, not a crash
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"case": fn.__name__, "backend": args[1], "error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def available(backend: str, device) -> bool:
    if backend == "tcnn":
        return device.type == "cuda" and tcnn_available()
    if backend.startswith("triton"):
        try:
            import stages.train.hashgrid_triton  # noqa: F401
        except ImportError:
            return False
        return device.type == "cuda"
    return backend in GRID_BACKEND


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=1 << 20, help="points per grid call")
    ap.add_argument("--sdf-n", type=int, default=131072, help="samples per SDF step")
    ap.add_argument("--features", type=int, nargs="+", default=[8, 2])
    ap.add_argument("--levels", type=int, default=16)
    ap.add_argument("--log2-table", type=int, default=22)
    ap.add_argument("--base-res", type=int, default=32)
    ap.add_argument("--max-res", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--backends", default="eager,compiled,triton,triton_compiled,tcnn")
    ap.add_argument("--taps", nargs="+", default=["tetra4", "central6"])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test sizes")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.n, args.sdf_n, args.levels, args.log2_table, args.max_res, args.base_res, args.repeats = \
            4096, 2048, 8, 14, 256, 16, 2
    device = torch.device(args.device)
    backends = [b for b in args.backends.split(",") if available(b, device)]
    rows = []
    for f in args.features:
        spec = GridSpec(args.levels, f, args.log2_table, args.base_res, args.max_res)
        for backend in backends:
            rows.append(run_case(grid_case, spec, backend, args.n, device, args.repeats))
            for taps in args.taps:
                rows.append(run_case(sdf_step_case, spec, backend, args.sdf_n, device, args.repeats, taps))
            print(json.dumps(rows[-1 - len(args.taps)]), file=sys.stderr)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "tcnn": tcnn_available(), "args": {k: str(v) for k, v in vars(args).items()},
            "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(info, indent=1))
    print(f"\nhash grid: {args.levels} levels, 2^{args.log2_table} table, res {args.base_res}->{args.max_res}, "
          f"device {info['device']}, torch {torch.__version__}\n")
    print("| case | backend | F | N | M points/s | ms | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | {r['backend']} | | | error: {r['error'][:80]} | | |")
        else:
            print(f"| {r['case']} | {r['backend']} | {r['features']} | {r['n']} | {r['per_second'] / 1e6:.2f} | "
                  f"{r['ms']:.1f} | {r['peak_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
