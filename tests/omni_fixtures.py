"""Synthetic scenes written in OmniObject3D's layouts (for the importer and batch tests).

The synthetic world of ``pipeline.synthetic`` plays the raw scan's frame. Around it:

    raw_scans/<cat>/<obj>/Scan/Scan.obj          the GT mesh, in the scan frame
    blender_renders/<cat>/<obj>/render/          images/r_<i>.png (RGBA, alpha = mask) and a
                                                 NeRF-style transforms.json in the Blender frame
                                                 X_blender = s * A @ X_scan (OmniObject3D's renderer:
                                                 Blender's OBJ import turns Y-up into Z-up, A, then
                                                 the object is scaled by s = 0.99 / max |vertex
                                                 coordinate|; every frame stores that "scale")
    videos_processed/<cat>/<obj>/standard/       images/, matting/ (grey 0/255), poses_bounds.npy
                                                 (LLFF) and sparse/0/ (COLMAP) in a "COLMAP frame"
                                                 X_colmap = sigma * Q @ X_scan + d, as an SfM run
                                                 would leave it (not aligned with the scan)
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cameras import GL_FROM_CV, Cameras, load_transforms

BLENDER_FROM_SCAN_AXES = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # (x, y, z) -> (x, -z, y)
_CACHE: dict[tuple, "Synthetic"] = {}


@dataclass
class Synthetic:
    """A generated scene: its gt/ folder, GT cameras (scan frame), masks and mesh vertices."""

    gt_dir: Path
    cams: Cameras
    masks: list[np.ndarray]
    vertices: np.ndarray

    @property
    def num_views(self) -> int:
        return len(self.cams)


def make_synthetic(base: Path, num_views: int = 12, width: int = 96, height: int = 72,
                   noisy_texture: bool = False, **spec) -> Synthetic:
    """Render (once per process and spec) a tiny scene with ``pipeline.synthetic``; ``spec`` holds
    more SceneSpec fields. ``noisy_texture`` paints the object with coloured blocks: Spot's own
    texture is mostly white, too few SIFT features once the background is cut away (renders)."""
    import trimesh

    from pipeline.synthetic import SceneSpec, generate

    key = (str(base), num_views, width, height, noisy_texture, tuple(sorted(spec.items())))
    if key not in _CACHE:
        tag = "_".join(f"{k}{v}" for k, v in sorted(spec.items()))
        out = Path(base) / f"syn_{num_views}_{width}x{height}{'_noisy' if noisy_texture else ''}_{tag}"
        if not (out / "gt" / "gt.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            if noisy_texture:
                spec["texture_path"] = Path(base) / "noise.png"
                coarse = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(np.kron(coarse, np.ones((16, 16, 1), np.uint8))).save(spec["texture_path"])
            generate(out, SceneSpec(num_views=num_views, width=width, height=height, output="images",
                                    supersample=1, **spec))
        cams = load_transforms(out / "gt" / "transforms.json")
        masks = [np.asarray(Image.open(out / "gt" / "masks" / f"{i:06d}.png").convert("L")) > 127
                 for i in range(num_views)]
        vertices = np.asarray(trimesh.load(out / "gt" / "gt_mesh.ply", process=False).vertices, np.float64)
        _CACHE[key] = Synthetic(out / "gt", cams, masks, vertices)
    return _CACHE[key]


def omni_scale(vertices: np.ndarray) -> float:
    """OmniObject3D's render scale: 0.99 / the largest absolute vertex coordinate."""
    return 0.99 / float(np.abs(vertices).max())


def write_raw_scan(syn: Synthetic, root: Path, cat: str, obj: str) -> Path:
    """``raw_scans/<cat>/<obj>/Scan/Scan.obj`` (the GT mesh); returns the Scan folder."""
    import trimesh

    scan = Path(root) / "raw_scans" / cat / obj / "Scan"
    scan.mkdir(parents=True, exist_ok=True)
    mesh = trimesh.load(syn.gt_dir / "gt_mesh.ply", process=False)
    mesh.export(scan / "Scan.obj")
    (scan / "Scan.mtl").write_text("newmtl material_0\nKd 0.8 0.8 0.8\n")
    return scan


def _rgba(syn: Synthetic, i: int) -> np.ndarray:
    rgb = np.asarray(Image.open(syn.gt_dir / "images" / f"{i:06d}.png").convert("RGB"))
    return np.dstack([rgb, np.where(syn.masks[i], 255, 0).astype(np.uint8)])


def blender_c2w_gl(c2w_scan_cv: np.ndarray, scale: float) -> np.ndarray:
    """Camera-to-world of a scan-frame OpenCV camera in the Blender frame, OpenGL axes."""
    out = np.eye(4)
    out[:3, :3] = BLENDER_FROM_SCAN_AXES @ c2w_scan_cv[:3, :3]
    out[:3, 3] = scale * BLENDER_FROM_SCAN_AXES @ c2w_scan_cv[:3, 3]
    return out @ GL_FROM_CV


