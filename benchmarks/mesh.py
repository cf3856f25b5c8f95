"""Mesh-stage benchmark: wall time and peak memory of block-wise marching cubes
(``stages.mesh.blocks.compute_mesh``) per grid resolution, on an analytic SDF, an untrained
Neuralangelo-sized network (``--sdf neus``: real per-point cost, sphere-like surface) or a
trained model (``--model TRAIN_DIR`` holding model.pt). Prints a markdown table last;
``--out`` writes JSON. Target on one H100: resolution 2048 in <= 60 s, peak GPU memory <= 16 GB.

    PYTHONPATH=. python benchmarks/mesh.py --resolutions 256 --device cpu
    PYTHONPATH=. python benchmarks/mesh.py --resolutions 512,1024,2048 --sdf neus --device cuda --out mesh.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_paths import ROOT  # noqa: E402,F401

from stages.mesh.blocks import compute_mesh  # noqa: E402

SPHERE_R = 0.6
BUMP_A, BUMP_F = 0.03, 15.0  # |grad| <= 1 + A * F * sqrt(3) = 1.78 < skip_margin 2


def sphere(p):
    return (p * p).sum(1).sqrt() - SPHERE_R


def bumpy(p):
    """A sphere with bumps: ~3x the marching-cubes work of a sphere at the same size."""
    s = torch.sin(BUMP_F * p)
    return (p * p).sum(1).sqrt() - SPHERE_R - BUMP_A * s[:, 0] * s[:, 1] * s[:, 2]


def neus(device):
    """An untrained NeuSModel with the default TrainConfig (geometric init: a sphere), all
    hash levels active: the per-point cost of a real model."""
    from pipeline.config import TrainConfig
    from stages.train.fields import NeuSModel

    model = NeuSModel(TrainConfig(), scene_mode=False).to(device).eval()
    model.sdf.set_active_levels(TrainConfig().grid_levels)
    return lambda p: model.sdf(p)[0]


def make_sdf(args, device):
    if args.model:
        from stages.train import load_sdf

        return load_sdf(Path(args.model), device), f"model {Path(args.model).name}"
    if args.sdf == "neus":
        return neus(device), "neus (untrained, default size)"
    return {"sphere": sphere, "bumpy": bumpy}[args.sdf], args.sdf


def closed_and_volume(vertices: np.ndarray, faces: np.ndarray) -> tuple[bool, float, dict]:
    """Every edge shared by exactly two faces with opposite directions; signed volume; and where
    it is open: boundary edges (used once), non-manifold edges (3+), and the share of boundary
    vertices on the clipping sphere (|p| > 0.98 in unit coordinates)."""
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    key = np.minimum(e[:, 0], e[:, 1]) * (len(vertices) + 1) + np.maximum(e[:, 0], e[:, 1])
    uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
    directed = np.unique(e[:, 0] * (len(vertices) + 1) + e[:, 1])
    closed = bool((counts == 2).all()) and len(directed) == len(e)
    tri = vertices[faces]
    volume = float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0)
    border = np.unique(e[first[counts == 1]].ravel())
    on_sphere = float((np.linalg.norm(vertices[border], axis=1) > 0.98).mean()) if len(border) else 0.0
    return closed, volume, {"boundary_edges": int((counts == 1).sum()), "nonmanifold_edges": int((counts > 2).sum()),
                            "boundary_on_sphere": round(on_sphere, 4)}


def run_case(sdf, name: str, resolution: int, args, device) -> dict:
    stats: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        v, f = compute_mesh(sdf, resolution, args.block, device, coarse_factor=args.coarse_factor,
                            skip_margin=args.skip_margin, chunk=args.chunk, blocks_dir=Path(tmp) / "blocks",
                            workers=args.workers, progress=args.progress, stats=stats)
        seconds = time.perf_counter() - t0
    closed, volume, openings = closed_and_volume(v, f)
    expected = 4.0 / 3.0 * math.pi * SPHERE_R ** 3 if name in ("sphere", "bumpy") else None
    return {"sdf": name, "device": str(device), "resolution": resolution, "block_res": args.block,
            "seconds": round(seconds, 2), "blocks_evaluated": stats["blocks_evaluated"],
            "blocks_total": stats["blocks_total"], "samples_evaluated": stats["samples_evaluated"],
            "dense_share": round(stats["samples_evaluated"] / stats["samples_dense"], 4),
            "vertices": len(v), "faces": len(f), "peak_gpu_gib": round(stats["peak_gpu_bytes"] / 2**30, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "closed": closed, "volume": volume, **openings,
            "volume_error": None if expected is None else round(volume / expected - 1, 5)}


def table(rows: list[dict]) -> str:
    head = ("| sdf | device | resolution | block | seconds | blocks eval/total | samples (share of dense) "
            "| faces | peak GPU GiB | peak RSS GiB | closed | volume err |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        verr = "-" if r["volume_error"] is None else f"{100 * r['volume_error']:+.3f}%"
        lines.append(f"| {r['sdf']} | {r['device']} | {r['resolution']} | {r['block_res']} | {r['seconds']:.2f} | "
                     f"{r['blocks_evaluated']}/{r['blocks_total']} | {r['samples_evaluated'] / 1e6:.1f} M "
                     f"({100 * r['dense_share']:.1f}%) | {r['faces']:,} | {r['peak_gpu_gib']:.2f} | "
                     f"{r['peak_rss_gib']:.2f} | {r['closed']} | {verr} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", default="512,1024,2048")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--sdf", default="bumpy", choices=["sphere", "bumpy", "neus"])
    ap.add_argument("--model", default="", help="train stage folder (model.pt); overrides --sdf")
    ap.add_argument("--chunk", type=int, default=1 << 18)
    ap.add_argument("--coarse-factor", type=int, default=8)
    ap.add_argument("--skip-margin", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=0, help="marching-cubes threads (0 = auto)")
    ap.add_argument("--warmup", type=int, default=64, help="mesh this resolution first, untimed (0 = none)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    sdf, label = make_sdf(args, device)
    if args.warmup:
        compute_mesh(sdf, args.warmup, min(args.block, args.warmup), device, chunk=args.chunk)
    rows = []
    for res in (int(r) for r in args.resolutions.split(",")):
        rows.append(run_case(sdf, label, res, args, device))
        print(json.dumps(rows[-1]), flush=True)
    info = {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
