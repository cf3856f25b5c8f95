"""Quality against training time: one run, scored at its checkpoints.

Trains a preset once on a synthetic scene with exact ground truth (spot, or a generated shape of
robustness_scenes.py), with a checkpoint every ``--every`` steps. Each checkpoint is hard-linked
aside as it appears (the stage keeps only the last two), and afterwards every one is loaded the
way a resume loads it, meshed and scored: surface Chamfer-L1 / F-score against the GT mesh and
held-out PSNR, against the training seconds the checkpoint records. The points are snapshots of
one schedule (learning rate not yet decayed, levels not yet all active), not shorter runs.

    PYTHONPATH=. python benchmarks/train_curve.py --preset quality --views 100 --width 800 --height 600 \\
        --every 5000 --mc-res 512 --out curve.json
    PYTHONPATH=. python benchmarks/train_curve.py --preset fast_cpu --views 16 --width 96 --height 72 \\
        --iterations 300 --every 100 --mc-res 96                      # CPU smoke size

Prints a markdown table last; JSON to --out.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from bench_paths import ROOT  # noqa: E402,F401
from train_quality import from_synthetic_scene, gt_mesh, scene_parser, score, train_config


def link_checkpoints(ckpt_dir: Path, keep_dir: Path, done: threading.Event, poll: float = 0.5) -> None:
    """Hard-link every checkpoint that appears in ``ckpt_dir`` into ``keep_dir`` until ``done``."""
    from stages.train.checkpoint import list_checkpoints

    keep_dir.mkdir(parents=True, exist_ok=True)
    while True:
        finished = done.is_set()
        for _, path in list_checkpoints(ckpt_dir):
            target = keep_dir / path.name
            if not target.exists():
                try:
                    os.link(path, target)
                except FileNotFoundError:  # rotated away between the listing and the link
                    pass
        if finished:
            return
        time.sleep(poll)


def score_snapshots(inputs: dict, cfg, keep_dir: Path, device: str, gt_points, diag: float, mesh_gt, args) -> list:
    """Load each kept checkpoint into one eager Run, as a resume would, and score it."""
    import torch

    from stages.train import loop, stage
    from stages.train.checkpoint import list_checkpoints
    from stages.train.data import load_scene, split_views
    from stages.train.state import restore

    log = logging.getLogger("curve")
    cfg = dataclasses.replace(cfg, compile="off", cuda_graphs="off")
    scene = load_scene(inputs, log)
    train_views, held = split_views(len(scene.names), cfg.holdout_every)
    run = loop.setup(scene, train_views, cfg, stage.resolve_device(device), log)
    rows = []
    for step, path in list_checkpoints(keep_dir):
        if step == 0:
            continue
        restore(run, path)
        loop.apply_schedules(run, step - 1)  # the schedule of the last step taken, as model.pt has it
        snap = keep_dir / f"model_{step:08d}"
        snap.mkdir(exist_ok=True)
        stage.save_model(run, scene, snap, "")
        t = time.perf_counter()
        holdout = stage.evaluate_holdout(run, scene, held, cfg)
        quality = score(snap, gt_points, diag, args.mc_res, device, args.tau, 0.0, mesh_gt)
        rows.append({"step": step, "train_seconds": run.progress.elapsed, "holdout_psnr": holdout["holdout_psnr"],
                     "quality": quality, "score_seconds": time.perf_counter() - t})
        print(f"step {step}: {run.progress.elapsed:.0f} s, surface Chamfer "
              f"{quality['raw'].get('surface_chamfer_pct', float('nan')):.3f} %, held-out PSNR "
              f"{holdout['holdout_psnr']:.2f}", file=sys.stderr)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = scene_parser(__doc__, "quality", 100, 800, 600)
    ap.add_argument("--shape", default=None, help="a generated scene of robustness_scenes.py instead of spot")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/train_curve"))
    ap.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    ap.add_argument("--every", type=int, required=True, help="a checkpoint (a point of the curve) every N steps")
    ap.add_argument("--set", action="append", default=[], help="train overrides, e.g. --set train.lr=2e-3")
    ap.add_argument("--mc-res", type=int, default=512)
    ap.add_argument("--tau", type=float, default=0.005, help="F-score threshold as a share of the bbox diagonal")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--name", default=None, help="run folder name under --workdir")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import numpy as np
    import torch

    from pipeline.dag import Context
    from stages import train

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = args.name or f"curve_{args.shape or 'spot'}_{args.preset}"
    inputs, gt_points, gt_dir = from_synthetic_scene(args, args.workdir / f"inputs_{name}")
    cfg = dataclasses.replace(train_config(args.preset, args.set, [], args.iterations), checkpoint_every=args.every)
    run_dir, keep_dir = args.workdir / name, args.workdir / f"{name}_snapshots"
    for d in (run_dir, keep_dir):
        shutil.rmtree(d, ignore_errors=True)
    run_dir.mkdir(parents=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ctx = Context(scene=name, device=device, progress=False, log=logging.getLogger("curve"))
    done = threading.Event()
    watcher = threading.Thread(target=link_checkpoints, args=(run_dir / "checkpoints", keep_dir, done), daemon=True)
    watcher.start()
    try:
        summary = train.run(inputs, cfg, run_dir, ctx)
    finally:
        done.set()
        watcher.join()
    diag = float(np.linalg.norm(gt_points.max(0) - gt_points.min(0)))
    rows = score_snapshots(inputs, cfg, keep_dir, device, gt_points, diag, gt_mesh(gt_dir), args)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "device": device,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "summary": summary,
              "points": rows, "config": dataclasses.asdict(cfg)}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(f"\ntrain curve: {args.shape or 'spot'} {args.views} views {args.width}x{args.height}, preset "
          f"{args.preset}, {cfg.iterations} steps, device {result['gpu'] or device}, marching cubes {args.mc_res}^3\n")
    print("| step | train s | surface Chamfer-L1 % | surface F@0.5 % | held-out PSNR |")
    print("|---|---|---|---|---|")
    for r in rows:
        raw = r["quality"]["raw"]
        print(f"| {r['step']} | {r['train_seconds']:.0f} | {raw.get('surface_chamfer_pct', float('nan')):.3f} | "
              f"{raw.get('surface_fscore', float('nan')):.3f} | {r['holdout_psnr']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
