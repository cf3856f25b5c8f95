"""Load the object mesh, normalise it by a similarity into the synthetic world frame, and
prepare per-corner attributes (UVs or colours, smooth normals) for the rasteriser.

World frame: z up, ground plane z = 0, the object centred on the z axis resting on the ground.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image

from pipeline.errors import InputError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "spot"
SPOT_MESH = ASSET_DIR / "spot_triangulated.obj"
SPOT_TEXTURE = ASSET_DIR / "spot_texture.png"

# Rotations taking the source "up" axis to world +z (right-handed, proper rotations).
_UP_ROTATIONS = {
    "z": np.eye(3),
    "y": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),  # (x, y, z) -> (x, -z, y)
    "x": np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),  # (x, y, z) -> (-z, y, x)
}


@dataclass
class ObjectMesh:
    """The normalised object, ready to render, plus its ground truth."""

    vertices: torch.Tensor  # (V, 3) float32 world positions (may repeat along UV seams)
    faces: torch.Tensor  # (F, 3) int64
    corner_attrs: torch.Tensor  # (F, 3, C) float32: uv (C=2+3) or rgb (C=3+3), then normal
    texture: torch.Tensor | None  # (1, 3, H, W) float32 in [0, 1]; None -> attrs carry rgb
    transform: np.ndarray  # (4, 4) similarity: transform @ source_vertex = world_vertex
    gt_mesh: trimesh.Trimesh  # closed (seams merged) mesh in world coordinates
    source_name: str


def load_source(mesh_path: str | Path | None) -> trimesh.Trimesh:
    """Read a mesh file as one triangle mesh (UV seams kept as duplicate vertices)."""
    path = SPOT_MESH if mesh_path is None else Path(mesh_path)
    if not path.is_file():
        raise InputError(f"{path}: mesh file not found")
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types for bad files
        raise InputError(f"{path}: cannot read mesh ({type(exc).__name__}: {exc})") from None
    if len(mesh.faces) == 0:
        raise InputError(f"{path}: mesh has no faces")
    return mesh


def normalising_similarity(vertices: np.ndarray, up_axis: str, size: float) -> np.ndarray:
    """4x4 similarity: source up axis -> +z, bbox diagonal -> ``size``, bbox centred on the
    z axis with its bottom on z = 0."""
    if up_axis not in _UP_ROTATIONS:
        raise InputError(f"mesh_up_axis must be one of {sorted(_UP_ROTATIONS)}, got {up_axis!r}")
    rot = _UP_ROTATIONS[up_axis]
    rotated = vertices @ rot.T
    lo, hi = rotated.min(0), rotated.max(0)
    diag = float(np.linalg.norm(hi - lo))
    if not diag > 0:
        raise InputError("mesh is degenerate (zero-size bounding box)")
    scale = size / diag
    centre = 0.5 * (lo + hi)
    transform = np.eye(4)
    transform[:3, :3] = scale * rot
    transform[:3, 3] = -scale * np.array([centre[0], centre[1], lo[2]]) + 0.0  # no "-0.0" in JSON
    return transform


def smooth_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals, shared across vertices with identical positions (so UV
    seams do not show in the shading)."""
    _, inverse = np.unique(vertices, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    tri = vertices[faces]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 * area
    acc = np.zeros((inverse.max() + 1, 3))
    for k in range(3):
        np.add.at(acc, inverse[faces[:, k]], face_n)
    acc /= np.maximum(np.linalg.norm(acc, axis=1, keepdims=True), 1e-12)
    return acc[inverse]


def procedural_colours(points: np.ndarray, seed: int) -> np.ndarray:
    """Smooth, varied per-vertex colours from a few random 3D sinusoids (for meshes without UVs)."""
    rng = np.random.default_rng(seed + 7919)
    dirs = rng.normal(size=(3, 4, 3))
    freqs = np.array([6.0, 11.0, 19.0, 31.0])
    phases = rng.uniform(0, 2 * np.pi, size=(3, 4))
    colour = np.zeros((len(points), 3))
    for c in range(3):
        waves = np.sin(freqs * (points @ dirs[c].T) + phases[c])  # (V, 4)
        colour[:, c] = 0.55 + 0.35 * (waves @ np.array([0.5, 0.3, 0.2, 0.15]))
    return np.clip(colour, 0.05, 1.0)


def _texture_image(mesh: trimesh.Trimesh, mesh_path, texture_path) -> Image.Image | None:
    if texture_path is not None:
        if not Path(texture_path).is_file():
            raise InputError(f"{texture_path}: texture file not found")
        return Image.open(texture_path)
    if mesh_path is None:
        return Image.open(SPOT_TEXTURE)
    image = getattr(getattr(mesh.visual, "material", None), "image", None)
    # trimesh puts a 2x2 placeholder image on OBJ files without a material: not a texture.
    if image is not None and min(image.size) > 2:
        return image
    return None


def _vertex_colours(mesh: trimesh.Trimesh) -> np.ndarray | None:
    if getattr(mesh.visual, "kind", None) == "vertex":
        colours = np.asarray(mesh.visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
        if len(colours) == len(mesh.vertices) and np.ptp(colours) > 0:
            return colours
    return None


def prepare_object(mesh_path, texture_path, up_axis: str, size: float, seed: int) -> ObjectMesh:
    """Load and normalise the object; pick its colour source (texture, vertex colours, or
    procedural colours from position) and build per-corner attributes."""
    mesh = load_source(mesh_path)
    transform = normalising_similarity(np.asarray(mesh.vertices, np.float64), up_axis, size)
    verts = np.asarray(mesh.vertices, np.float64) @ transform[:3, :3].T + transform[:3, 3]
    faces = np.asarray(mesh.faces, np.int64)
    normals = smooth_normals(verts, faces)[faces]
    uv = getattr(mesh.visual, "uv", None)
    image = _texture_image(mesh, mesh_path, texture_path) if uv is not None and len(uv) == len(verts) else None
    texture = None
    if image is not None:
        first = np.asarray(uv, np.float64)[faces]
        rgb = np.asarray(image.convert("RGB"), np.float32) / 255.0
        texture = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()
    else:
        colours = _vertex_colours(mesh)
        first = (colours if colours is not None else procedural_colours(verts, seed))[faces]
    attrs = np.concatenate([first, normals], axis=2)
    gt = trimesh.Trimesh(verts.copy(), faces.copy(), process=False)
    gt.merge_vertices(merge_tex=True, merge_norm=True)
    name = SPOT_MESH.name if mesh_path is None else Path(mesh_path).name
    return ObjectMesh(torch.from_numpy(verts).float(), torch.from_numpy(faces), torch.from_numpy(attrs).float(),
                      texture, transform, gt, name)
