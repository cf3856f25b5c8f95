"""Camera refinement (train.refine_cameras) on the spot scene with perturbed cameras.

Renders spot (``train_quality.generate_scene``: GT cameras, masks, mesh; SfM points sampled on
the GT mesh, so the world frame is the GT frame), turns every camera by ``--rot-deg`` degrees
about its centre and moves it by ``--trans`` x the bounding-sphere radius (random axes and
directions, ``--noise-seed``), then trains with and without refinement; the exact cameras, with
and without refinement, are the reference (does refinement cost anything when the poses are
right?). Per run: Chamfer-L1 and F-score of the mesh (% of the GT bbox diagonal), the training
views' pose errors before and after refinement (rotation in degrees; centre distance in % of
the sphere radius; both in the GT frame, no alignment), their image misalignment (mean pixel
distance of the SfM points projected by the cameras and by the GT cameras), train seconds and
held-out PSNR (held-out views keep their input poses).

    PYTHONPATH=. python benchmarks/refine_cameras.py --preset fast_cpu --views 16 --width 96 --height 72
    PYTHONPATH=. python benchmarks/refine_cameras.py --preset default --views 100 --width 800 --height 600 \\
        --mc-res 512 --out refine_cameras.json                 # GPU
    ... --runs noisy --runs noisy_refine --set train.camera_lr=5e-4

Prints a markdown table last; JSON to --out.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

from bench_paths import ROOT  # noqa: E402,F401
from train_quality import generate_scene, gt_mesh, scene_parser, score, train_config, train_in

RUNS = {"gt": (False, False), "gt_refine": (False, True), "noisy": (True, False), "noisy_refine": (True, True)}


def perturb_inputs(inputs: dict, rot_deg: float, trans: float, seed: int) -> None:
    """Perturb the cameras the train stage reads (sfm_points/transforms.json) in place; ``trans``
    is a share of the bounding-sphere radius."""
    import numpy as np

    from pipeline.cameras import cv_from_gl, gl_from_cv
    from stages.train.cameras import perturb_c2w

    path = Path(inputs["sfm_points"]) / "transforms.json"
    data = json.loads(path.read_text())
    radius = json.loads((Path(inputs["sfm_points"]) / "scene.json").read_text())["sphere_radius"]
    c2w = np.stack([cv_from_gl(np.asarray(f["transform_matrix"], np.float64)) for f in data["frames"]])
    moved = perturb_c2w(c2w, rot_deg, trans * radius, seed)
    for frame, m in zip(data["frames"], moved):
        frame["transform_matrix"] = gl_from_cv(m).tolist()
    path.write_text(json.dumps(data, indent=1))


def misalignment_px(K, c2w, gt_c2w, points) -> float:
    """Mean pixel distance of ``points`` (world) projected by ``c2w`` and by ``gt_c2w``."""
    import numpy as np

    from pipeline.cameras import project

    return float(np.mean([np.linalg.norm(project(points, K[i], np.linalg.inv(c2w[i]))[0]
                                         - project(points, K[i], np.linalg.inv(gt_c2w[i]))[0], axis=1).mean()
                          for i in range(len(c2w))]))


def pose_report(run_dir: Path, inputs: dict, gt_inputs: dict) -> dict:
    """The training views' pose errors (GT frame) and misalignment before and after refinement."""
    import numpy as np
    import torch

    from pipeline.align import apply_similarity
    from stages.train.cameras import correct_c2w, pose_errors
    from stages.train.data import load_scene

    log = logging.getLogger("bench")
    scene, gt = load_scene(inputs, log), load_scene(gt_inputs, log)
    model = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    info = json.loads((run_dir / "train.json").read_text())
    held = {scene.names.index(n) for n in info["holdout_views"]}
    views = np.array(model["cameras"]["views"] if "cameras" in model else
                     [v for v in range(len(scene.names)) if v not in held])
    start = scene.c2w[views]
    refined = correct_c2w(model["cameras"]["delta"].double().numpy(), start) if "cameras" in model else start
    radius = float(scene.scene["sphere_radius"])
    to_world = lambda c2w: apply_similarity(c2w, radius, np.eye(3), np.asarray(scene.scene["sphere_center"]))  # noqa: E731
    points = np.load(Path(inputs["sfm_points"]) / "points.npy").astype(np.float64)
    out = {"views": int(len(views))}
    for name, c2w in (("before", start), ("after", refined)):
        err = pose_errors(c2w, gt.c2w[views])
        out[name] = {"rotation_deg_mean": err["rotation_deg_mean"], "rotation_deg_max": err["rotation_deg_max"],
                     "center_pct_radius_mean": 100 * err["center_mean"],
                     "center_pct_radius_max": 100 * err["center_max"],
                     "misalignment_px": misalignment_px(scene.K[views], to_world(c2w), to_world(gt.c2w[views]), points)}
    return out


