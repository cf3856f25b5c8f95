"""Stage 6, mesh: the trained SDF -> ``mesh_raw.ply`` (world coordinates; vertex colours from
the colour network when the model offers one) and ``mesh.json``.

The block-wise marching cubes lives in ``stages.mesh.blocks`` and only sees an SDF callable;
this module loads the model, maps unit-sphere coordinates to the world with
``sfm_points/scene.json`` ``unit_to_world`` and writes the files. Resume: finished blocks are
kept in ``out_dir/blocks/`` until ``mesh_raw.ply`` is written. ``mesh.gpus`` = N > 1: N-1 helper
processes (on cuda:1 .. cuda:N-1 of CUDA_VISIBLE_DEVICES, or on the CPU) each load the model
and mesh a share of the blocks; the welded mesh is the same as with one process.
"""
from __future__ import annotations

import functools
import shutil
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.dag import Context
from pipeline.devices import require_visible_gpus
from pipeline.errors import ConfigError, InputError, StageError
from pipeline.fsutil import atomic_file, atomic_write_json, read_json

VERSION = "2"  # 2: mesh_raw.ply written by trimesh (adds an alpha of 255 to the vertex colours)


@dataclass
class SdfModel:
    """What the mesher needs from a trained model (all in unit-sphere coordinates)."""

    sdf: Callable  # torch (N, 3) -> (N,), negative inside
    load_colour: Callable | None = None  # () -> colour(points (N, 3)) -> rgb (N, 3) in [0, 1], seen head-on


def load_model(train_dir: Path, device: str) -> SdfModel:
    """The trained SDF through ``stages.train.load_sdf`` (the mesher knows no checkpoint); the
    colour network through ``stages.train.load_color``, loaded only when asked for."""
    import stages.train as train

    load_sdf = getattr(train, "load_sdf", None)
    if load_sdf is None:
        raise StageError("mesh: stages.train does not expose load_sdf(model_dir, device); cannot read the model")
    load_color = getattr(train, "load_color", None)
    return SdfModel(sdf=load_sdf(Path(train_dir), device),
                    load_colour=(lambda: load_color(Path(train_dir), device)) if load_color else None)


def load_sdf_on(train_dir: Path, device: str) -> Callable:
    """The SDF of a helper process (picklable through ``functools.partial``)."""
    return load_model(train_dir, device).sdf


def helper_devices(device: str, gpus: int) -> list[str]:
    """Devices of the helper processes: the other visible GPUs, or the CPU."""
    if gpus < 1:
        raise ConfigError(f"mesh.gpus must be at least 1, got {gpus}")
    if not str(device).startswith("cuda"):
        return ["cpu"] * (gpus - 1)
    require_visible_gpus("mesh", gpus)
    return [f"cuda:{k}" for k in range(1, gpus)]


def read_unit_to_world(sfm_points_dir: Path) -> np.ndarray:
    path = Path(sfm_points_dir) / "scene.json"
    try:
        m = np.asarray(read_json(path)["unit_to_world"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: cannot read unit_to_world ({type(exc).__name__}: {exc}); "
                         "rerun the sfm_points stage") from None
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise InputError(f"{path}: unit_to_world must be a finite 4x4 matrix")
    return m


def query_colours(colour_fn: Callable, vertices: np.ndarray, device: str, chunk: int = 1 << 18) -> np.ndarray:
    """Vertex colours (V, 3) uint8 from a colour query on unit-sphere points."""
    import torch

    out = np.empty((len(vertices), 3), np.uint8)
    with torch.no_grad():
        for s in range(0, len(vertices), chunk):
            p = torch.as_tensor(vertices[s:s + chunk], dtype=torch.float32, device=device)
            rgb = colour_fn(p).float().clamp(0, 1)
            out[s:s + chunk] = (rgb * 255 + 0.5).to(torch.uint8).cpu().numpy()
    return out


def write_ply(path: Path, vertices: np.ndarray, faces: np.ndarray, colours: np.ndarray | None = None) -> None:
    """Binary little-endian PLY by trimesh's exporter (float32 xyz, uchar rgba when ``colours`` are
    given, int32 faces), written atomically (0644)."""
    import trimesh
    from trimesh.exchange.ply import export_ply

    mesh = trimesh.Trimesh(vertices, faces, vertex_colors=colours, process=False)
    data = export_ply(mesh, encoding="binary", vertex_normal=False)
    with atomic_file(path) as fh:
        fh.write(data)


def transform_points(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ m[:3, :3].T + m[:3, 3]


def run(inputs: dict[str, Path], cfg: Any, out_dir: Path, ctx: Context) -> dict:
    """Mesh the trained SDF into ``out_dir/mesh_raw.ply`` (world coordinates) + ``mesh.json``."""
    from stages.mesh.blocks import Grid, check_grid, compute_mesh

    try:
        check_grid(Grid(cfg.resolution, cfg.block_res, cfg.coarse_factor, cfg.skip_margin))
    except ValueError as exc:
        raise ConfigError(f"mesh: {exc}") from None
    out_dir = Path(out_dir)
    unit_to_world = read_unit_to_world(inputs["sfm_points"])
    devices = helper_devices(ctx.device, cfg.gpus)
    model = load_model(inputs["train"], ctx.device)
    blocks_dir = out_dir / "blocks"
    stats: dict = {}
    ctx.log.info("mesh: marching cubes at %d^3 in %d^3 blocks on %s", cfg.resolution, cfg.block_res,
                 ", ".join([str(ctx.device), *devices]))
    factory = functools.partial(load_sdf_on, Path(inputs["train"]))
    try:
        vertices, faces = compute_mesh(model.sdf, cfg.resolution, cfg.block_res, ctx.device,
                                       coarse_factor=cfg.coarse_factor, skip_margin=cfg.skip_margin,
                                       chunk=cfg.eval_chunk, blocks_dir=blocks_dir, workers=ctx.threads,
                                       progress=ctx.progress, stats=stats, helpers=[(factory, d) for d in devices])
    except BrokenProcessPool:
        raise StageError(f"mesh: a helper process on {', '.join(devices)} died (out of memory?); rerun to "
                         "resume from the finished blocks, or set mesh.gpus=1") from None
    if len(faces) == 0:
        raise StageError(f"mesh: the SDF has no surface inside the bounding sphere at resolution "
                         f"{cfg.resolution}; training probably failed (check train.json losses) "
                         "or the scene bounds are wrong (sfm_points/scene.json)")
    colours = None
    if cfg.vertex_colors and model.load_colour is not None:
        model.sdf = None  # free the SDF copy before the colour network loads
        colours = query_colours(model.load_colour(), vertices, ctx.device)
    write_ply(out_dir / "mesh_raw.ply", transform_points(unit_to_world, vertices), faces, colours)
    summary = {**stats, "vertex_colours": colours is not None,
               "peak_gpu_gib": round(stats["peak_gpu_bytes"] / 2**30, 3)}
    atomic_write_json(out_dir / "mesh.json", summary)
    shutil.rmtree(blocks_dir, ignore_errors=True)
    ctx.log.info("mesh: %d vertices, %d faces, %d/%d blocks evaluated, %.1f s", len(vertices), len(faces),
                 stats["blocks_evaluated"], stats["blocks_total"], stats["seconds"])
    return summary
