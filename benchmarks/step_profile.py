"""Where a training step's GPU time goes: ms/step in steady state and the top kernels, per variant.

Trains the spot scene (as benchmarks/train_quality.py renders it, GT cameras and masks) with the
real loop (``stages.train.loop``) for ``--warmup`` steps (past the occupancy warm-up, so samples
follow the surface), times ``--steps`` more, then profiles ``--profile`` steps with
``torch.profiler``. Variants differ by train overrides (``--variant name:key=value,...``;
``cuda_graphs=on|off`` with or without CUDA graphs) or by these keys, each the old or a slower path:
- ``layout=tap``: numerical-gradient taps tap-major instead of point-major;
- ``sync=1``: wait for every step's metrics before launching the next (the loop reads them one step late);
- ``step=0``: compile only the networks (by default rendering and losses are compiled whole);
- ``fused=0``: the multi-kernel AdamW;
- ``skip=0``: the triton grid computes the levels coarse-to-fine masks off, then multiplies;
- ``merge=0``: the triton backward issues one atomic per row, not one per run of rows in one cell;
- ``centres=0``: the SDF network computes the feature at every finite-difference tap;
- ``sdf_column=gemm``: the SDF column as a GEMM instead of a fused reduction;
- ``fwd=BLOCKxWARPS``, ``bwd=BLOCKxWARPS``: the triton grid kernels' tile (default: ``TUNING``).

Each variant runs in its own process (the first variant of a process ran faster than the later ones). Besides ms/step it
reports the GPU's busy time per step (sum of kernel times): the gap is host overhead.

    PYTHONPATH=. python benchmarks/step_profile.py --variant base: --variant taps_tap_major:layout=tap \\
        --out profile.json
    PYTHONPATH=. python benchmarks/step_profile.py --preset fast_cpu --views 8 --width 64 --height 48 \\
        --warmup 3 --steps 3 --profile 2 --device cpu          # a CPU smoke run

Prints a markdown table last; JSON to --out.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_paths import ROOT  # noqa: E402,F401


def parse_variant(text: str) -> tuple[str, dict, list[str]]:
    """``name:key=value,key=value`` -> (name, special keys, train overrides as --set items)."""
    name, _, rest = text.partition(":")
    special, sets = {}, []
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key in ("layout", "sync", "step", "fused", "skip", "centres", "sdf_column", "merge", "fwd", "bwd"):
            special[key] = value
        else:
            sets.append(f"train.{key}={value}")
    return name or "base", special, sets


def strip_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the options ``names`` (``--name value`` and ``--name=value`` forms)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not a.startswith(tuple(n + "=" for n in names)):
            out.append(a)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernels(prof, device: torch.device) -> list:
    """Kernel-level events (CPU ops on CPU): an op's device time is also its kernels', so only
    the kernels add up to the busy time."""
    events = prof.key_averages()
    if device.type != "cuda":
        return [(e.key, e.self_cpu_time_total, e.count) for e in events]
    cuda = torch.autograd.DeviceType.CUDA
    return [(e.key, e.self_device_time_total, e.count) for e in events if e.device_type == cuda]


def top_kernels(events: list, rows: int) -> list[dict]:
    total = sum(t for _, t, _ in events) or 1.0
    ranked = sorted(events, key=lambda e: e[1], reverse=True)[:rows]
    return [{"name": k[:90], "ms": t / 1000.0, "share": t / total, "calls": c} for k, t, c in ranked]


def run_steps(run, start: int, count: int, pipelined: bool) -> None:
    """Steps as ``loop.train`` takes them (each step's metrics read after the next is launched),
    or each one waited for."""
    from stages.train import loop

    pending = None
    for step in range(start, start + count):
        launched = loop.launch_step(run, step)
        if not pipelined:
            loop.resolve(launched)
        elif pending is not None:
            loop.resolve(pending)
        pending = launched
    if pending is not None:
        loop.resolve(pending)


def host_profile(run, start: int, steps: int, pipelined: bool, device) -> str:
    """Where the host's time goes over ``steps`` steps: cProfile's top functions by own time, then
    by cumulative time (cProfile slows Python calls down: compare shares, not totals)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run_steps(run, start, steps, pipelined)
    sync(device)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    return out.getvalue()


def run_variant(inputs: dict, preset: str, name: str, special: dict, sets: list[str], args, device) -> dict:
    from stages.train import fields, gradients, loop
    from stages.train.data import load_scene, split_views
    from stages.train.stage import seed_everything
    from train_quality import train_config

    cfg = train_config(preset, args.set + sets, [], args.warmup + args.steps + args.profile + 1)
    gradients.INTERLEAVE = special.get("layout", "point") == "point"
    loop.COMPILE_STEP = special.get("step", "1") == "1"
    loop.FUSED_ADAMW = special.get("fused", "1") == "1"
    gradients.FEATURE_AT_CENTRES = special.get("centres", "1") == "1"
    fields.REDUCE_SDF_COLUMN = special.get("sdf_column", "reduce") == "reduce"
    if {"skip", "merge", "fwd", "bwd"} & special.keys():  # triton grid: masked-off levels computed,
        from stages.train import hashgrid_triton           # then multiplied; one atomic per row; tiles
        hashgrid_triton.LEVEL_SKIP = special.get("skip", "1") == "1"
        hashgrid_triton.MERGE_RUNS = special.get("merge", "1") == "1"
        for kind in ("fwd", "bwd"):
            if kind in special:
                hashgrid_triton.TUNING[kind] = tuple(int(v) for v in special[kind].split("x"))
    log = logging.getLogger("profile")
    seed_everything(cfg.seed)
    scene = load_scene(inputs, log)
    train_views, _ = split_views(len(scene.names), cfg.holdout_every)
    run = loop.setup(scene, train_views, cfg, device, log)
    pipelined = special.get("sync", "0") != "1"
    t = time.perf_counter()
    run_steps(run, 0, args.warmup, pipelined)
    sync(device)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    run_steps(run, args.warmup, args.steps, pipelined)
    sync(device)
    step_ms = 1000 * (time.perf_counter() - t) / max(1, args.steps)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        run_steps(run, args.warmup + args.steps, args.profile, pipelined)
        sync(device)
    events = kernels(prof, device)
    samples = cfg.batch_rays * cfg.samples_per_ray
    host = host_profile(run, args.warmup + args.steps + args.profile, args.host_profile, pipelined, device) \
        if args.host_profile else None
    return {"variant": name, "host_profile": host, "overrides": sets, **special, "backend": run.backend, "compiled": run.compiled,
            "step_compiled": run.loss_fn is not None,
            "warmup_seconds": warm_s, "ms_per_step": step_ms, "samples_per_second": samples / step_ms * 1000,
            "busy_ms_per_step": sum(t for _, t, _ in events) / 1000.0 / max(1, args.profile),
            "kernels_per_step": sum(c for _, _, c in events) / max(1, args.profile),
            "active_levels": int(run.model.sdf.level_mask.sum().item()) // run.model.sdf.grid.spec.features,
            "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
            "top": top_kernels(events, args.rows)}


def main(argv=None) -> int:
    from train_quality import scene_parser

    ap = scene_parser(__doc__, "default", 100, 800, 600)
    ap.add_argument("--warmup", type=int, default=700, help="untimed steps first (compile, occupancy warm-up)")
    ap.add_argument("--steps", type=int, default=200, help="timed steps")
    ap.add_argument("--profile", type=int, default=10, help="profiled steps")
    ap.add_argument("--rows", type=int, default=15, help="kernels listed per variant")
    ap.add_argument("--host-profile", type=int, default=0,
                    help="steps run under cProfile after the profiled ones (host time per function; 0 = none)")
    ap.add_argument("--variant", action="append", default=[], help="name:key=value,... (train keys, or layout=point|tap)")
    ap.add_argument("--set", action="append", default=[], help="train overrides for every variant")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/train_speed"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from train_inputs import from_synthetic
    from train_quality import generate_scene

    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    gt_dir = generate_scene(args.workdir, args.views, args.width, args.height, 0)
    inputs_root = args.workdir / f"profile_inputs_{args.views}v_{args.width}x{args.height}"
    shutil.rmtree(inputs_root, ignore_errors=True)
    inputs, _ = from_synthetic(gt_dir, inputs_root)
    rows = []
    variants = args.variant or ["base:"]
    if len(variants) == 1:
        rows.append(run_variant(inputs, args.preset, *parse_variant(variants[0]), args, device))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("top", "host_profile")}), file=sys.stderr)
    else:
        common = strip_options(sys.argv[1:] if argv is None else argv, ("--variant", "--out"))
        for i, text in enumerate(variants):
            one = args.workdir / f"profile_variant_{i}.json"
            subprocess.run([sys.executable, __file__, *common, f"--variant={text}", f"--out={one}"], check=True)
            rows += json.loads(one.read_text())["rows"]
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(info, indent=1))
    for r in rows:
        if r.get("host_profile"):
            print(f"\n### {r['variant']}: host time over {args.host_profile} steps (cProfile)\n\n{r['host_profile']}")
        print(f"\n### {r['variant']} ({r['backend']}): top kernels over {args.profile} steps\n")
        print("| kernel | ms | share | calls |\n|---|---|---|---|")
        for k in r["top"]:
            print(f"| {k['name']} | {k['ms']:.2f} | {100 * k['share']:.1f}% | {k['calls']} |")
    print(f"\nsteady-state steps on {info['device']}, preset {args.preset}, {args.views} views "
          f"{args.width}x{args.height}\n")
    print("| variant | backend | ms/step | GPU busy ms/step | kernels/step | M samples/s | active levels | peak GB |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "-"
        print(f"| {r['variant']} | {r['backend']} | {r['ms_per_step']:.2f} | {r['busy_ms_per_step']:.2f} | "
              f"{r['kernels_per_step']:.0f} | {r['samples_per_second'] / 1e6:.2f} | {r['active_levels']} | {peak} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
