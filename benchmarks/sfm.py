"""SfM benchmark: time per phase and camera accuracy of the sfm stage, per configuration variant.

Input: a synthetic Spot orbit rendered to a video (exact GT cameras), cut by the frames stage
with the pipeline's own FramesConfig defaults (``--frames-set`` overrides them), so the sfm stage
sees what a real run sees; optionally the real skull photo set (no GT; exhaustive matching).
Every variant runs the whole sfm stage (extract, match, map, ba, undistort) on the same frames.
A variant is ``NAME`` or ``NAME:key=value,key=value`` over SfmConfig fields; ``default`` is
SfmConfig() unchanged. Rows give wall seconds per phase (CPU seconds of all threads per phase
are in the JSON, ``timings.cpu``), the total wall and CPU seconds, registered views,
rotation / centre / focal errors against GT. Prints a markdown table last; ``--out`` writes JSON.

    PYTHONPATH=. python benchmarks/sfm.py --out sfm.json                   # 150 frames 1920x1080
    PYTHONPATH=. python benchmarks/sfm.py --variant default --variant global:mapper=global \\
        --frames-set target_count=100 --workdir /tmp/bench_sfm               # renders are cached there
    PYTHONPATH=. python benchmarks/sfm.py --frames 40 --width 640 --height 480 --skull ''
    PYTHONPATH=. python benchmarks/sfm.py --input images --skull '' --variant default:matcher=sequential \
        --variant incremental:matcher=sequential,mapper=incremental     # a machine without PyAV

For photos the frames stage keeps every image (``target_count`` applies to videos only).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_paths import ROOT  # noqa: E402,F401

from pipeline.align import camera_errors  # noqa: E402
from pipeline.cameras import load_transforms  # noqa: E402
from pipeline.config import FramesConfig, SfmConfig  # noqa: E402
from pipeline.dag import Context, Source  # noqa: E402

SKULL = Path(__file__).resolve().parents[2] / "shared" / "data" / "skull" / "images"
DEFAULT_VARIANTS = ("default", "incremental:mapper=incremental,fallback_mapper=false", "global:mapper=global")
PHASES = ("extract", "match", "map", "ba", "undistort")


def parse_overrides(text: str, cls) -> dict:
    """``key=value,key=value`` -> typed kwargs for the dataclass ``cls`` (bool/int/float/str fields)."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    out = {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        if key not in types:
            raise SystemExit(f"unknown {cls.__name__} field {key!r}; known: {', '.join(types)}")
        kind = str(types[key])
        if kind == "bool":
            out[key] = raw.lower() in ("1", "true", "yes", "on")
        elif kind in ("int", "float"):
            out[key] = int(raw) if kind == "int" else float(raw)
        else:
            out[key] = raw
    return out


def parse_variant(text: str) -> tuple[str, SfmConfig]:
    name, _, overrides = text.partition(":")
    return name, SfmConfig(**parse_overrides(overrides, SfmConfig))


