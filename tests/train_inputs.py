"""Test helper: build the train stage's three input folders (sfm/, masks/, sfm_points/) from
ground truth, plus geometry scoring (marching cubes, Chamfer-L1, F-score).

Two sources: ``analytic_scene`` ray-casts a textured sphere-on-a-box over a textured ground
and dome in a second (fast, for CI); ``from_synthetic`` takes a ``pipeline.synthetic`` gt/
folder (spot). SfM points are exact surface samples listed for the views that face them and
see them inside the mask.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.cameras import Cameras, frame_paths, intrinsics, look_at, project, save_transforms

# The fast_cpu preset's train section as proposed to the lead (configs/fast_cpu.yaml); tests and
# benchmarks use it only while that file has no train section.
FAST_CPU_TRAIN = {
    "iterations": 1200, "batch_rays": 512, "views_per_batch": 4, "samples_per_ray": 12, "ray_candidates": 64,
    "occ_resolution": 32, "grid_levels": 8, "grid_features": 2, "grid_log2_table": 15, "grid_base_res": 8,
    "grid_max_res": 128, "sdf_hidden": 64, "feature_dim": 32, "color_layers": 3, "color_hidden": 64,
    "c2f_init_levels": 4, "c2f_step": 150, "warmup_steps": 50, "lr": 5e-3, "lr_grid_mult": 4.0,
    "cos_anneal_steps": 300, "curvature_weight": 5e-4, "curvature_warmup_steps": 200, "sfm_loss_steps": 600,
    "occ_warmup_steps": 100,
    "checkpoint_every": 400, "log_every": 50, "holdout_eval_views": 2,
}


def fast_cpu_train_config():
    """``load_preset("fast_cpu").train``, or FAST_CPU_TRAIN while the preset has no train section."""
    import dataclasses

    from pipeline.config import TrainConfig, load_preset

    cfg = load_preset("fast_cpu").train
    return dataclasses.replace(TrainConfig(), **FAST_CPU_TRAIN) if cfg == TrainConfig() else cfg


LIGHT = np.array([0.35, -0.45, 0.82]) / np.linalg.norm([0.35, -0.45, 0.82])
SPHERE_C, SPHERE_R = np.array([0.08, 0.0, 0.42]), 0.2
BOX_LO, BOX_HI = np.array([-0.3, -0.18, 0.06]), np.array([0.3, 0.18, 0.3])


def orbit(n: int, width: int, height: int, radius: float, target: np.ndarray, fov_deg: float = 50.0,
          below: bool = False) -> Cameras:
    """Cameras on an orbit around ``target`` at 25 +- 8 degrees elevation; with ``below`` every
    other camera looks from 25 degrees below instead."""
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    K = intrinsics(f, f, width / 2, height / 2)
    c2w = []
    for i in range(n):
        az = 2 * math.pi * i / n
        el = math.radians((-1 if below and i % 2 else 1) * (25 + 8 * math.sin(3 * az)))
        eye = target + radius * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        c2w.append(look_at(eye, target, np.array([0.0, 0.0, 1.0])))
    return Cameras([f"images/{i:06d}.png" for i in range(n)], np.repeat(K[None], n, 0), np.stack(c2w), width, height)


def _hit_sphere(o, d, c, r):
    oc = o - torch.as_tensor(c, dtype=o.dtype)
    b = (oc * d).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - r * r)
    t = -b - torch.sqrt(disc.clamp_min(0))
    t = torch.where((disc > 0) & (t > 0), t, torch.full_like(t, np.inf))
    n = torch.nn.functional.normalize(o + t[:, None] * d - torch.as_tensor(c, dtype=o.dtype), dim=-1)
    return t, n


def _hit_box(o, d, lo, hi):
    lo, hi = torch.as_tensor(lo, dtype=o.dtype), torch.as_tensor(hi, dtype=o.dtype)
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t0, t1 = (lo - o) * inv, (hi - o) * inv
    tmin, tmax = torch.minimum(t0, t1), torch.maximum(t0, t1)
    t_enter, axis = tmin.max(-1)
    t_exit = tmax.min(-1).values
    ok = (t_enter < t_exit) & (t_enter > 0)
    t = torch.where(ok, t_enter, torch.full_like(t_enter, np.inf))
    n = torch.zeros_like(o)
    n.scatter_(1, axis[:, None], -torch.sign(d.gather(1, axis[:, None])))
    return t, n


def _texture(p: torch.Tensor, scale: float, palette: np.ndarray) -> torch.Tensor:
    cells = torch.floor(p * scale).long()
    checker = (cells.sum(-1) % 2).float()
    wave = 0.5 + 0.5 * torch.sin(p[:, 0] * scale * 2.3 + 1.7 * torch.sin(p[:, 1] * scale * 1.9) + p[:, 2] * scale)
    pal = torch.as_tensor(palette, dtype=p.dtype)
    col = pal[0] * checker[:, None] + pal[1] * (1 - checker[:, None])
    return col * (0.55 + 0.45 * wave[:, None])


def _shade(o, d, background: bool, ground: bool):
    ts, ns = _hit_sphere(o, d, SPHERE_C, SPHERE_R)
    tb, nb = _hit_box(o, d, BOX_LO, BOX_HI)
    t_obj = torch.minimum(ts, tb)
    n_obj = torch.where((ts <= tb)[:, None], ns, nb)
    hit = torch.isfinite(t_obj)
    p = o + torch.where(hit, t_obj, torch.zeros_like(t_obj))[:, None] * d
    light = torch.as_tensor(LIGHT, dtype=o.dtype)
    obj = _texture(p, 9.0, np.array([[0.9, 0.35, 0.2], [0.2, 0.5, 0.85]]))
    obj = obj * (0.4 + 0.6 * (n_obj * light).sum(-1).clamp_min(0))[:, None]
    if background:
        tg = torch.where(d[:, 2] < -1e-6, -o[:, 2] / d[:, 2].clamp(max=-1e-6), torch.full_like(d[:, 2], np.inf))
        tg = tg if ground else torch.full_like(tg, np.inf)
        b = (o * d).sum(-1)
        tdome = -b + torch.sqrt((b * b - ((o * o).sum(-1) - 36.0)).clamp_min(0))
        ground = tg < tdome
        pb = o + torch.where(ground, tg, tdome)[:, None] * d
        bg = torch.where(ground[:, None], _texture(pb, 3.0, np.array([[0.75, 0.7, 0.5], [0.3, 0.45, 0.3]])),
                         _texture(pb, 1.5, np.array([[0.6, 0.7, 0.9], [0.85, 0.8, 0.7]])))
    else:
        bg = torch.zeros_like(obj)
    return torch.where(hit[:, None], obj, bg), hit


def render_analytic(cams: Cameras, i: int, background: bool, ground: bool = True,
                    ss: int = 2) -> tuple[np.ndarray, np.ndarray]:
    w, h = cams.width * ss, cams.height * ss
    j, r = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    uv = np.stack([j.ravel(), r.ravel()], -1) / ss
    K, c2w = cams.K[i], cams.c2w[i]
    x = (uv - K[:2, 2]) / np.array([K[0, 0], K[1, 1]])
    dirs = np.concatenate([x, np.ones((len(uv), 1))], 1) @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    o = torch.as_tensor(np.broadcast_to(c2w[:3, 3], dirs.shape).copy())
    rgb, hit = _shade(o, torch.as_tensor(dirs), background, ground)
    rgb = rgb.view(cams.height, ss, cams.width, ss, 3).mean((1, 3)).clamp(0, 1).numpy()
    cover = hit.double().view(cams.height, ss, cams.width, ss).mean((1, 3)).numpy()
    return (rgb * 255 + 0.5).astype(np.uint8), cover >= 0.5


def analytic_surface(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points and normals on the surface of the sphere-box union (world)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(4 * n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sp, sn = SPHERE_C + SPHERE_R * v, v
    keep = ~np.all((sp > BOX_LO + 1e-9) & (sp < BOX_HI - 1e-9), axis=1)
    size = BOX_HI - BOX_LO
    areas = np.array([size[1] * size[2], size[0] * size[2], size[0] * size[1]])
    axis = rng.choice(3, size=4 * n, p=np.repeat(areas, 1) / areas.sum())
    side = rng.integers(0, 2, size=4 * n)
    bp = BOX_LO + rng.random((4 * n, 3)) * size
    bp[np.arange(4 * n), axis] = np.where(side, BOX_HI[axis], BOX_LO[axis])
    bn = np.zeros_like(bp)
    bn[np.arange(4 * n), axis] = np.where(side, 1.0, -1.0)
    bkeep = np.linalg.norm(bp - SPHERE_C, axis=1) > SPHERE_R
    area_s = 4 * np.pi * SPHERE_R ** 2 * keep.mean()
    area_b = 2 * areas.sum() * bkeep.mean()
    ns = int(round(n * area_s / (area_s + area_b)))
    pts = np.concatenate([sp[keep][:ns], bp[bkeep][: n - ns]])
    nrm = np.concatenate([sn[keep][:ns], bn[bkeep][: n - ns]])
    return pts, nrm


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def build_inputs(root: Path, cams: Cameras, images: list[np.ndarray], masks: list[np.ndarray] | None,
                 points: np.ndarray, normals: np.ndarray, center: np.ndarray, radius: float) -> dict[str, Path]:
    """Write sfm/, masks/ and sfm_points/ under ``root``; returns the ``inputs`` mapping."""
    sfm, mdir, pdir = root / "sfm", root / "masks", root / "sfm_points"
    for d in (sfm, mdir, pdir):
        d.mkdir(parents=True, exist_ok=True)
    for name, img in zip(cams.names, images):
        _write_png(sfm / name, img)
    save_transforms(sfm / "transforms.json", cams)
    if masks is None:
        (mdir / "masks.json").write_text(json.dumps({"method": "none"}))
    else:
        for name, m in zip(cams.names, masks):
            _write_png(mdir / "masks" / f"{Path(name).stem}.png", m.astype(np.uint8) * 255)
        (mdir / "masks.json").write_text(json.dumps({"method": "provided"}))
    w2u, u2w = np.eye(4), np.eye(4)
    w2u[:3, :3] /= radius
    w2u[:3, 3] = -np.asarray(center) / radius
    u2w[:3, :3] *= radius
    u2w[:3, 3] = center
    scene = {"sphere_center": list(map(float, center)), "sphere_radius": float(radius),
             "world_to_unit": w2u.tolist(), "unit_to_world": u2w.tolist()}
    (pdir / "scene.json").write_text(json.dumps(scene))
    images, mask_paths = frame_paths(cams, sfm, pdir, mdir / "masks")  # as sfm_points names them
    save_transforms(pdir / "transforms.json", dataclasses.replace(cams, names=images), mask_paths=mask_paths,
                    extra={"sphere_center": list(map(float, center)), "sphere_radius": float(radius)})
    np.save(pdir / "points.npy", points.astype(np.float32))
    offsets, indices = [0], []
    for i in range(len(cams)):
        uv, depth = project(points, cams.K[i], cams.w2c[i])
        facing = ((cams.c2w[i][:3, 3] - points) * normals).sum(1) > 0
        inside = (uv[:, 0] >= 0) & (uv[:, 0] < cams.width) & (uv[:, 1] >= 0) & (uv[:, 1] < cams.height) & (depth > 0)
        seen = facing & inside
        if masks is not None:
            ij = np.clip(uv[seen].astype(int), 0, [cams.width - 1, cams.height - 1])
            seen[np.flatnonzero(seen)[~masks[i][ij[:, 1], ij[:, 0]]]] = False
        indices.extend(np.flatnonzero(seen).tolist())
        offsets.append(len(indices))
    np.save(pdir / "view_offsets.npy", np.asarray(offsets, np.int64))
    np.save(pdir / "view_indices.npy", np.asarray(indices, np.int64))
    return {"sfm": sfm, "masks": mdir, "sfm_points": pdir}


def analytic_scene(root: Path, views: int = 24, width: int = 96, height: int = 72, background: bool = True,
                   use_masks: bool = True, n_points: int = 1500, ground: bool = False) -> tuple[dict[str, Path], np.ndarray]:
    """Inputs for the sphere-on-a-box scene and dense GT surface samples (world) for scoring.
    Without ``ground`` (textured dome only) half the cameras look from below, so every part of
    the surface is seen; with it, all cameras are above the ground plane (z = 0)."""
    target = np.array([0.0, 0.0, 0.3])
    cams = orbit(views, width, height, 2.0, target, below=not ground)
    rendered = [render_analytic(cams, i, background, ground) for i in range(views)]
    points, normals = analytic_surface(n_points, seed=1)
    inputs = build_inputs(Path(root), cams, [r[0] for r in rendered], [r[1] for r in rendered] if use_masks else None,
                          points, normals, target, 0.55)
    return inputs, analytic_surface(20000, seed=2)[0]


def from_synthetic(gt_dir: Path, root: Path, n_points: int = 3000, margin: float = 1.1, seed: int = 0,
                   use_masks: bool = True) -> tuple[dict[str, Path], np.ndarray]:
    """Inputs from a ``pipeline.synthetic`` gt/ folder; returns them and GT surface samples."""
    import trimesh

    from pipeline.cameras import load_transforms

    gt_dir = Path(gt_dir)
    cams = load_transforms(gt_dir / "transforms.json")
    images = [np.asarray(Image.open(gt_dir / n).convert("RGB")) for n in cams.names]
    masks = [np.asarray(Image.open(gt_dir / "masks" / f"{Path(n).stem}.png")) > 127 for n in cams.names]
    mesh = trimesh.load(gt_dir / "gt_mesh.ply", process=False)
    pts, face = trimesh.sample.sample_surface(mesh, n_points, seed=seed)
    info = json.loads((gt_dir / "gt.json").read_text())
    inputs = build_inputs(Path(root), cams, images, masks if use_masks else None, np.asarray(pts),
                          mesh.face_normals[face], np.asarray(info["sphere_center"]), info["sphere_radius"] * margin)
    gt_pts, _ = trimesh.sample.sample_surface(mesh, 100000, seed=seed + 1)
    return inputs, np.asarray(gt_pts)


def mesh_from_sdf(sdf_query, resolution: int = 96, slab: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of the zero level set inside the unit sphere; world vertices, faces.
    The SDF is evaluated ``slab`` z-planes at a time (memory stays small at high resolution)."""
    from skimage.measure import marching_cubes

    lin = np.linspace(-1.0, 1.0, resolution, dtype=np.float32)
    vol = np.empty((resolution,) * 3, np.float32)
    xx, yy = np.meshgrid(lin, lin, indexing="ij")
    for k in range(0, resolution, slab):
        zs = lin[k:k + slab]
        pts = np.stack([np.repeat(xx[..., None], len(zs), 2), np.repeat(yy[..., None], len(zs), 2),
                        np.broadcast_to(zs, (resolution, resolution, len(zs)))], -1).reshape(-1, 3)
        sdf = sdf_query(torch.from_numpy(pts)).float().cpu().numpy()
        sdf = np.where(np.linalg.norm(pts, axis=1) > 0.98, np.maximum(sdf, 1e-3), sdf)
        vol[:, :, k:k + slab] = sdf.reshape(resolution, resolution, len(zs))
    if vol.min() > 0 or vol.max() < 0:
        return np.zeros((0, 3)), np.zeros((0, 3), int)
    verts, faces, _, _ = marching_cubes(vol, 0.0, spacing=(2.0 / (resolution - 1),) * 3)
    verts = verts - 1.0
    u2w = sdf_query.unit_to_world
    return verts @ u2w[:3, :3].T + u2w[:3, 3], faces


