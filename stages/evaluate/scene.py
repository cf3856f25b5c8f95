"""What the evaluation looks at: the scene's stage folders and ground truth (EvalScene), the mesh,
and the view helpers that the metrics and the report share (held-out views, picked views, masks, cameras)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cameras import Cameras, load_transforms
from pipeline.errors import InputError
from pipeline.images import MESH_SUFFIXES

HOLDOUT_EVERY = 8  # without train.json holdout_views: views 0, 8, 16, ... are taken as held out


@dataclass
class EvalScene:
    """Everything the metrics and the report read, loaded once from the upstream folders."""

    inputs: dict[str, Path]
    vertices: np.ndarray  # (V, 3) reconstruction in the SfM world
    faces: np.ndarray  # (F, 3)
    colors: np.ndarray | None  # (V, 3) uint8 vertex colours or None
    cams: Cameras  # SfM cameras (undistorted PINHOLE), names "images/<file>"
    frames_meta: dict
    gt_dir: Path | None


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing; rerun the stage that writes it") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None


def load_mesh(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Vertices, faces and vertex colours (uint8 RGB, or None) of a mesh file."""
    import trimesh

    if not Path(path).is_file():
        raise InputError(f"{path}: mesh file missing; rerun the cleanup stage")
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types on bad files
        raise InputError(f"{path}: cannot read the mesh ({type(exc).__name__}: {exc})") from None
    colors = None
    if getattr(mesh.visual, "kind", None) == "vertex":
        colors = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(np.uint8)
    return np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64), colors


def in_world(vertices: np.ndarray, cleanup_dir: Path) -> np.ndarray:
    """Cleanup's vertices in the SfM world: undoes the ``cleanup.up_axis`` turn (cleanup.json
    ``upright.world_from_export``) when the mesh was exported upright."""
    path = Path(cleanup_dir) / "cleanup.json"
    upright = read_json(path).get("upright") if path.is_file() else None
    if not upright:
        return vertices
    m = np.asarray(upright["world_from_export"], np.float64)
    return vertices @ m[:3, :3].T + m[:3, 3]


def load_scene(inputs: dict[str, Path]) -> EvalScene:
    vertices, faces, colors = load_mesh(inputs["cleanup"] / "mesh.ply")
    vertices = in_world(vertices, inputs["cleanup"])
    cams = load_transforms(inputs["sfm"] / "transforms.json")
    frames_meta = read_json(inputs["frames"] / "frames.json")
    gt_dir = inputs["frames"] / frames_meta["gt"] if frames_meta.get("gt") else None
    if gt_dir is not None and not gt_dir.is_dir():
        raise InputError(f"{gt_dir}: frames.json names a ground-truth folder that is missing")
    return EvalScene(inputs, vertices, faces, colors, cams, frames_meta, gt_dir)


def find_gt_mesh(gt_dir: Path) -> Path | None:
    preferred = gt_dir / "gt_mesh.ply"
    if preferred.is_file():
        return preferred
    found = sorted(p for p in gt_dir.rglob("*") if p.suffix.lower() in MESH_SUFFIXES)
    return found[0] if found else None


def gt_info(gt_dir: Path) -> dict:
    """``gt.json`` of a ground-truth folder, or {} when there is none (or it does not parse)."""
    try:
        info = json.loads((gt_dir / "gt.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def scaled_camera(K: np.ndarray, width: int, height: int, max_side: int) -> tuple[np.ndarray, int, int]:
    """Intrinsics and size of an image scaled so its long side is at most ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    return np.diag([w / width, h / height, 1.0]) @ K, w, h


def pick_views(n: int, max_views: int) -> list[int]:
    if max_views <= 0 or max_views >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, max_views).round().astype(int).tolist()))


def held_out_views(scene: EvalScene, cfg: Any) -> list[int]:
    """Views the train stage held out: train.json ``holdout_views`` (indices or names) when given,
    else every HOLDOUT_EVERY-th view from view 0 when there are at least twice that many."""
    info = scene.inputs.get("train")
    data = read_json(info / "train.json") if info and (info / "train.json").is_file() else {}
    given = data.get("holdout_views")
    if isinstance(given, list):
        index = {Path(n).stem: i for i, n in enumerate(scene.cams.names)}
        out = [int(v) if isinstance(v, int) else index.get(Path(str(v)).stem, -1) for v in given]
        return [i for i in out if 0 <= i < len(scene.cams)]
    n = len(scene.cams)
    return list(range(0, n, HOLDOUT_EVERY)) if cfg.holdout and n >= 2 * HOLDOUT_EVERY else []


def bounding_sphere(scene: EvalScene) -> tuple[np.ndarray, float]:
    """Centre and radius of the bounding sphere: sfm_points' ``scene.json``, else the one in the
    SfM cameras' transforms.json, else the camera centres' mean and radius 1."""
    sp = scene.inputs.get("sfm_points")
    info = read_json(sp / "scene.json") if sp and (sp / "scene.json").is_file() else {}
    center = info.get("sphere_center", scene.cams.extra.get("sphere_center", scene.cams.centers.mean(0)))
    return np.asarray(center, np.float64), float(info.get("sphere_radius", scene.cams.extra.get("sphere_radius", 1.0)))