def run_one(name: str, args, cfg, gt_dir: Path, device: str) -> dict:
    import dataclasses

    import numpy as np

    from pipeline.dag import Context
    from train_inputs import from_synthetic

    noisy, refine = RUNS[name]
    tag = f"spot_{args.views}v_{args.width}x{args.height}"
    noise = f"_r{args.rot_deg:g}_t{args.trans:g}_s{args.noise_seed}" if noisy else ""
    roots = {k: args.workdir / f"inputs_{tag}{k}" for k in ("", noise)}
    made = {}
    for suffix, root in roots.items():
        shutil.rmtree(root, ignore_errors=True)
        made[suffix] = from_synthetic(gt_dir, root)
        if suffix:
            perturb_inputs(made[suffix][0], args.rot_deg, args.trans, args.noise_seed)
    inputs, gt_points = made[noise]
    cfg = dataclasses.replace(cfg, refine_cameras=refine)
    run_dir = args.workdir / f"run_{tag}_{args.preset}_{name}{noise}"
    ctx = Context(scene=tag, device=device, progress=False, threads=args.threads, log=logging.getLogger("bench"))
    summary, wall, info = train_in(inputs, cfg, run_dir, ctx, args.fresh)
    diag = float(np.linalg.norm(gt_points.max(0) - gt_points.min(0)))
    return {"name": name, "noisy": noisy, "refine": refine, "train_seconds": info["wall_seconds"],
            "train_wall_seconds": wall, "iterations": summary["iterations"], "train_psnr": info["train_psnr"],
            "holdout_psnr": info["holdout_psnr"], "camera_refinement": {k: v for k, v in (
                info["camera_refinement"] or {}).items() if k.endswith(("_mean", "_max"))} or None,
            "poses": pose_report(run_dir, inputs, made[""][0]),
            "quality": score(run_dir, gt_points, diag, args.mc_res, device, args.tau, 0.0, gt_mesh(gt_dir))}


def main(argv=None) -> int:
    ap = scene_parser(__doc__, "fast_cpu", 24, 160, 120)
    ap.add_argument("--seed", type=int, default=0, help="scene render seed")
    ap.add_argument("--rot-deg", type=float, default=2.0, help="rotation noise per camera (degrees, about its centre)")
    ap.add_argument("--trans", type=float, default=0.02, help="centre noise per camera (share of the sphere radius)")
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--runs", action="append", choices=sorted(RUNS), default=None,
                    help="which runs (default all: gt, gt_refine, noisy, noisy_refine)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/refine_cameras"))
    ap.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    ap.add_argument("--set", action="append", default=[], help="train overrides, e.g. --set train.camera_lr=5e-4")
    ap.add_argument("--mc-res", type=int, default=256)
    ap.add_argument("--tau", type=float, default=0.005, help="F-score threshold as a share of the bbox diagonal")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="delete existing run folders instead of resuming")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.workdir.mkdir(parents=True, exist_ok=True)
    gt_dir = generate_scene(args.workdir, args.views, args.width, args.height, args.seed)
    cfg = train_config(args.preset, args.set, [], args.iterations)
    results = [run_one(name, args, cfg, gt_dir, device) for name in (args.runs or list(RUNS))]
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "device": device,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "runs": results,
              "config": {k: v for k, v in vars(cfg).items() if k != "refine_cameras"}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print_table(result, args)
    return 0


def print_table(r: dict, args) -> None:
    print(f"\ncamera refinement: spot {args.views} views {args.width}x{args.height}, preset {args.preset}, noise "
          f"{args.rot_deg:g} deg + {100 * args.trans:g} % of the radius per camera, device {r['gpu'] or r['device']}, "
          f"marching cubes {args.mc_res}^3\n")
    tau = r["runs"][0]["quality"]["tau_pct"] if r["runs"] else 100 * args.tau
    print(f"| run | rotation err deg (before -> after) | centre err % radius | misalignment px | Chamfer-L1 % | "
          f"surface Chamfer-L1 % | F@{tau:.2g}% | train s | PSNR train / held-out |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in r["runs"]:
        b, a, q = run["poses"]["before"], run["poses"]["after"], run["quality"]["raw"]
        held = "-" if run["holdout_psnr"] is None else f"{run['holdout_psnr']:.2f}"
        print(f"| {run['name']} | {b['rotation_deg_mean']:.3f} -> {a['rotation_deg_mean']:.3f} | "
              f"{b['center_pct_radius_mean']:.2f} -> {a['center_pct_radius_mean']:.2f} | "
              f"{b['misalignment_px']:.2f} -> {a['misalignment_px']:.2f} | {q['chamfer_pct']:.3f} | "
              f"{q.get('surface_chamfer_pct', float('nan')):.3f} | {q['fscore']:.3f} | "
              f"{run['train_seconds']:.0f} | {run['train_psnr']:.2f} / {held} |")


if __name__ == "__main__":
    sys.exit(main())
