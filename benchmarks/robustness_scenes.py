"""The scenes of ``benchmarks/robustness.py``: procedural meshes (trimesh), their looks (plain,
procedural, coloured like the background, dark) and framings (small, frame-filling, low and high
orbits), rendered once by ``pipeline.synthetic`` and cached; plus the real sets under --data."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import trimesh

from bench_paths import ROOT

SPOT_TEXTURE = ROOT / "pipeline" / "assets" / "spot" / "spot_texture.png"  # the shipped Spot's texture
LARGE = {"radius": 1.5, "fov_deg": 32.0}  # object cut by the frame border in most views
SMALL = {"radius": 5.0}  # object ~15% of the frame width (~2% of its area)


@dataclass(frozen=True)
class Scene:
    name: str
    shape: str  # "spot", a key of SHAPES, or "real"
    look: str = "procedural"  # texture | procedural | plain | camo | camo_plain | dark
    colour: tuple = (190, 70, 50)
    spec: dict = field(default_factory=dict)  # SceneSpec overrides
    note: str = ""
    real: str = ""  # folder under --data for real sets
    dataset: str = ""  # real sets: read as this --dataset --format (the set's own cameras), not --images


SCENES = [
    Scene("spot", "spot", "texture", note="the tuned reference"),
    Scene("spot_small", "spot", "texture", spec=SMALL, note="small in the frame"),
    Scene("spot_large", "spot", "texture", spec=LARGE, note="cut by the frame border"),
    Scene("spot_dark", "spot", "dark", spec={"background": False, "background_color": (14, 14, 16), "radius": 1.4},
          note="darkened texture on a flat dark background, closer"),
    Scene("torus_plain", "torus", "plain", note="textureless, tilted torus"),
    Scene("torus_plain_large", "torus", "plain", spec=LARGE, note="textureless, frame-filling"),
    Scene("mug_plain", "mug", "plain", colour=(225, 225, 230), note="white mug, thin handle"),
    Scene("bumpy", "bumpy", "procedural", note="displaced icosphere, procedural colours"),
    Scene("frame_camo", "frame", "camo", note="box with a hole, background texture"),
    Scene("mug_camo_plain", "mug", "camo_plain", note="plain, the ground's median colour"),
    Scene("table_plain", "table", "plain", colour=(150, 110, 70), note="thin legs, textureless"),
    Scene("rings3_plain", "rings3", "plain", colour=(70, 120, 180), note="three overlapping rings (genus 3)"),
    Scene("torus_small", "torus", "plain", spec=SMALL, note="textureless, small in the frame"),
    Scene("bumpy_low", "bumpy", "procedural", spec={"elevation_deg": 8.0, "elevation_wobble_deg": 2.0},
          note="low orbit (8 deg): the horizon behind the object"),
    Scene("bumpy_high", "bumpy", "procedural", spec={"elevation_deg": 60.0}, note="high orbit (60 deg)"),
    Scene("mug_dark", "mug", "plain", colour=(38, 36, 40), note="near-black plain mug"),
    Scene("dino", "real", real="middlebury/dinoSparseRing", note="textureless, 16 photos"),
    Scene("temple", "real", real="middlebury/templeSparseRing", note="textured, 16 photos"),
    Scene("dino_cams", "real", real="middlebury/dinoSparseRing", dataset="middlebury",
          note="the dino with its own cameras: masks and bounds without SfM mapping"),
    Scene("temple_cams", "real", real="middlebury/templeSparseRing", dataset="middlebury",
          note="the temple with its own cameras"),
    Scene("skull", "real", real="skull/images", note="66 photos, no GT"),
]
BY_NAME = {s.name: s for s in SCENES}


# ---------------------------------------------------------------- shapes and scenes

def _rot(deg: float, axis) -> np.ndarray:
    return trimesh.transformations.rotation_matrix(np.radians(deg), axis)


def _torus():
    return trimesh.creation.torus(major_radius=0.35, minor_radius=0.12, major_sections=96,
                                  minor_sections=32).apply_transform(_rot(70, [1, 0, 0]))


def _mug():
    body = trimesh.creation.cylinder(radius=0.3, height=0.7, sections=96)
    handle = trimesh.creation.torus(major_radius=0.2, minor_radius=0.035, major_sections=64, minor_sections=16)
    handle.apply_transform(_rot(90, [1, 0, 0])).apply_translation([0.3, 0.0, 0.0])
    return trimesh.util.concatenate([body, handle])


def _bumpy():
    m, rng = trimesh.creation.icosphere(subdivisions=5, radius=0.5), np.random.default_rng(3)
    bump = np.sin(m.vertices @ rng.normal(size=(3, 6)) * 7.0 + rng.uniform(0, 2 * np.pi, 6)).sum(1) / 6.0
    return trimesh.Trimesh(m.vertices * (1.0 + 0.35 * bump)[:, None], m.faces)


def _frame():
    """A square ring (box with a square hole) standing in the xz plane, closed, subdivided."""
    ring = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    verts = [(r * x, y, r * z) for y in (-0.12, 0.12) for r in (0.5, 0.25) for x, z in ring]
    faces = []
    for a in range(4):
        b = (a + 1) % 4
        faces += [[a, b, 4 + b], [a, 4 + b, 4 + a], [8 + a, 12 + b, 8 + b], [8 + a, 12 + a, 12 + b],
                  [a, 8 + b, b], [a, 8 + a, 8 + b], [4 + a, 4 + b, 12 + b], [4 + a, 12 + b, 12 + a]]
    v, f = trimesh.remesh.subdivide_to_size(np.array(verts, float), np.array(faces), max_edge=0.03)
    m = trimesh.Trimesh(v, f)
    m.fix_normals()
    return m


def _table():
    """A square top on four thin legs (1/20 of the width)."""
    top = trimesh.creation.box([0.8, 0.8, 0.06])
    top.apply_translation([0, 0, 0.5])
    legs = [trimesh.creation.cylinder(radius=0.02, height=0.5, sections=24).apply_translation([x, y, 0.235])
            for x in (-0.33, 0.33) for y in (-0.33, 0.33)]
    return trimesh.util.concatenate([top, *legs])


def _rings3():
    """Three rings side by side, overlapping (genus 3 as seen), standing tilted."""
    rings = [trimesh.creation.torus(major_radius=0.2, minor_radius=0.06, major_sections=64, minor_sections=20)
             .apply_translation([x, 0, 0]) for x in (-0.36, 0.0, 0.36)]
    return trimesh.util.concatenate(rings).apply_transform(_rot(60, [1, 0, 0]))


SHAPES = {"torus": _torus, "mug": _mug, "bumpy": _bumpy, "frame": _frame, "table": _table, "rings3": _rings3}


def backdrop_sample(data: Path, width: int, height: int, seed: int = 0) -> np.ndarray:
    """RGB pixels of the ground next to the object, from one rendered view (cached)."""
    from pipeline.synthetic import SceneSpec, generate

    path = data / f"_backdrop_{width}x{height}_{seed}" / "gt" / "images" / "000000.png"
    if not path.is_file():
        shutil.rmtree(path.parents[2], ignore_errors=True)
        generate(path.parents[2], SceneSpec(num_views=1, width=width, height=height, output="images", seed=seed))
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)[int(0.72 * height):, : int(0.3 * width)]
    return np.clip(rgb * 1.25, 0, 255).astype(np.uint8)  # the object's shading is darker than the ground's


def write_mesh(scene: Scene, folder: Path, data: Path, width: int, height: int) -> tuple[Path, Path | None]:
    """Write the scene's mesh (and texture) into ``folder``; returns (mesh, texture or None)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    mesh = SHAPES[scene.shape]()
    if scene.look == "camo":
        v = mesh.vertices - mesh.vertices.mean(0)
        uv = np.stack([0.5 + np.arctan2(v[:, 1], v[:, 0]) / (2 * np.pi),
                       (v[:, 2] - v[:, 2].min()) / np.ptp(v[:, 2])], 1)
        texture = cv2.resize(backdrop_sample(data, width, height), (512, 512), interpolation=cv2.INTER_CUBIC)
        Image.fromarray(texture).save(folder / "camo.png")
        mesh.visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(texture))
        mesh.export(folder / "mesh.obj")
        return folder / "mesh.obj", folder / "camo.png"
    if scene.look in ("plain", "camo_plain"):
        rgb = scene.colour if scene.look == "plain" else \
            tuple(int(c) for c in np.median(backdrop_sample(data, width, height).reshape(-1, 3), 0))
        rgb = (rgb[0], rgb[1], min(255, rgb[2] + 1)) if len(set(rgb)) == 1 else rgb  # grey reads as "no colour"
        mesh.visual.vertex_colors = np.tile([*rgb, 255], (len(mesh.vertices), 1))
    mesh.export(folder / "mesh.ply")
    return folder / "mesh.ply", None


def generate_scene(scene: Scene, data: Path, views: int, width: int, height: int) -> Path:
    """Render ``scene`` once (cached); returns its folder (``images/``, ``gt/``, ``mesh/``)."""
    from pipeline.synthetic import SceneSpec, generate

    out = data / f"{scene.name}_{views}_{width}x{height}"
    if (out / "gt" / "gt.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    kw: dict = {"num_views": views, "width": width, "height": height, "output": "images", **scene.spec}
    if scene.look == "dark":  # Spot with a darkened copy of its texture
        (tmp / "mesh").mkdir(parents=True)
        cv2.imwrite(str(tmp / "mesh" / "dark.png"), (cv2.imread(str(SPOT_TEXTURE)) * 0.45).astype(np.uint8))
        kw["texture_path"] = tmp / "mesh" / "dark.png"
    elif scene.shape != "spot":
        kw["mesh_path"], kw["texture_path"] = write_mesh(scene, tmp / "mesh", data, width, height)
        kw["mesh_up_axis"] = "z"
    generate(tmp, SceneSpec(**kw))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
