"""GPU check of the triton hash grid: correctness against ``encode_torch``, forward+backward
points/s of torch eager, ``torch.compile(encode_torch)`` and triton side by side, peak memory,
and how close triton comes to a bandwidth floor (bytes per point over measured copy bandwidth).

    python benchmarks/hashgrid_triton_check.py --out hashgrid_triton.json           # H100, < 3 min
    TRITON_INTERPRET=1 python benchmarks/hashgrid_triton_check.py --device cpu --tiny  # smoke test

Points are uniform in [0, 1]^3 (the cache-hostile case), ``rays`` (runs of 64 samples along
random rays) and points with their 4 tetrahedral taps, tap-major or point by point (training's
layout: ``taps_interleaved``). Each triton row's "x compile" is against torch.compile timed on the
same points. The bandwidth floor assumes every corner a cache miss (uniform points): the
cache-friendly patterns can beat it. Prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

from bench_paths import ROOT  # noqa: E402,F401

import torch  # noqa: E402

from stages.train.hashgrid import GridSpec, HashGrid, encode_torch  # noqa: E402

POINT_KINDS = ("uniform", "rays", "taps_blocked", "taps_interleaved")
# the torch.compile row each triton row is compared with: the one timed on the same points
COMPILE_ROW = {k: "torch.compile" + ("" if k == "uniform" else " " + k.replace("_", " ")) for k in POINT_KINDS}
SWEEP = [(64, 2), (128, 4), (256, 4), (256, 8), (512, 8), (512, 16)]  # (BLOCK, num_warps)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int, warmup: int = 2) -> float:
    """Mean seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def peak_bytes(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def copy_bandwidth(device, tiny: bool) -> float:
    """Device copy bandwidth in bytes/s (read + write) of a large tensor copy."""
    n = 1 << (20 if tiny else 28)
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    t = timed(lambda: dst.copy_(src), device, 3 if tiny else 20)
    return 2 * n * 4 / t


def floor_bytes(spec: GridSpec, n: int) -> dict:
    """Bytes that must move per point: useful bytes, and with 32-byte sectors per corner gather."""
    lv, f = spec.levels, spec.features
    io = 12 + lv * f * 4  # x in, features out (forward); x and grad_out in (backward)
    zero = spec.num_entries * f * 4 / n  # zero-filling the table gradient, per point
    out = {}
    for name, corner in (("useful", f * 4), ("sector", max(f * 4, 32))):
        fwd = io + lv * 8 * corner
        bwd = io + 2 * lv * 8 * corner + zero  # atomics read and write
        out[name] = {"forward": fwd, "backward": bwd, "total": fwd + bwd}
    return out


TETRA = ((1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, 1.0, 1.0))


def make_points(n: int, kind: str, device, spec: GridSpec | None = None, seed: int = 0) -> torch.Tensor:
    """``uniform`` in [0, 1]^3; ``rays``: runs of 64 samples along random rays (training's access
    pattern); ``taps_blocked`` / ``taps_interleaved``: n/5 points and their 4 tetrahedral taps at a
    quarter of the finest cell, stacked tap by tap ([5, n/5]) or point by point ([n/5, 5])."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "uniform":
        return torch.rand(n, 3, generator=g).to(device)
    if kind == "rays":
        rays, steps = max(n // 64, 1), 64
        o = torch.rand(rays, 1, 3, generator=g)
        d = torch.nn.functional.normalize(torch.randn(rays, 1, 3, generator=g), dim=-1)
        t = torch.linspace(0.0, 0.5, steps)[None, :, None]
        return (o + t * d).clamp(0.0, 1.0).reshape(-1, 3)[:n].to(device)
    base = torch.rand(n // 5, 3, generator=g) * 0.99 + 0.005
    offs = torch.tensor(TETRA) * (0.25 / float(spec.scales()[-1]))
    pts = torch.cat([base[None], base[None] + offs[:, None]], 0)  # [5, n/5, 3]
    if kind == "taps_interleaved":
        pts = pts.transpose(0, 1)
    return pts.reshape(-1, 3).contiguous().to(device)


def step_fn(enc, grid: HashGrid, x: torch.Tensor, gout: torch.Tensor, need_x: bool):
    bufs, spec = grid._buffers_dict(), grid.spec
    xr = x.detach().clone().requires_grad_(need_x)

    def step():
        grid.table.grad = None
        xr.grad = None
        enc(xr, grid.table, spec, bufs).backward(gout)
    return step


def check_correctness(ht, grid: HashGrid, x: torch.Tensor, m: int) -> dict:
    """Max abs errors (and reference magnitudes) of outputs, table and x gradients on m points."""
    spec, bufs = grid.spec, grid._buffers_dict()
    x = x[:m]
    gout = torch.randn(m, spec.out_dim, device=x.device)
    res = []
    for enc in (ht.encode_triton, encode_torch):
        xr = x.clone().requires_grad_(True)
        y = enc(xr, grid.table, spec, bufs)
        gx, gt = torch.autograd.grad(y, (xr, grid.table), gout)
        res.append((y.detach(), gt, gx))
    out = {"points": m}
    for i, name in enumerate(("out", "table_grad", "x_grad")):
        got, want = res[0][i], res[1][i]
        out[f"{name}_max_abs_err"] = float((got - want).abs().max())
        out[f"{name}_max_abs_ref"] = float(want.abs().max())
    return out


def sweep(ht, kind: str, fn, device, iters: int) -> dict:
    """Time ``fn`` for each (BLOCK, num_warps) in SWEEP, keep the fastest in ``ht.TUNING``."""
    times = {}
    for cfg in SWEEP:
        ht.TUNING[kind] = cfg
        try:
            times[f"{cfg[0]}x{cfg[1]}"] = timed(fn, device, iters)
        except Exception as exc:  # a config that does not compile or run
            times[f"{cfg[0]}x{cfg[1]}"] = f"{type(exc).__name__}: {exc}"
    ok = {k: v for k, v in times.items() if isinstance(v, float)}
    best = min(ok, key=ok.get)
    ht.TUNING[kind] = tuple(int(v) for v in best.split("x"))
    return {"best": best, "seconds": times}


def run_backend(name: str, fn, fwd, device, n: int, iters: int) -> dict:
    row = {"backend": name}
    try:
        t = timed(fn, device, iters)
        row.update(seconds=t, points_per_s=n / t, peak_bytes=peak_bytes(fn, device))
        if fwd is not None:
            with torch.no_grad():
                row["forward_points_per_s"] = n / timed(fwd, device, iters)
    except Exception as exc:  # record and go on: one backend failing must not hide the others
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        row["traceback"] = traceback.format_exc(limit=3)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_config(spec: GridSpec, args, device, ht) -> dict:
    torch.manual_seed(0)
    grid = HashGrid(spec).to(device)
    with torch.no_grad():
        grid.table.uniform_(-1.0, 1.0)
    n, iters = args.points, args.iters
    x = make_points(n, "uniform", device)
    gout = torch.randn(n, spec.out_dim, device=device)
    bufs = grid._buffers_dict()
    res = {"spec": spec.__dict__ | {"num_entries": spec.num_entries, "hashed_levels": int(spec.hashed().sum())},
           "points": n, "rows": []}
    if ht is not None:
        try:
            res["correctness"] = check_correctness(ht, grid, x, min(n, args.check_points))
        except Exception as exc:
            res["correctness"] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    eager_fwd = lambda: encode_torch(x, grid.table, spec, bufs)  # noqa: E731
    res["rows"].append(run_backend("torch eager", step_fn(encode_torch, grid, x, gout, False), eager_fwd,
                                   device, n, max(2, iters // 4)))
    if args.compile and device.type == "cuda":  # on each point pattern the triton rows are timed on
        for kind in POINT_KINDS:
            start = time.perf_counter()
            xk = x if kind == "uniform" else make_points(n, kind, device, spec)
            comp = torch.compile(encode_torch, dynamic=False)
            row = run_backend(COMPILE_ROW[kind], step_fn(comp, grid, xk, gout[:xk.shape[0]], False),
                              lambda p=xk: comp(p, grid.table, spec, bufs), device, xk.shape[0], iters)
            row["compile_and_bench_s"] = round(time.perf_counter() - start, 1)
            res["rows"].append(row)
            del comp
            torch._dynamo.reset()
    if ht is None:
        res["rows"].append({"backend": "triton", "error": args.triton_error})
        return res
    if args.sweep:
        xs = x if args.sweep_points == "uniform" else make_points(n, args.sweep_points, device, spec)
        gs = gout[:xs.shape[0]]
        fwd_only = lambda: ht.encode_triton(xs, grid.table, spec)  # noqa: E731
        scales, meta = ht.level_tables(spec, None, device)
        bwd_only = lambda: ht.hashgrid_bwd(gs, xs, grid.table, scales, meta, x.new_empty(0), True, False)  # noqa: E731
        with torch.no_grad():
            res["sweep"] = {"fwd": sweep(ht, "fwd", fwd_only, device, iters),
                            "bwd": sweep(ht, "bwd", bwd_only, device, iters)}
    res["tuning"] = {k: list(v) for k, v in ht.TUNING.items()}
    for name, kind, need_x in (("triton", "uniform", False), ("triton +dx", "uniform", True),
                               ("triton level-major", "uniform", False), ("triton rays", "rays", False),
                               ("triton taps blocked", "taps_blocked", False),
                               ("triton taps interleaved", "taps_interleaved", False)):
        xk = x if kind == "uniform" else make_points(n, kind, device, spec)
        fwd = None if need_x else (lambda p=xk: ht.encode_triton(p, grid.table, spec))
        ht.LEVEL_FAST = name != "triton level-major"
        row = run_backend(name, step_fn(ht.encode_triton, grid, xk, gout[:xk.shape[0]], need_x), fwd,
                          device, xk.shape[0], iters)
        row["points_kind"] = kind
        res["rows"].append(row)
    ht.LEVEL_FAST = True
    return res


def summarise(res: dict, bandwidth: float) -> None:
    """Speed-ups over torch.compile and fractions of the bandwidth floor, per row."""
    floor = floor_bytes(GridSpec(**{k: res["spec"][k] for k in GridSpec.__dataclass_fields__}), res["points"])
    res["floor_bytes_per_point"] = floor
    res["floor_points_per_s"] = {k: bandwidth / v["total"] for k, v in floor.items()}
    refs = {r["backend"]: r.get("points_per_s") for r in res["rows"]}
    for r in res["rows"]:
        if "points_per_s" in r:
            ref = refs.get(COMPILE_ROW.get(r.get("points_kind"), "torch.compile"))
            r["vs_compile"] = r["points_per_s"] / ref if ref else None
            r["of_floor"] = {k: r["points_per_s"] / v for k, v in res["floor_points_per_s"].items()}


def markdown(results: list[dict]) -> str:
    lines = ["| F | backend | fwd+bwd Mpts/s | fwd Mpts/s | peak GiB | x compile | % floor (useful/sector) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            f = res["spec"]["features"]
            if "error" in r:
                lines.append(f"| {f} | {r['backend']} | - | - | - | - | - | {r['error'][:80]} |")
                continue
            fwd, peak, vs = r.get("forward_points_per_s"), r.get("peak_bytes"), r.get("vs_compile")
            fl = r["of_floor"]
            fwd = f"{fwd / 1e6:.1f}" if fwd else "-"
            peak = f"{peak / 2**30:.2f}" if peak is not None else "-"
            lines.append(f"| {f} | {r['backend']} | {r['points_per_s'] / 1e6:.1f} | {fwd} | {peak} | "
                         f"{f'{vs:.2f}' if vs else '-'} | {100 * fl['useful']:.0f}% / {100 * fl['sector']:.0f}% | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small sizes (CPU smoke test under TRITON_INTERPRET=1)")
    parser.add_argument("--features", default="8,2", help="features per level to test, comma-separated")
    parser.add_argument("--log2-points", type=int, default=20)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--check-points", type=int, default=1 << 16, help="points in the correctness check")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the BLOCK/num_warps sweep")
    parser.add_argument("--sweep-points", default="uniform", choices=["uniform", "rays", "taps_interleaved"],
                        help="the points the sweep picks BLOCK/num_warps on (training's are taps_interleaved)")
    parser.add_argument("--out", type=Path, default=Path("hashgrid_triton.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        args.log2_points, args.iters, args.check_points = 8, 1, 256
        global SWEEP
        SWEEP = SWEEP[:2]
    args.points = 1 << args.log2_points
    try:
        from stages.train import hashgrid_triton as ht
    except Exception as exc:
        ht, args.triton_error = None, f"{type(exc).__name__}: {exc}"
    start = time.perf_counter()
    bandwidth = copy_bandwidth(device, args.tiny)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "triton": getattr(sys.modules.get("triton"), "__version__", None),
           "copy_bandwidth_GBps": bandwidth / 1e9}
    results = []
    for f in (int(v) for v in args.features.split(",")):
        spec = (GridSpec(levels=4, features=f, log2_table=10, base_res=4, max_res=32) if args.tiny else
                GridSpec(levels=16, features=f, log2_table=22, base_res=32, max_res=2048))
        res = run_config(spec, args, device, ht)
        summarise(res, bandwidth)
        results.append(res)
        print(json.dumps({k: res[k] for k in ("correctness", "tuning") if k in res}), flush=True)
        env["wall_s"] = round(time.perf_counter() - start, 1)
        args.out.write_text(json.dumps({"env": env, "results": results}, indent=2, default=str))  # after each size
    print(json.dumps(env))
    print(markdown(results))


if __name__ == "__main__":
    main()