def largest_component(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    if len(faces) == 0:
        return verts, faces
    parts = trimesh.Trimesh(verts, faces, process=False).split(only_watertight=False)
    best = max(parts, key=lambda m: len(m.faces))
    return np.asarray(best.vertices), np.asarray(best.faces)


def sample_mesh(verts: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    import trimesh

    if len(faces) == 0:
        return np.zeros((0, 3))
    pts, _ = trimesh.sample.sample_surface(trimesh.Trimesh(verts, faces, process=False), n, seed=seed)
    return np.asarray(pts)


def chamfer_fscore(pred: np.ndarray, gt: np.ndarray, tau: float) -> tuple[float, float]:
    """Symmetric Chamfer-L1 (mean of both directions' mean distances) and F-score at ``tau``."""
    from scipy.spatial import cKDTree

    if len(pred) == 0:
        return float("inf"), 0.0
    d_pg = cKDTree(gt).query(pred)[0]
    d_gp = cKDTree(pred).query(gt)[0]
    precision, recall = (d_pg < tau).mean(), (d_gp < tau).mean()
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return float(0.5 * (d_pg.mean() + d_gp.mean())), float(f)


def copy_inputs(inputs: dict[str, Path], root: Path) -> dict[str, Path]:
    out = {}
    for k, v in inputs.items():
        shutil.copytree(v, Path(root) / k)
        out[k] = Path(root) / k
    return out


def background_volume(sdf_query, inputs: dict[str, Path], resolution: int = 64, dilate_px: int = 2) -> float:
    """Share of the SDF < 0 volume inside the unit sphere that lies outside the visual hull of
    the (dilated) masks: solid background (ground, backdrop) that the model kept."""
    from scipy.ndimage import binary_dilation

    from pipeline.cameras import load_transforms

    cams = load_transforms(Path(inputs["sfm_points"]) / "transforms.json")
    lin = np.linspace(-1.0, 1.0, resolution, dtype=np.float32)
    grid = np.stack(np.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.linalg.norm(grid, axis=1) < 1.0]
    solid = sdf_query(torch.from_numpy(grid)).cpu().numpy() < 0
    if not solid.any():
        return 0.0
    world = grid.astype(np.float64) @ sdf_query.unit_to_world[:3, :3].T + sdf_query.unit_to_world[:3, 3]
    hull = np.ones(len(grid), bool)
    for i, name in enumerate(cams.names):
        mask = np.asarray(Image.open(Path(inputs["masks"]) / "masks" / f"{Path(name).stem}.png")) > 127
        mask = binary_dilation(mask, iterations=dilate_px)
        uv, depth = project(world, cams.K[i], cams.w2c[i])
        ij = np.floor(uv).astype(int)
        seen = (depth > 0) & (ij[:, 0] >= 0) & (ij[:, 0] < cams.width) & (ij[:, 1] >= 0) & (ij[:, 1] < cams.height)
        inside = np.ones(len(grid), bool)
        inside[seen] = mask[ij[seen, 1], ij[seen, 0]]
        hull &= inside
    return float((solid & ~hull).sum() / solid.sum())


def sigterm_at(step_to_stop: int):
    """A ``run_stage`` hook that sends this process SIGTERM at ``step_to_stop`` (the stage stops
    after the next step, with a checkpoint)."""
    import os
    import signal

    def hook(step, loss):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss
    return hook


def eager_compiled_graph_runs(scene: dict[str, Path], base: dict, root: Path) -> dict[str, dict]:
    """Train ``base`` three times on CUDA: eager, compiled, compiled + CUDA graphs, with eager
    random numbers so the runs can be compared step for step. Asserts each compiled as asked,
    recovered from nothing and skipped no graph; returns the three train.json dicts by name."""
    import logging

    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters

    from pipeline.config import TrainConfig
    from pipeline.dag import Context
    from stages.train.stage import run_stage

    cuda = Context(scene="test", device="cuda", progress=False, log=logging.getLogger("train_inputs"))
    runs = {}
    with torch._inductor.config.patch(fallback_random=True):
        for name, change in (("eager", {"compile": "off"}), ("compiled", {"compile": "on", "cuda_graphs": "off"}),
                             ("graphs", {"compile": "on", "cuda_graphs": "on"})):
            torch._dynamo.reset()
            counters.clear()
            run_stage(scene, TrainConfig(**base, **change), root / name, cuda)
            info = json.loads((root / name / "train.json").read_text())
            assert info["compiled"] == (name != "eager") and info["nonfinite_recoveries"] == 0
            assert counters["inductor"]["cudagraph_skips"] == 0
            runs[name] = info
    return runs
