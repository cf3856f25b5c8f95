"""Several GPUs for one scene, and one scene per GPU, on the synthetic spot scene (2 GPUs).

(a) DDP: the same training on 1 GPU and on 2 GPUs (``train.gpus=2``, torchrun, the batch split
    over the ranks): steady-state ms/step and samples/s (from the TensorBoard wall times, past
    the compile and the occupancy warm-up), Chamfer-L1 and F-score of the marching-cubes mesh,
    held-out PSNR, and whether the ranks' parameters stayed equal.
(b) Meshing split over 2 GPUs (``mesh.gpus=2``) vs 1: seconds, and whether the meshes are equal.
(c) Two trainings at once, one per GPU (CUDA_VISIBLE_DEVICES=0 and 1) vs one alone: the ratio
    of their wall times (1.0 = two scenes in the time of one).

Every run is its own subprocess of this script, so this process never touches CUDA.

    PYTHONPATH=. python benchmarks/multi_gpu.py --iterations 2000 --out multi_gpu.json
    ... --device cpu --views 12 --width 96 --height 72 --iterations 40 --preset fast_cpu   # CPU smoke run

Prints a markdown table last; JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_paths import ROOT  # noqa: E402,F401


def child(args, *extra: str, cuda: str | None = None) -> tuple:
    """Start this script in a subprocess (``--child ...``); ``finish`` waits for it."""
    out = Path(args.workdir) / f"child_{time.monotonic_ns()}.json"
    cmd = [sys.executable, __file__, *extra, "--child-out", str(out), "--workdir", str(args.workdir),
           "--device", args.device, "--mc-res", str(args.mc_res)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    if cuda is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    return proc, out, t


def finish(job) -> tuple[dict, float]:
    """The child's JSON and its wall time (process start to end)."""
    proc, out, t = job
    rc = proc.wait()
    wall = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"child run failed with exit code {rc}: {proc.args}")
    return json.loads(out.read_text()), wall


def steady_ms_per_step(tb_dir: Path, skip: float) -> float | None:
    """ms/step between the first logged step past ``skip`` x the iterations and the last one,
    from the wall times TensorBoard stored with the ``train/loss`` scalar."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train/loss")
    last = events[-1]
    first = next(e for e in events if e.step >= skip * last.step)
    if last.step == first.step:
        return None
    return 1000.0 * (last.wall_time - first.wall_time) / (last.step - first.step)


def run_train(args) -> dict:
    """Child: train ``--run-dir`` with ``--gpus`` GPUs; optionally score the mesh."""
    import numpy as np

    from pipeline.dag import Context
    from stages import train
    from train_inputs import from_synthetic
    from train_quality import generate_scene, score, train_config

    gt_dir = generate_scene(Path(args.workdir), args.views, args.width, args.height, 0)
    shutil.rmtree(args.run_dir, ignore_errors=True)  # a fresh run, never a resume of an older one
    inputs, gt_points = from_synthetic(gt_dir, Path(args.run_dir) / "inputs")
    cfg = train_config(args.preset, [*args.set, f"train.gpus={args.gpus}", f"train.seed={args.seed}"], [],
                       args.iterations)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ctx = Context(scene="spot", device=args.device, progress=False, log=logging.getLogger("pipeline"))
    run_dir = Path(args.run_dir) / "train"
    t = time.perf_counter()
    train.run(inputs, cfg, run_dir, ctx)
    wall = time.perf_counter() - t
    info = json.loads((run_dir / "train.json").read_text())
    ms = steady_ms_per_step(run_dir / "tb", 0.25)
    result = {"gpus": args.gpus, "train_wall_seconds": wall, "loop_seconds": info["wall_seconds"],
              "iterations": info["iterations"], "steady_ms_per_step": ms,
              "steady_samples_per_second": None if not ms else cfg.batch_rays * cfg.samples_per_ray / (ms / 1000),
              "holdout_psnr": info["holdout_psnr"], "train_psnr": info["train_psnr"], "ddp": info.get("ddp"),
              "peak_gpu_memory_gb": info["peak_gpu_memory_gb"], "model_dir": str(run_dir),
              "sfm_points": str(inputs["sfm_points"])}
    if args.score:
        diag = float(np.linalg.norm(gt_points.max(0) - gt_points.min(0)))
        result["quality"] = score(run_dir, gt_points, diag, args.mc_res, args.device, 0.005)
    return result


def run_mesh(args) -> dict:
    """Child: the mesh stage on ``--run-dir``'s model with ``mesh.gpus`` = ``--gpus``."""
    import hashlib

    from pipeline.config import MeshConfig
    from pipeline.dag import Context
    from stages import mesh

    out = Path(args.workdir) / f"mesh_{args.gpus}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = MeshConfig(resolution=args.mc_res, block_res=max(8, min(128, args.mc_res // 4)), gpus=args.gpus,
                     vertex_colors=False)
    ctx = Context(scene="spot", device=args.device, progress=False, log=logging.getLogger("pipeline"))
    t = time.perf_counter()
    summary = mesh.run({"train": Path(args.run_dir), "sfm_points": Path(args.sfm_points)}, cfg, out, ctx)
    return {"gpus": args.gpus, "seconds": time.perf_counter() - t, "faces": summary["faces"],
            "vertices": summary["vertices"], "blocks_evaluated": summary["blocks_evaluated"],
            "sha256": hashlib.sha256((out / "mesh_raw.ply").read_bytes()).hexdigest()}


