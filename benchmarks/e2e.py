"""End to end: a synthetic orbit (video or photos) through the real CLI; every stage's time.

    PYTHONPATH=. python benchmarks/e2e.py --views 150 --width 1920 --height 1080 --preset default --out e2e.json

Prints a markdown table last (stage, seconds, summary) and writes JSON. The scene is the
shipped Spot mesh on a textured backdrop, with ground truth, so `evaluate` scores it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import store  # noqa: E402
from pipeline.fsutil import read_json  # noqa: E402


def generate_scene(folder: Path, views: int, width: int, height: int, output: str) -> tuple[Path, Path, float]:
    from pipeline.synthetic import SceneSpec, generate

    t0 = time.time()
    if not (folder / "gt" / "gt.json").is_file():
        generate(folder, SceneSpec(num_views=views, width=width, height=height, output=output))
    source = folder / ("video.mp4" if output == "video" else "images")
    return source, folder / "gt", time.time() - t0


def stage_rows(workdir: Path, scene: str) -> list[dict]:
    plan = read_json(store.scene_dir(workdir, scene) / store.PLAN)
    rows = []
    for stage, key in plan["keys"].items():
        manifest = store.load_manifest(store.stage_dir(workdir, scene, stage, key)) or {}
        summary = manifest.get("summary", {})
        brief = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40}
        rows.append({"stage": stage, "seconds": manifest.get("seconds"), "summary": brief})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=150)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--input", choices=("video", "images"), default="video")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--until", default=None, help="last stage (default: the last available)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/e2e"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    data = args.workdir / f"input_{args.input}_{args.views}_{args.width}x{args.height}"
    source, gt, gen_s = generate_scene(data, args.views, args.width, args.height, args.input)
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "run", f"--{args.input}", str(source), "--gt", str(gt),
           "--workdir", str(args.workdir / "work"), "--scene", "spot", "--preset", args.preset, "--no-progress"]
    cmd += [f"--set={s}" for s in args.set] + (["--until", args.until] if args.until else [])
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    wall = time.time() - t0
    rows = stage_rows(args.workdir / "work", "spot")
    metrics_path = args.workdir / "work" / "spot" / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}
    result = {"rc": rc, "wall_s": round(wall, 1), "generate_s": round(gen_s, 1), "input": args.input,
              "views": args.views, "size": f"{args.width}x{args.height}", "preset": args.preset,
              "stages": rows, "metrics": metrics}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(f"\n| stage | seconds | summary |\n|---|---|---|")
    for row in rows:
        secs = f"{row['seconds']:.1f}" if row["seconds"] is not None else "not run"
        print(f"| {row['stage']} | {secs} | {json.dumps(row['summary'])[:160]} |")
    print(f"| **total (CLI wall)** | {wall:.1f} | exit code {rc}; scene generation {gen_s:.1f} s not included |")
    return rc


if __name__ == "__main__":
    sys.exit(main())