def write_blender_render(syn: Synthetic, root: Path, cat: str, obj: str, with_scale: bool = True) -> Path:
    """``blender_renders/<cat>/<obj>/render`` as OmniObject3D's blender_script.py writes it."""
    render = Path(root) / "blender_renders" / cat / obj / "render"
    (render / "images").mkdir(parents=True, exist_ok=True)
    scale = omni_scale(syn.vertices) if with_scale else 1.0
    frames = []
    for i in range(syn.num_views):
        Image.fromarray(_rgba(syn, i)).save(render / "images" / f"r_{i}.png")
        frame = {"file_path": f"r_{i}", "rotation": 0.0628,
                 "transform_matrix": blender_c2w_gl(syn.cams.c2w[i], scale).tolist()}
        if with_scale:
            frame["scale"] = scale
        frames.append(frame)
    angle = 2.0 * math.atan(0.5 * syn.cams.width / syn.cams.K[0, 0, 0])
    (render / "transforms.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames}, indent=1))
    return render


def colmap_similarity(sigma: float = 0.37, seed: int = 3) -> np.ndarray:
    """A similarity X_colmap = sigma * Q @ X_scan + d standing for an SfM run's arbitrary frame."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    Q *= np.sign(np.linalg.det(Q))
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = sigma * Q, rng.normal(size=3)
    return T


def apply_similarity(T: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Cameras (N, 4, 4) moved by the similarity ``T``; rotations stay orthonormal."""
    sigma = np.cbrt(np.linalg.det(T[:3, :3]))
    out = np.array(c2w, dtype=np.float64, copy=True)
    out[:, :3, :3] = (T[:3, :3] / sigma) @ c2w[:, :3, :3]
    out[:, :3, 3] = c2w[:, :3, 3] @ T[:3, :3].T + T[:3, 3]
    return out


def llff_poses_bounds(c2w_cv: np.ndarray, K: np.ndarray, width: int, height: int,
                      near_far: np.ndarray) -> np.ndarray:
    """LLFF's poses_bounds.npy rows: [R | t | hwf] (3x5, columns [down, right, back]) + near, far."""
    rows = []
    for i, c2w in enumerate(c2w_cv):
        cols = np.stack([c2w[:3, 1], c2w[:3, 0], -c2w[:3, 2], c2w[:3, 3],
                         np.array([height, width, K[i, 0, 0]], np.float64)], axis=1)
        rows.append(np.concatenate([cols.ravel(), near_far[i]]))
    return np.stack(rows)


def _near_far(vertices: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    out = []
    for pose in c2w:
        depth = (vertices - pose[:3, 3]) @ pose[:3, 2]
        out.append([np.percentile(depth, 0.1), np.percentile(depth, 99.9)])
    return np.asarray(out)


def write_colmap_model(folder: Path, names: list[str], K: np.ndarray, c2w_cv: np.ndarray, width: int,
                       height: int, model: str = "PINHOLE") -> None:
    """A COLMAP model of one shared camera (PINHOLE or SIMPLE_RADIAL with k = 0.01)."""
    import pycolmap

    folder.mkdir(parents=True, exist_ok=True)
    rec = pycolmap.Reconstruction()
    camera = pycolmap.Camera.create_from_model_name(1, model, K[0, 0, 0], width, height)
    camera.params = ([K[0, 0, 0], K[0, 1, 1], K[0, 0, 2], K[0, 1, 2]] if model == "PINHOLE"
                     else [K[0, 0, 0], K[0, 0, 2], K[0, 1, 2], 0.01])
    rec.add_camera_with_trivial_rig(camera)
    for i, name in enumerate(names):  # ids in reverse order: readers must sort by name
        img = pycolmap.Image(name=name, keypoints=np.zeros((0, 2)), camera_id=1, image_id=len(names) - i)
        rec.add_image_with_trivial_frame(img, pycolmap.Rigid3d(np.linalg.inv(c2w_cv[i])[:3, :4]))
    rec.write(str(folder))


def write_video_scene(syn: Synthetic, root: Path, cat: str, obj: str, similarity: np.ndarray | None = None,
                      sparse: str | None = "PINHOLE", poses_bounds: bool = True, mask_dir: str = "matting") -> Path:
    """``videos_processed/<cat>/<obj>/standard`` with cameras in the COLMAP frame ``similarity``."""
    std = Path(root) / "videos_processed" / cat / obj / "standard"
    (std / "images").mkdir(parents=True, exist_ok=True)
    (std / mask_dir).mkdir(exist_ok=True)
    T = colmap_similarity() if similarity is None else similarity
    c2w = apply_similarity(T, syn.cams.c2w)
    names = [f"{i:03d}.png" for i in range(syn.num_views)]
    for i, name in enumerate(names):
        shutil.copyfile(syn.gt_dir / "images" / f"{i:06d}.png", std / "images" / name)
        Image.fromarray(np.where(syn.masks[i], 255, 0).astype(np.uint8)).save(std / mask_dir / name)
    if poses_bounds:
        world = syn.vertices @ T[:3, :3].T + T[:3, 3]
        arr = llff_poses_bounds(c2w, syn.cams.K, syn.cams.width, syn.cams.height, _near_far(world, c2w))
        np.save(std / "poses_bounds.npy", arr)
    if sparse:
        write_colmap_model(std / "sparse" / "0", names, syn.cams.K, c2w, syn.cams.width, syn.cams.height, sparse)
    return std
