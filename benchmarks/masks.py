"""Masks benchmark: IoU against ground-truth masks and time per frame of every available method
on a synthetic scene (textured ground and dome). Prints a markdown table last; ``--out`` JSON.

The sfm/ input is built from the ground truth (GT cameras in transforms.json, a pycolmap model
whose points are sampled on the GT mesh, the ground and the dome, with noise), so the benchmark
does not depend on the sfm stage. ``rembg`` runs only when its model is on disk (or
``--model-path`` is given); ``provided`` copies the GT masks through frames/masks/.

    PYTHONPATH=. python benchmarks/masks.py --views 48 --width 640 --height 480 --out masks.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_paths import ROOT  # noqa: E402,F401

from pipeline.cameras import Cameras, load_transforms, project, save_transforms  # noqa: E402


def _visible(points: np.ndarray, cams: Cameras, margin: float = 0.0) -> np.ndarray:
    """Number of views each point projects into (no occlusion test)."""
    count = np.zeros(len(points), np.int64)
    for i in range(len(cams)):
        uv, depth = project(points, cams.K[i], np.linalg.inv(cams.c2w[i]))
        with np.errstate(invalid="ignore"):
            count += (depth > 0) & (uv[:, 0] >= -margin) & (uv[:, 0] < cams.width + margin) \
                & (uv[:, 1] >= -margin) & (uv[:, 1] < cams.height + margin)
    return count


def scene_points(gt_dir: Path, cams: Cameras, seed: int = 0, n_object: int = 1500, n_ground: int = 6000,
                 n_dome: int = 1500, noise: float = 0.002) -> np.ndarray:
    """SfM-like points: samples on the GT mesh (upper part, as SfM sees it), the ground and dome."""
    import trimesh

    rng = np.random.default_rng(seed)
    mesh = trimesh.load(gt_dir / "gt_mesh.ply", process=False)
    obj = np.asarray(trimesh.sample.sample_surface(mesh, n_object, seed=seed)[0])
    gt = json.loads((gt_dir / "gt.json").read_text())
    R = float(gt.get("backdrop_radius", 6.0))
    r = R * 0.9 * np.sqrt(rng.uniform(0, 1, n_ground))
    a = rng.uniform(0, 2 * np.pi, n_ground)
    ground = np.stack([r * np.cos(a), r * np.sin(a), np.zeros(n_ground)], 1)
    v = rng.normal(size=(n_dome, 3))
    v[:, 2] = np.abs(v[:, 2])
    dome = R * v / np.linalg.norm(v, axis=1, keepdims=True)
    pts = np.concatenate([obj, ground, dome]) + rng.normal(scale=noise, size=(n_object + n_ground + n_dome, 3))
    return pts[_visible(pts, cams) >= 3]


def write_reconstruction(sparse_dir: Path, cams: Cameras, points: np.ndarray) -> None:
    """A pycolmap model (PINHOLE, GT poses) whose points are observed where they project."""
    import pycolmap

    rec = pycolmap.Reconstruction()
    K0 = cams.K[0]
    rec.add_camera_with_trivial_rig(pycolmap.Camera(
        model="PINHOLE", width=cams.width, height=cams.height,
        params=[K0[0, 0], K0[1, 1], K0[0, 2], K0[1, 2]], camera_id=1))
    tracks = [pycolmap.Track() for _ in range(len(points))]
    for i in range(len(cams)):
        w2c = np.linalg.inv(cams.c2w[i])
        uv, depth = project(points, cams.K[i], w2c)
        with np.errstate(invalid="ignore"):
            ok = np.nonzero((depth > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < cams.width)
                            & (uv[:, 1] >= 0) & (uv[:, 1] < cams.height))[0]
        name = Path(cams.names[i]).name
        img = pycolmap.Image(name=name, keypoints=uv[ok].astype(np.float64), camera_id=1, image_id=i + 1)
        rec.add_image_with_trivial_frame(img, pycolmap.Rigid3d(pycolmap.Rotation3d(w2c[:3, :3]), w2c[:3, 3]))
        for k, j in enumerate(ok):
            tracks[j].add_element(i + 1, k)
    for j, p in enumerate(points):
        if tracks[j].length() >= 2:
            rec.add_point3D(p, tracks[j], np.array([128, 128, 128], np.uint8))
    sparse_dir.mkdir(parents=True, exist_ok=True)
    rec.write(str(sparse_dir))


def gt_sfm_folder(gt_dir: Path, sfm_dir: Path, seed: int = 0, image_ext: str = ".png",
                  object_points: int = 500) -> Cameras:
    """Build an sfm/ folder (images/, transforms.json, sparse/) from a synthetic scene's gt/."""
    cams = load_transforms(gt_dir / "transforms.json")
    (sfm_dir / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for name in cams.names:
        src = gt_dir / name
        dst = sfm_dir / "images" / (Path(name).stem + image_ext)
        if image_ext == src.suffix:
            shutil.copyfile(src, dst)
        else:
            import cv2

            cv2.imwrite(str(dst), cv2.imread(str(src)), [cv2.IMWRITE_JPEG_QUALITY, 95])
        names.append(f"images/{dst.name}")
    cams = Cameras(names, cams.K, cams.c2w, cams.width, cams.height)
    save_transforms(sfm_dir / "transforms.json", cams)
    write_reconstruction(sfm_dir / "sparse", cams, scene_points(gt_dir, cams, seed, n_object=object_points))
    return cams


def mean_iou(mask_dir: Path, gt_mask_dir: Path, stems: list[str]) -> tuple[float, float]:
    from stages.masks.post import iou, mask_or_none

    vals = [iou(mask_or_none(mask_dir / f"{s}.png"), mask_or_none(gt_mask_dir / f"{s}.png")) for s in stems]
    return float(np.mean(vals)), float(np.min(vals))


def run_method(method: str, frames_dir: Path, sfm_dir: Path, out_dir: Path, **overrides) -> dict:
    from pipeline.config import MaskConfig
    from pipeline.dag import Context
    from stages import masks

    cfg = dataclasses.replace(MaskConfig(), method=method, **overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(scene="bench", progress=False, log=logging.getLogger("bench.masks"))
    t0 = time.perf_counter()
    summary = masks.run({"frames": frames_dir, "sfm": sfm_dir}, cfg, out_dir, ctx)
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=24)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--object-points", type=int, default=500, help="SfM points sampled on the object")
    ap.add_argument("--methods", default="provided,grabcut,rembg")
    ap.add_argument("--model-path", default="", help="custom ONNX model for rembg")
    ap.add_argument("--workdir", default="", help="keep the scene and outputs here (default: a temp dir)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from pipeline.synthetic import SceneSpec, SyntheticScene, generate
    from stages.masks.rembg import local_model

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_masks_"))
    spec = SceneSpec(num_views=args.views, width=args.width, height=args.height, output="images", seed=args.seed)
    gt_json = work / "scene" / "gt" / "gt.json"
    same = gt_json.is_file() and all(json.loads(gt_json.read_text()).get(k) == getattr(spec, k)
                                     for k in ("num_views", "width", "height", "seed"))
    scene = SyntheticScene(work / "scene", None, work / "scene" / "images", work / "scene" / "gt") if same \
        else generate(work / "scene", spec)
    sfm = work / "sfm"
    gt_sfm_folder(scene.gt_dir, sfm, seed=args.seed, object_points=args.object_points)
    frames = work / "frames"
    shutil.rmtree(frames, ignore_errors=True)
    shutil.copytree(scene.gt_dir / "masks", frames / "masks")
    stems = [p.stem for p in sorted((sfm / "images").glob("*.png"))]
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        extra = {"model_path": args.model_path} if method == "rembg" and args.model_path else {}
        if method == "rembg" and not args.model_path and local_model("isnet-general-use") is None:
            rows.append({"method": method, "status": "skipped: model not on disk"})
            continue
        out = work / f"out_{method}"
        shutil.rmtree(out, ignore_errors=True)
        s = run_method(method, frames, sfm, out, **extra)
        miou, lo = mean_iou(out / "masks", scene.gt_dir / "masks", stems)
        rows.append({"method": method, "status": "ok", "mean_iou": miou, "min_iou": lo,
                     "s_per_frame": s["wall_s"] / len(stems), "flagged": len(s.get("flagged", [])),
                     "model": s.get("model"), "provider": s.get("provider")})
    result = {"views": args.views, "width": args.width, "height": args.height, "seed": args.seed, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nSynthetic scene: {args.views} views, {args.width}x{args.height}, textured ground + dome\n")
    print("| method | mean IoU | min IoU | s/frame | flagged | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['method']} | - | - | - | - | {r['status']} |")
        else:
            note = r.get("provider") or ""
            print(f"| {r['method']} | {r['mean_iou']:.4f} | {r['min_iou']:.4f} | {r['s_per_frame']:.3f} | "
                  f"{r['flagged']} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