def orchestrate(args) -> dict:
    """The three comparisons, each child on its cards; the JSON is rewritten after each run, so
    a run stopped by a time limit still leaves what it measured."""
    from train_quality import generate_scene

    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    generate_scene(wd, args.views, args.width, args.height, 0)
    res = {"args": {k: str(v) for k, v in vars(args).items()}, "render_seconds": time.perf_counter() - t}
    common = ["--views", str(args.views), "--width", str(args.width), "--height", str(args.height),
              "--preset", args.preset, "--iterations", str(args.iterations), *sum((["--set", s] for s in args.set), [])]
    both = None if args.device == "cpu" else "0,1"
    for name, gpus, cuda in (("one_gpu", 1, "0" if both else None), ("two_gpus", 2, both)):
        job = child(args, "--child", "train", *common, "--gpus", str(gpus), "--score",
                    "--run-dir", str(wd / name), cuda=cuda)
        res[name], res[name]["process_seconds"] = finish(job)
        print(f"{name}: {json.dumps(res[name])}", file=sys.stderr, flush=True)
        save(args, res)
    for gpus in (1, 2):
        job = child(args, "--child", "mesh", "--gpus", str(gpus), "--run-dir", res["two_gpus"]["model_dir"],
                    "--sfm-points", res["two_gpus"]["sfm_points"], cuda=both)
        res[f"mesh_{gpus}"], _ = finish(job)
        save(args, res)
    alone = finish(child(args, "--child", "train", *common, "--gpus", "1", "--seed", "1",
                         "--run-dir", str(wd / "alone"), cuda="0" if both else None))
    jobs = [child(args, "--child", "train", *common, "--gpus", "1", "--seed", str(2 + k),
                  "--run-dir", str(wd / f"parallel_{k}"), cuda=str(k) if both else None) for k in range(2)]
    pair = [finish(j) for j in jobs]
    res["alone"] = {**alone[0], "process_seconds": alone[1]}
    res["parallel"] = [{**r, "process_seconds": w} for r, w in pair]
    res["parallel_ratio"] = max(w for _, w in pair) / alone[1]
    steady = [r["steady_ms_per_step"] for r, _ in pair]
    res["parallel_ratio_steady"] = None if None in steady else _ratio(max(steady), alone[0]["steady_ms_per_step"])
    return res


def save(args, res: dict) -> None:
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))


def _ratio(a, b):
    return None if not a or not b else a / b


def print_table(r: dict) -> None:
    one, two = r["one_gpu"], r["two_gpus"]
    print(f"\nmulti-GPU: spot {r['args']['views']} views {r['args']['width']}x{r['args']['height']}, preset "
          f"{r['args']['preset']}, {r['args']['iterations']} steps, device {r['args']['device']}\n")
    print("| run | ms/step (steady) | samples/s | train s | Chamfer-L1 (% diag) | F@0.5% | PSNR held-out | "
          "ranks' max param diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, x in (("1 GPU", one), ("2 GPUs DDP", two)):
        q = x["quality"]["largest"]
        ms, sps = x["steady_ms_per_step"], x["steady_samples_per_second"]
        diff = "-" if not x.get("ddp") else f"{x['ddp']['max_param_diff_across_ranks']:.1e}"
        print(f"| {name} | {ms or float('nan'):.2f} | {sps or float('nan'):.3g} | {x['loop_seconds']:.0f} | "
              f"{q['chamfer_pct']:.3f} | {q['fscore']:.3f} | {x['holdout_psnr'] or float('nan'):.2f} | {diff} |")
    speed = _ratio(one["steady_ms_per_step"], two["steady_ms_per_step"])
    print(f"\nDDP speed-up per step: {speed or float('nan'):.2f}x; whole training loop "
          f"{one['loop_seconds'] / two['loop_seconds']:.2f}x")
    m1, m2 = r["mesh_1"], r["mesh_2"]
    print(f"meshing at {r['args']['mc_res']}^3: 1 GPU {m1['seconds']:.1f} s, 2 GPUs {m2['seconds']:.1f} s, "
          f"identical: {m1['sha256'] == m2['sha256']} ({m1['faces']} faces)")
    walls = ", ".join(f"{p['process_seconds']:.0f} s" for p in r["parallel"])
    print(f"two scenes in parallel on two GPUs: {walls} vs {r['alone']['process_seconds']:.0f} s alone; "
          f"ratio {r['parallel_ratio']:.2f} (steady ms/step ratio {r['parallel_ratio_steady'] or float('nan'):.2f})")


def main(argv=None) -> int:
    from train_quality import scene_parser

    ap = scene_parser(__doc__, "default", 60, 640, 480)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--set", action="append", default=[], help="train overrides, e.g. --set train.batch_rays=16384")
    ap.add_argument("--mc-res", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/multi_gpu"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", choices=["train", "mesh"], help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--gpus", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--score", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--sfm-points", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        from train_quality import ensure_av_stub

        ensure_av_stub()
        result = run_train(args) if args.child == "train" else run_mesh(args)
        args.child_out.write_text(json.dumps(result))
        return 0
    result = orchestrate(args)
    save(args, result)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
