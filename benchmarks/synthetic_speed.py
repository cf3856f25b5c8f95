"""Speed of the synthetic scene generator: end-to-end ``generate`` wall time per image size.

    python benchmarks/synthetic_speed.py --sizes 640x480,1920x1080 --views 100,20 --out speed.json

Prints a markdown table last and writes JSON to ``--out``. Setup (textures, mesh) is timed
separately from rendering+writing; the requirement is 100 frames at 640x480 < 60 s on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from pipeline.synthetic import SceneSpec, generate
from pipeline.synthetic.background import make_backdrop


def run_case(width: int, height: int, views: int, output: str, supersample: int) -> dict:
    spec = SceneSpec(num_views=views, width=width, height=height, output=output, supersample=supersample)
    make_backdrop.cache_clear()
    start = time.perf_counter()
    make_backdrop(spec.seed, float(spec.backdrop_radius))
    setup_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="synthetic_speed_") as tmp:
        start = time.perf_counter()
        generate(Path(tmp), spec)
        frames_s = time.perf_counter() - start
    total = setup_s + frames_s
    return {"width": width, "height": height, "views": views, "output": output, "supersample": supersample,
            "setup_s": round(setup_s, 3), "render_write_s": round(frames_s, 3), "total_s": round(total, 3),
            "frames_per_s": round(views / frames_s, 3), "under_60s_per_100": total * 100 / views < 60.0}


def markdown(rows: list[dict]) -> str:
    lines = ["| size | views | ss | output | setup s | render+write s | total s | frames/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['width']}x{r['height']} | {r['views']} | {r['supersample']} | {r['output']} | "
                     f"{r['setup_s']:.2f} | {r['render_write_s']:.2f} | {r['total_s']:.2f} | {r['frames_per_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="640x480,1920x1080", help="comma-separated WxH list")
    parser.add_argument("--views", default="100,20", help="views per size (one value or one per size)")
    parser.add_argument("--output", default="video", choices=["video", "images"])
    parser.add_argument("--supersample", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("synthetic_speed.json"), help="JSON result path")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    views = [int(v) for v in args.views.split(",")]
    views = views * len(sizes) if len(views) == 1 else views
    if len(views) != len(sizes):
        parser.error("--views needs one value or one per size")
    rows = [run_case(w, h, n, args.output, args.supersample) for (w, h), n in zip(sizes, views)]
    env = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "affinity": len(os.sched_getaffinity(0)), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "synthetic_speed", "env": env, "results": rows}, indent=1))
    print(json.dumps(env))
    print(markdown(rows))


if __name__ == "__main__":
    main()