def make_frames(source: Source, out: Path, cfg: FramesConfig, log: logging.Logger) -> Path:
    """Run the frames stage on a video or photo folder (cached in ``out``)."""
    from stages import frames

    if not (out / "frames.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        frames.run({}, cfg, out, Context(scene="bench", source=source, progress=False, log=log))
    return out


def synthetic_frames(args, work: Path, log: logging.Logger) -> tuple[Path, Path]:
    """Render the orbit video (cached) and cut it into frames; returns (frames dir, gt dir)."""
    from pipeline.synthetic import SceneSpec, generate

    video = args.input == "video"
    scene_dir = work / f"orbit_{args.frames}_{args.width}x{args.height}" if video else \
        work / f"orbit_{args.frames}_{args.width}x{args.height}_images"
    source_path = scene_dir / ("video.mp4" if video else "images")
    if not source_path.exists() or not (scene_dir / "gt" / "transforms.json").is_file():
        log.info("rendering %d views %dx%d ...", args.frames, args.width, args.height)
        generate(scene_dir, SceneSpec(num_views=args.frames, width=args.width, height=args.height,
                                      output=args.input, radius=args.radius, seed=0))
    frames_cfg = FramesConfig(**parse_overrides(args.frames_set, FramesConfig))
    tag = hashlib.sha256(json.dumps(dataclasses.asdict(frames_cfg), sort_keys=True).encode()).hexdigest()[:8]
    source = Source(kind=args.input, path=str(source_path), gt=str(scene_dir / "gt"))
    return make_frames(source, scene_dir / f"frames_{tag}", frames_cfg, log), scene_dir / "gt"


def gt_errors(frames_dir: Path, sfm_dir: Path, gt_dir: Path, radius: float) -> dict:
    """Camera errors of the registered frames against GT (frames.json source_index of a video
    frame, or source_file of a photo -> GT view)."""
    meta = json.loads((frames_dir / "frames.json").read_text())
    gt = load_transforms(gt_dir / "transforms.json")
    gt_index = {Path(n).stem: i for i, n in enumerate(gt.names)}
    source_of = {Path(f["file"]).name: int(f["source_index"]) if "source_index" in f
                 else gt_index[Path(f["source_file"]).stem] for f in meta["frames"]}
    est = load_transforms(sfm_dir / "transforms.json")
    idx = [source_of[Path(n).name] for n in est.names]
    err = camera_errors(est.c2w, gt.c2w[idx])
    focal_gt = gt.K[0, 0, 0] * est.width / gt.width  # frames may be downscaled from the render
    return {"rot_median_deg": err["rotation_deg_median"], "rot_max_deg": err["rotation_deg_max"],
            "rel_rot_median_deg": err["relative_rotation_deg_median"],
            "center_median_pct": 100 * err["center_median"] / radius,
            "center_max_pct": 100 * err["center_max"] / radius,
            "focal_error_pct": 100 * abs(est.K[0, 0, 0] - focal_gt) / focal_gt}


def run_sfm(frames_dir: Path, cfg: SfmConfig, out: Path, log: logging.Logger) -> dict:
    from pipeline.errors import StageError
    from stages import sfm

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        summary = sfm.run({"frames": frames_dir}, cfg, out, Context(scene="bench", progress=False, log=log))
    except StageError as exc:
        summary = {"error": str(exc)}
    summary["total_s"] = time.perf_counter() - start
    summary["total_cpu_s"] = time.process_time() - cpu
    return summary


def bench(name: str, frames_dir: Path, gt_dir: Path | None, variants: list, args, work: Path,
          log: logging.Logger) -> list[dict]:
    rows = []
    for label, cfg in variants:
        log.info("%s: variant %s ...", name, label)
        out = work / f"sfm_{name.split()[0]}_{label}"
        summary = run_sfm(frames_dir, cfg, out, log)
        row = {"input": name, "variant": label, "config": dataclasses.asdict(cfg), **{k: summary.get(k) for k in (
            "num_images", "num_registered", "num_points3d", "mean_reprojection_error_px", "matcher", "mapper",
            "num_pairs", "features_median", "timings", "total_s", "total_cpu_s", "error")}}
        if gt_dir is not None and "error" not in summary:
            row.update(gt_errors(frames_dir, out, gt_dir, args.radius))
        rows.append(row)
        log.info("%s", json.dumps({k: v for k, v in row.items() if k not in ("config",)}, default=float))
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
    return rows


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = ("| input | variant | mapper | registered | points | reproj px | rot med deg | rot max deg | rel rot deg "
            "| centre med % | focal err % | " + " | ".join(f"{p} s wall / CPU" for p in PHASES)
            + " | total s | CPU s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t = r.get("timings") or {}
        cpu = t.get("cpu") or {}
        reg = f"{r['num_registered']}/{r['num_images']}" if r.get("num_registered") is not None else "failed"
        lines.append(
            f"| {r['input']} | {r['variant']} | {r.get('mapper') or '-'} | {reg} | {fmt(r.get('num_points3d'), 'd')} "
            f"| {fmt(r.get('mean_reprojection_error_px'), '.3f')} | {fmt(r.get('rot_median_deg'), '.4f')} "
            f"| {fmt(r.get('rot_max_deg'), '.4f')} | {fmt(r.get('rel_rot_median_deg'), '.4f')} "
            f"| {fmt(r.get('center_median_pct'), '.4f')} | {fmt(r.get('focal_error_pct'), '.3f')} | "
            + " | ".join(f"{fmt(t.get(p), '.1f')} / {fmt(cpu.get(p), '.1f')}" for p in PHASES)
            + f" | {fmt(r.get('total_s'), '.1f')} | {fmt(r.get('total_cpu_s'), '.1f')} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=150, help="synthetic orbit views = video frames")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--radius", type=float, default=2.0, help="orbit radius (camera distance to the object)")
    ap.add_argument("--input", choices=("video", "images"), default="video",
                    help="images: PNG photos in orbit order (needs no PyAV; name matcher=sequential to mirror a video)")
    ap.add_argument("--frames-set", default="", help="FramesConfig overrides, e.g. target_count=100,max_side=1280")
    ap.add_argument("--variant", action="append", default=None,
                    help=f"NAME[:key=value,...] over SfmConfig (repeatable; default: {' '.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--skull", type=str, default=str(SKULL), help="photo folder; '' to skip")
    ap.add_argument("--skull-max-size", type=int, default=1200, help="sfm.max_image_size for the photos")
    ap.add_argument("--workdir", type=Path, default=None, help="keep renders and frames here (default: temp)")
    ap.add_argument("--keep-outputs", action="store_true", help="keep each variant's sfm folder in the workdir")
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("bench.sfm")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_sfm_"))
    work.mkdir(parents=True, exist_ok=True)
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    frames_dir, gt_dir = synthetic_frames(args, work, log)
    name = f"orbit {args.frames}x{args.width}x{args.height} {args.input}"
    rows = bench(name, frames_dir, gt_dir, variants, args, work, log)
    if args.skull and Path(args.skull).is_dir():
        skull_frames = make_frames(Source(kind="images", path=str(args.skull)), work / "skull_frames",
                                   FramesConfig(target_count=2), log)
        skull = [(n, dataclasses.replace(c, max_image_size=args.skull_max_size)) for n, c in variants]
        rows += bench("skull", skull_frames, None, skull, args, work, log)
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
