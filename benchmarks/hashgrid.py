"""Hash-grid speed: forward+backward points/s and peak memory per backend, side by side.

    PYTHONPATH=. python benchmarks/hashgrid.py --out hashgrid.json            # Neuralangelo size, N = 2^20
    PYTHONPATH=. python benchmarks/hashgrid.py --tiny --out /tmp/hg.json      # CPU smoke test

Backends: torch eager, torch compiled (``torch.compile``), triton (stages/train/hashgrid_triton.py;
CUDA) alone and under ``torch.compile`` (the MLP compiled around the custom op), tcnn (only if
tinycudann imports); ``compiled_step`` / ``triton_step`` compile the whole SDF step, as training does
(``_graphs``: replayed as CUDA graphs; ``_tf32``: TF32 matmuls, ``train.sdf_matmul=tf32``).
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

from bench_paths import ROOT  # noqa: E402,F401

from stages.train.external import tcnn_available  # noqa: E402
from stages.train import fields  # noqa: E402
from stages.train.fields import Linear  # noqa: E402
from stages.train.gradients import sdf_and_gradients  # noqa: E402
from stages.train.hashgrid import GridSpec, HashGrid  # noqa: E402
from stages.train.loop import tf32_matmuls  # noqa: E402


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
                "compiled_step": "torch", "triton_step": "triton", "triton_step_tf32": "triton",
                "triton_step_graphs": "triton", "triton_step_graphs_tf32": "triton", "tcnn": "tcnn"}
# SDF step only: the whole step (taps, field, losses; forward and backward) is one torch.compile
# graph, as in training (stages/train/loop.py); for the grid case these equal their *_compiled twin.
# triton_step_tf32: the same with TF32 matmuls (see --precision for what that does to gradients);
# triton_step_graphs: replayed as CUDA graphs (mode="reduce-overhead", as long training runs do);
# triton_step_graphs_tf32: both.
WHOLE_STEP = ("compiled_step", "triton_step", "triton_step_tf32", "triton_step_graphs", "triton_step_graphs_tf32")


def grid_case(spec: GridSpec, backend: str, n: int, device, repeats: int) -> dict:
    grid = HashGrid(spec, GRID_BACKEND[backend]).to(device)
    call = grid
    if backend.endswith("compiled") or backend in WHOLE_STEP:
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
    """SDFNetwork's shape; ``split``: the feature only at ``feature_rows``, as SDFNetwork does."""

    def __init__(self, spec: GridSpec, hidden: int, backend: str, split: bool = True):
        super().__init__()
        self.split = split
        self.grid = HashGrid(spec, backend)
        self.l1 = Linear(3 + spec.out_dim, hidden, weight_norm=False)
        self.l2 = Linear(hidden, 1 + 64, weight_norm=False)

    def forward(self, x, feature_rows=None):
        h = torch.nn.functional.softplus(self.l1(torch.cat([x, self.grid((x + 1) * 0.5)], -1)), beta=100)
        if feature_rows is not None and self.split:
            return self.l2.split(h, feature_rows)
        out = self.l2(h)
        return out[:, 0], out[:, 1:][feature_rows or slice(None)]


def sdf_step_case(spec: GridSpec, backend: str, n: int, device, repeats: int, taps: str,
                  profile: bool = False, all_features: bool = False) -> dict:
    model = TinySdf(spec, 256, GRID_BACKEND[backend], split=not all_features).to(device)
    field = torch.compile(model, dynamic=False) if backend.endswith("compiled") else model

    def sdf_loss(x):
        sdf, feat, grad, lap = sdf_and_gradients(field, x, 1e-3, taps)
        return sdf.abs().mean() + 0.1 * ((grad.norm(dim=-1) - 1) ** 2).mean() + 5e-4 * lap.abs().mean() + feat.mean()
    graphs = "_graphs" in backend
    loss_of = torch.compile(sdf_loss, dynamic=False, mode="reduce-overhead" if graphs else None) \
        if backend in WHOLE_STEP else sdf_loss
    x = torch.rand(n, 3, device=device) * 1.2 - 0.6

    def step():
        model.zero_grad(set_to_none=True)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss_of(x).backward()
    with tf32_matmuls(backend.endswith("_tf32")):
        sec, peak = timed(step, device, repeats)
        case = f"sdf step {taps}" + " all features" * all_features + " sdf gemm" * (not fields.REDUCE_SDF_COLUMN) \
            + " no merge" * (GRID_BACKEND[backend] == "triton" and not merge_runs())
        row = {"case": case, "backend": backend,
               "features": spec.features, "n": n, "per_second": n / sec, "ms": 1000 * sec, "peak_gib": peak}
        if profile and device.type == "cuda":
            row["busy_ms"], row["top_kernels"] = profile_kernels(step, device, repeats)
    return row


def merge_runs() -> bool:
    from stages.train import hashgrid_triton
    return hashgrid_triton.MERGE_RUNS


def profile_kernels(step, device, repeats: int, rows: int = 14) -> tuple[float, list]:
    """GPU busy ms per call (the sum of kernel times) and the kernels that take the most."""
    from step_profile import kernels, top_kernels

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        sync(device)
    events = kernels(prof, device)
    top = top_kernels(events, rows)
    for k in top:
        k["ms"] /= repeats
    return sum(t for _, t, _ in events) / 1000.0 / repeats, top


