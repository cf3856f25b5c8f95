"""Neural SDF quality and speed on a synthetic scene with exact ground truth.

Renders the spot scene (``pipeline.synthetic``, textured ground + dome, GT cameras and masks;
cached in --workdir), builds the train inputs from the GT (points sampled on the GT mesh as
SfM points), trains with a preset, meshes with skimage marching cubes and scores Chamfer-L1 and
F-score (as % of the GT bbox diagonal) of the raw mesh and of its largest component.

    PYTHONPATH=. python benchmarks/train_quality.py --preset fast_cpu --views 24 --width 160 --height 120
    PYTHONPATH=. python benchmarks/train_quality.py --preset default --views 100 --width 800 --height 600 \\
        --mc-res 512 --out quality.json                      # GPU target: CD <= 0.3%, F@0.5% >= 0.9
    ... --generate-only                                      # render the scene (cache) and stop
    ... --ablation no_mask_loss --ablation no_sfm            # switch parts off (see ABLATIONS)

Prints a markdown table last; JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import types
from pathlib import Path

from bench_paths import ROOT  # noqa: E402,F401

ABLATIONS = {
    "no_mask_loss": {"mask_weight": 0.0},
    "no_masks": {"mode": "scene"},  # ignore the masks: background field, textured background trained
    "no_sfm": {"sfm_weight": 0.0},
    "analytic_gradients": {"gradient_mode": "analytic"},
    "central6": {"gradient_mode": "central6"},
    "no_c2f": {"c2f_step": 0},
    "no_curvature": {"curvature_weight": 0.0},
}

def ensure_av_stub() -> None:
    """pipeline.synthetic imports PyAV for video output; photo output never uses it. The GPU
    image has no PyAV, so a stub lets the renderer import there."""
    try:
        import av  # noqa: F401
    except ImportError:
        sys.modules["av"] = types.ModuleType("av")


def generate_scene(workdir: Path, views: int, width: int, height: int, seed: int) -> Path:
    """Render (or reuse) the spot scene; returns its gt/ folder."""
    ensure_av_stub()
    from pipeline.synthetic import SceneSpec, generate

    out = workdir / f"spot_{views}v_{width}x{height}_s{seed}"
    gt = out / "gt"
    if (gt / "gt.json").is_file() and (gt / "gt_mesh.ply").is_file():
        return gt
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    generate(out, SceneSpec(num_views=views, width=width, height=height, output="images", background=True, seed=seed))
    print(f"rendered {views} views {width}x{height} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return gt


def generate_shape(name: str, workdir: Path, views: int, width: int, height: int) -> Path:
    """Render (or reuse) a scene of ``benchmarks/robustness_scenes.py`` by name; returns its gt/ folder."""
    ensure_av_stub()
    from robustness_scenes import BY_NAME, generate_scene

    if name not in BY_NAME or BY_NAME[name].real:
        raise SystemExit(f"--shape {name}: not a generated scene of robustness_scenes.py")
    return generate_scene(BY_NAME[name], workdir / "shapes", views, width, height) / "gt"


def scene_gt_dir(args) -> Path:
    """The gt/ folder of the scene the arguments name (rendered on first use): ``--shape`` or spot."""
    if args.shape:
        return generate_shape(args.shape, args.workdir, args.views, args.width, args.height)
    return generate_scene(args.workdir, args.views, args.width, args.height, getattr(args, "seed", 0))


def from_synthetic_scene(args, inputs_root: Path) -> tuple[dict, object, Path]:
    """Train inputs built afresh in ``inputs_root`` from that scene's ground truth: (inputs, GT
    surface points, gt/ folder)."""
    from train_inputs import from_synthetic

    gt_dir = scene_gt_dir(args)
    shutil.rmtree(inputs_root, ignore_errors=True)
    inputs, gt_points = from_synthetic(gt_dir, inputs_root)
    return inputs, gt_points, gt_dir


def train_config(preset: str, overrides: list[str], ablations: list[str], iterations: int | None):
    import dataclasses

    from pipeline.config import TrainConfig, apply_overrides, load_preset, parse_set

    from train_inputs import FAST_CPU_TRAIN

    cfg = load_preset(preset)
    if preset == "fast_cpu" and cfg.train == TrainConfig():
        print("note: pipeline/presets/fast_cpu.yaml has no train section yet; using tests/train_inputs.FAST_CPU_TRAIN",
              file=sys.stderr)
        cfg = apply_overrides(cfg, {"train": FAST_CPU_TRAIN}, source="fallback")
    changes = {}
    for name in ablations:
        changes.update(ABLATIONS[name])
    if iterations:
        changes["iterations"] = iterations
    cfg = apply_overrides(cfg, {"train": changes}, source="--ablation")
    cfg = apply_overrides(cfg, parse_set(overrides), source="--set")
    return dataclasses.replace(cfg.train)


def in_region(points, gt_points, diag: float, floor: float | None):
    """The evaluate stage's object region: GT bounds + 2% of the diagonal, support plane + 1% left out."""
    from stages.evaluate.metrics import object_region

    return object_region(points, gt_points.min(0), gt_points.max(0), 0.02 * diag, floor, 0.01 * diag)


