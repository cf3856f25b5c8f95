"""SfM benchmark: time and accuracy of the incremental vs the global mapper.

Two inputs: a synthetic orbit rendered to a video and cut by the frames stage (exact GT
cameras; sequential matching), and the real skull photo set (no GT; exhaustive matching).
Each mapper runs the whole sfm stage with ``fallback_mapper`` off, so the rows compare the
mappers themselves. Prints a markdown table last; ``--out`` writes JSON.

    PYTHONPATH=. python benchmarks/sfm.py --out sfm.json                      # 150 frames 1920x1080
    PYTHONPATH=. python benchmarks/sfm.py --frames 40 --width 640 --height 480 --skull-max-size 800
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.align import camera_errors  # noqa: E402
from pipeline.cameras import load_transforms  # noqa: E402
from pipeline.config import FramesConfig, SfmConfig  # noqa: E402
from pipeline.dag import Context, Source  # noqa: E402

SKULL = Path(__file__).resolve().parents[2] / "shared" / "data" / "skull" / "images"
MAPPERS = ("incremental", "global")


def make_frames(source: Source, out: Path, target_count: int, log: logging.Logger) -> Path:
    """Run the frames stage on a video or photo folder (cached in ``out``)."""
    from stages import frames

    if not (out / "frames.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        cfg = FramesConfig(target_count=target_count, max_side=4096, dedup_threshold=0.0)
        frames.run({}, cfg, out, Context(scene="bench", source=source, progress=False, log=log))
    return out


def synthetic_frames(args, work: Path, log: logging.Logger) -> tuple[Path, Path]:
    """Render the orbit video (cached) and cut it into frames; returns (frames dir, gt dir)."""
    from pipeline.synthetic import SceneSpec, generate

    scene_dir = work / f"orbit_{args.frames}_{args.width}x{args.height}"
    if not (scene_dir / "video.mp4").is_file():
        log.info("rendering %d views %dx%d ...", args.frames, args.width, args.height)
        generate(scene_dir, SceneSpec(num_views=args.frames, width=args.width, height=args.height,
                                      output="video", radius=args.radius, seed=0))
    source = Source(kind="video", path=str(scene_dir / "video.mp4"), gt=str(scene_dir / "gt"))
    return make_frames(source, scene_dir / "frames", args.frames, log), scene_dir / "gt"


def gt_errors(frames_dir: Path, sfm_dir: Path, gt_dir: Path, radius: float) -> dict:
    """Camera errors of the registered frames against GT (frames.json source_index -> GT view)."""
    meta = json.loads((frames_dir / "frames.json").read_text())
    source_of = {Path(f["file"]).name: int(f["source_index"]) for f in meta["frames"]}
    est = load_transforms(sfm_dir / "transforms.json")
    gt = load_transforms(gt_dir / "transforms.json")
    idx = [source_of[Path(n).name] for n in est.names]
    err = camera_errors(est.c2w, gt.c2w[idx])
    return {"rot_median_deg": err["rotation_deg_median"], "rot_max_deg": err["rotation_deg_max"],
            "rel_rot_median_deg": err["relative_rotation_deg_median"],
            "center_median_pct": 100 * err["center_median"] / radius,
            "center_max_pct": 100 * err["center_max"] / radius,
            "focal_error_pct": 100 * abs(est.K[0, 0, 0] - gt.K[0, 0, 0]) / gt.K[0, 0, 0]}


def run_sfm(frames_dir: Path, cfg: SfmConfig, out: Path, log: logging.Logger) -> dict:
    from pipeline.errors import StageError
    from stages import sfm

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    try:
        summary = sfm.run({"frames": frames_dir}, cfg, out, Context(scene="bench", progress=False, log=log))
    except StageError as exc:
        return {"error": str(exc), "total_s": time.perf_counter() - start}
    summary["total_s"] = time.perf_counter() - start
    return summary


def bench(name: str, frames_dir: Path, gt_dir: Path | None, cfg: SfmConfig, args, work: Path,
          log: logging.Logger) -> list[dict]:
    rows = []
    for mapper in args.mappers:
        log.info("%s: %s mapper ...", name, mapper)
        out = work / f"sfm_{name}_{mapper}"
        summary = run_sfm(frames_dir, dataclasses.replace(cfg, mapper=mapper, fallback_mapper=False), out, log)
        row = {"input": name, "mapper": mapper, **{k: summary.get(k) for k in (
            "num_images", "num_registered", "num_points3d", "mean_reprojection_error_px", "matcher",
            "timings", "total_s", "error")}}
        if gt_dir is not None and "error" not in summary:
            row.update(gt_errors(frames_dir, out, gt_dir, args.radius))
        rows.append(row)
        log.info("%s", json.dumps({k: v for k, v in row.items() if k != "timings"}))
    return rows


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = ("| input | mapper | registered | points | reproj px | rot med deg | rel rot deg | centre med % "
            "| extract s | match s | map s | ba s | total s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t = r.get("timings") or {}
        reg = f"{r['num_registered']}/{r['num_images']}" if r.get("num_registered") is not None else "failed"
        lines.append(f"| {r['input']} | {r['mapper']} | {reg} | {fmt(r.get('num_points3d'), 'd')} "
                     f"| {fmt(r.get('mean_reprojection_error_px'), '.3f')} | {fmt(r.get('rot_median_deg'), '.3f')} "
                     f"| {fmt(r.get('rel_rot_median_deg'), '.3f')} | {fmt(r.get('center_median_pct'), '.3f')} "
                     f"| {fmt(t.get('extract'), '.1f')} | {fmt(t.get('match'), '.1f')} | {fmt(t.get('map'), '.1f')} "
                     f"| {fmt(t.get('ba'), '.1f')} | {fmt(r.get('total_s'), '.1f')} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=150, help="synthetic orbit views = video frames")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--radius", type=float, default=2.0, help="orbit radius (camera distance to the object)")
    ap.add_argument("--max-image-size", type=int, default=1600, help="sfm.max_image_size for the synthetic run")
    ap.add_argument("--skull", type=str, default=str(SKULL), help="photo folder; '' to skip")
    ap.add_argument("--skull-max-size", type=int, default=1200, help="sfm.max_image_size for the photos")
    ap.add_argument("--mappers", nargs="+", default=list(MAPPERS), choices=MAPPERS)
    ap.add_argument("--workdir", type=Path, default=None, help="keep renders and outputs here (default: temp)")
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("bench.sfm")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_sfm_"))
    work.mkdir(parents=True, exist_ok=True)
    frames_dir, gt_dir = synthetic_frames(args, work, log)
    rows = bench(f"orbit {args.frames}x{args.width}x{args.height}", frames_dir, gt_dir,
                 SfmConfig(max_image_size=args.max_image_size), args, work, log)
    if args.skull and Path(args.skull).is_dir():
        skull_frames = make_frames(Source(kind="images", path=str(args.skull)), work / "skull_frames", 2, log)
        rows += bench("skull", skull_frames, None, SfmConfig(max_image_size=args.skull_max_size), args, work, log)
    import pycolmap

    result = {"host": platform.node(), "cpus": os.cpu_count(), "pycolmap": pycolmap.__version__,
              "cuda": bool(pycolmap.has_cuda), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=float))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