def precision_case(spec: GridSpec, backend: str, n: int, device, repeats: int, taps: str) -> list[dict]:
    """Does a low-precision SDF MLP hurt numerical gradients? The SDF network of training
    (geometric init, table uniform in +-0.01 as a stand-in for a trained one) evaluated in fp64
    (reference), fp32, TF32 matmuls and bf16 autocast: gradient angle and |grad| errors."""
    import dataclasses

    from pipeline.config import TrainConfig
    from stages.train.fields import SDFNetwork

    cfg = dataclasses.replace(TrainConfig(), grid_levels=spec.levels, grid_features=spec.features,
                              grid_log2_table=spec.log2_table, grid_base_res=spec.base_res,
                              grid_max_res=spec.max_res, sdf_hidden=256)
    torch.manual_seed(0)
    net = SDFNetwork(cfg, "torch").to(device)
    with torch.no_grad():
        net.grid.table.uniform_(-1e-2, 1e-2)
    x = torch.nn.functional.normalize(torch.randn(n, 3, device=device), dim=-1) * 0.5  # near the surface
    with torch.no_grad():
        ref = sdf_and_gradients(net.double(), x.double(), 1e-3, taps)[2]
        net.float()
        rows = []
        for name in ("fp32", "tf32", "bf16"):
            with tf32_matmuls(name == "tf32"), torch.autocast(device.type, torch.bfloat16, enabled=name == "bf16"):
                grad = sdf_and_gradients(net, x, 1e-3, taps)[2].double()
            cos = torch.nn.functional.cosine_similarity(grad, ref, dim=-1).clamp(-1, 1)
            angle = torch.rad2deg(torch.arccos(cos))
            norm_err = (grad.norm(dim=-1) - ref.norm(dim=-1)).abs()
            rows.append({"case": f"sdf precision {taps}", "backend": name, "features": spec.features, "n": n,
                         "angle_deg_median": float(angle.median()), "angle_deg_p99": float(angle.quantile(0.99)),
                         "grad_norm_err_median": float(norm_err.median()), "grad_norm_ref_median": float(ref.norm(dim=-1).median())})
    return rows


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
    ap.add_argument("--backends", default="eager,compiled,triton,triton_compiled,compiled_step,triton_step,tcnn")
    ap.add_argument("--taps", nargs="+", default=["tetra4", "central6"])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test sizes")
    ap.add_argument("--precision", action="store_true",
                    help="numerical-gradient error of the SDF MLP in fp32 / TF32 / bf16 against fp64")
    ap.add_argument("--profile", action="store_true", help="SDF step: GPU busy time and top kernels (CUDA)")
    ap.add_argument("--all-features", action="store_true",
                    help="SDF step: every tap's feature computed too, then dropped (as before the sixth session)")
    ap.add_argument("--no-merge", action="store_true",
                    help="triton backward: one atomic per row, not per run of rows in one cell (as before)")
    ap.add_argument("--sdf-gemm", action="store_true",
                    help="SDF step: the SDF column as a GEMM, not a fused reduction (as before)")
    ap.add_argument("--tuning", default="",
                    help="triton BLOCK x num_warps per kernel, e.g. fwd=64x2,bwd=256x8 (default: the module's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    fields.REDUCE_SDF_COLUMN = not args.sdf_gemm
    if args.no_merge or args.tuning:
        from stages.train import hashgrid_triton
        hashgrid_triton.MERGE_RUNS = not args.no_merge
        for item in filter(None, args.tuning.split(",")):
            kind, _, cfg = item.partition("=")
            hashgrid_triton.TUNING[kind] = tuple(int(v) for v in cfg.split("x"))
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
                rows.append(run_case(sdf_step_case, spec, backend, args.sdf_n, device, args.repeats, taps,
                                     args.profile, args.all_features))
            print(json.dumps(rows[-1 - len(args.taps)]), file=sys.stderr)
        if args.precision:
            got = run_case(precision_case, spec, "fp32", min(args.sdf_n, 65536), device, args.repeats, args.taps[0])
            rows.extend(got if isinstance(got, list) else [got])
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "tcnn": tcnn_available(), "args": {k: str(v) for k, v in vars(args).items()},
            "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(info, indent=1))
    print(f"\nhash grid: {args.levels} levels, 2^{args.log2_table} table, res {args.base_res}->{args.max_res}, "
          f"device {info['device']}, torch {torch.__version__}\n")
    for r in rows:
        if "top_kernels" in r:
            print(f"\n{r['case']}, {r['backend']}, F={r['features']}: GPU busy {r['busy_ms']:.2f} of {r['ms']:.2f} ms")
            for k in r["top_kernels"]:
                print(f"  {k['ms']:7.3f} ms {100 * k['share']:5.1f}%  x{k['calls']}  {k['name']}")
    print()
    print("| case | backend | F | N | M points/s | ms | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | {r['backend']} | | | error: {r['error'][:80]} | | |")
        elif "angle_deg_median" in r:
            print(f"| {r['case']} | {r['backend']} | {r['features']} | {r['n']} | gradient angle error median "
                  f"{r['angle_deg_median']:.3f} deg, p99 {r['angle_deg_p99']:.3f} deg, abs(grad) error median "
                  f"{r['grad_norm_err_median']:.2e} | | |")
        else:
            print(f"| {r['case']} | {r['backend']} | {r['features']} | {r['n']} | {r['per_second'] / 1e6:.2f} | "
                  f"{r['ms']:.1f} | {r['peak_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