def object_region_mesh(verts, faces, gt_points, diag: float, floor: float | None):
    """The faces of a mesh whose centroid is in the object region (scene mode meshes the ground too)."""
    keep = in_region(verts[faces].mean(1), gt_points, diag, floor) if len(faces) else []
    return verts, faces[keep]


def score(model_dir: Path, gt_points, diag: float, res: int, device: str, tau: float,
          floor: float | None = None, gt_mesh: tuple | None = None) -> dict:
    """Chamfer-L1 and F-score of the raw mesh, its largest component and its object region. With
    ``gt_mesh`` (vertices, faces) also ``surface_chamfer_pct`` / ``surface_fscore``: the same
    with point-to-surface distances, which read 0 for a perfect mesh where the point-sample
    figures read 0.12 % (their sampling floor at 200k/100k samples: RESULTS.md)."""
    import numpy as np

    from stages import train
    from stages.evaluate.metrics import chamfer_fscore_surface
    from train_inputs import chamfer_fscore, largest_component, mesh_from_sdf, sample_mesh

    t = time.perf_counter()
    verts, faces = mesh_from_sdf(train.load_sdf(model_dir, device), res)
    out = {"mesh_seconds": time.perf_counter() - t, "faces": int(len(faces))}
    for name, (v, f) in (("raw", (verts, faces)), ("largest", largest_component(verts, faces)),
                         ("region", object_region_mesh(verts, faces, gt_points, diag, floor))):
        gt = gt_points if name != "region" else gt_points[in_region(gt_points, gt_points, diag, floor)]
        pred = sample_mesh(v, f, 200000)
        cd, fs = chamfer_fscore(pred, gt, tau * diag)
        out[name] = {"chamfer_pct": 100 * cd / diag, "fscore": fs}
        if gt_mesh is not None and len(f):
            surf = chamfer_fscore_surface(pred, (v, f), gt, gt_mesh, [tau * diag])
            out[name].update(surface_chamfer_pct=100 * surf["chamfer_l1"] / diag,
                             surface_fscore=surf["fscores"][0]["fscore"])
    out["tau_pct"] = 100 * tau
    out["gt_diag"] = float(diag)
    out["ok"] = bool(np.isfinite(out["raw"]["chamfer_pct"]))
    return out


def gt_mesh(gt_dir: Path) -> tuple:
    """A rendered scene's GT mesh (vertices, faces), for the point-to-surface Chamfer."""
    import numpy as np
    import trimesh

    m = trimesh.load(gt_dir / "gt_mesh.ply", process=False)
    return np.asarray(m.vertices), np.asarray(m.faces)


def train_in(inputs: dict, cfg, run_dir: Path, ctx, fresh: bool) -> tuple[dict, float, dict]:
    """Train into ``run_dir`` (emptied first with ``fresh``, else resumed); the stage's summary,
    the wall seconds and its train.json."""
    from stages import train

    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    summary = train.run(inputs, cfg, run_dir, ctx)
    wall = time.perf_counter() - t
    return summary, wall, json.loads((run_dir / "train.json").read_text())


def scene_parser(doc: str, preset: str, views: int, width: int, height: int) -> argparse.ArgumentParser:
    """The options every spot benchmark shares: preset and the rendered views' count and size."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=preset)
    ap.add_argument("--views", type=int, default=views)
    ap.add_argument("--width", type=int, default=width)
    ap.add_argument("--height", type=int, default=height)
    return ap


def main(argv=None) -> int:
    ap = scene_parser(__doc__, "fast_cpu", 24, 160, 120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scene", choices=["spot", "analytic"], default="spot")
    ap.add_argument("--shape", default=None, help="a generated scene of robustness_scenes.py instead of spot "
                    "(exact masks and cameras), e.g. bumpy, mug_plain")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/train_quality"))
    ap.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    ap.add_argument("--set", action="append", default=[], help="train overrides, e.g. --set train.lr=2e-3")
    ap.add_argument("--ablation", action="append", default=[], choices=sorted(ABLATIONS))
    ap.add_argument("--mc-res", type=int, default=256)
    ap.add_argument("--tau", type=float, default=0.005, help="F-score threshold as a share of the bbox diagonal")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--name", default=None, help="run folder name under --workdir (default from scene, preset, ablations)")
    ap.add_argument("--fresh", action="store_true", help="delete an existing run folder instead of resuming")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import numpy as np
    import torch

    from pipeline.dag import Context
    from train_inputs import analytic_scene

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{args.shape or args.scene}_{args.views}v_{args.width}x{args.height}"
    inputs_root = args.workdir / f"inputs_{args.name or tag}"  # per run: runs side by side rebuild their own
    t0 = time.perf_counter()
    if args.scene == "spot":
        if args.generate_only:
            scene_gt_dir(args)
            return 0
        inputs, gt_points, gt_dir = from_synthetic_scene(args, inputs_root)
    else:
        shutil.rmtree(inputs_root, ignore_errors=True)
        inputs, gt_points = analytic_scene(inputs_root, args.views, args.width, args.height)
    prep = time.perf_counter() - t0
    cfg = train_config(args.preset, args.set, args.ablation, args.iterations)
    run_dir = args.workdir / (args.name or f"run_{tag}_{args.preset}{''.join('_' + a for a in args.ablation)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ctx = Context(scene=tag, device=device, progress=True, threads=args.threads, log=logging.getLogger("bench"))
    summary, train_wall, info = train_in(inputs, cfg, run_dir, ctx, args.fresh)
    diag = float(np.linalg.norm(gt_points.max(0) - gt_points.min(0)))
    spot = args.scene == "spot"
    quality = score(run_dir, gt_points, diag, args.mc_res, device, args.tau, 0.0 if spot else None,
                    gt_mesh(gt_dir) if spot else None)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "device": device,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "prep_seconds": prep,
              "train_wall_seconds": train_wall, "train_seconds": info["wall_seconds"], "summary": summary,
              "peak_gpu_memory_gb": info["peak_gpu_memory_gb"], "samples_per_second": info["samples_per_second"],
              "holdout_psnr": info["holdout_psnr"], "train_psnr": info["train_psnr"], "quality": quality,
              "timeline": info.get("timeline", []), "compile_cache": info.get("compile_cache"),
              "config": {k: v for k, v in vars(cfg).items()}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print_table(result, args)
    return 0


def print_table(r: dict, args) -> None:
    q = r["quality"]
    mem = r["peak_gpu_memory_gb"]
    print(f"\ntrain quality: {args.scene} {args.views} views {args.width}x{args.height}, preset {args.preset}"
          f"{' + ' + ', '.join(args.ablation) if args.ablation else ''}, device {r['gpu'] or r['device']}, "
          f"marching cubes {args.mc_res}^3\n")
    print(f"| mesh | Chamfer-L1 (% diag) | F@{q['tau_pct']:.2g}% | surface Chamfer-L1 / F | train s | steps | "
          "samples/s | peak GB | PSNR train / held-out |")
    print("|---|---|---|---|---|---|---|---|---|")
    mem_s = "-" if mem is None else f"{mem:.2f}"
    held = "-" if r["holdout_psnr"] is None else f"{r['holdout_psnr']:.2f}"
    for name in ("raw", "largest", "region"):
        m = q[name]
        surf = f"{m['surface_chamfer_pct']:.3f} / {m['surface_fscore']:.3f}" if "surface_chamfer_pct" in m else "-"
        print(f"| {name} | {m['chamfer_pct']:.3f} | {m['fscore']:.3f} | {surf} | {r['train_seconds']:.0f} | "
              f"{r['summary']['iterations']} | {r['samples_per_second']:.3g} | {mem_s} | "
              f"{r['train_psnr']:.2f} / {held} |")

if __name__ == "__main__":
    sys.exit(main())
