"""Synthetic scenes with exact ground truth: a textured mesh on a textured ground under a
textured dome, filmed by an orbit of cameras into a video or a photo folder.

World frame: z up, ground plane z = 0, object normalised by a similarity (bounding-box
diagonal = ``object_size``, centred on the z axis, resting on the ground). Cameras are
``pipeline.cameras.Cameras`` (OpenCV axes, pixel centres at +0.5; ``fov_deg`` is horizontal).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.cameras import Cameras, intrinsics, look_at, save_neus_npz, save_transforms
from pipeline.errors import ConfigError, InputError
from pipeline.synthetic.background import make_backdrop
from pipeline.synthetic.mesh import prepare_object
from pipeline.synthetic.render import MASK_RULE, make_scene, render_view

WOBBLE_CYCLES = 3  # elevation wobble periods per orbit
PNG_FLAGS = [cv2.IMWRITE_PNG_COMPRESSION, 1]


@dataclass(frozen=True)
class SceneSpec:
    """What to render. Distances are in units of the normalised object."""

    mesh_path: str | Path | None = None
    """Mesh file (any format trimesh reads); None = the shipped Spot (pipeline/assets/spot)."""
    num_views: int = 100
    """Cameras on the orbit = video frames / photos, in orbit order."""
    width: int = 640
    height: int = 480
    fov_deg: float = 50.0
    """Horizontal field of view."""
    elevation_deg: float = 25.0
    """Camera elevation above the horizontal plane through the object centre."""
    elevation_wobble_deg: float = 5.0
    """Amplitude of a sinusoidal elevation change (3 periods per orbit): cameras not coplanar."""
    radius: float = 2.0
    """Distance from the cameras to the object centre."""
    output: str = "video"
    """"video" (out_dir/video.mp4, H.264 yuv420p) or "images" (out_dir/images/*.png)."""
    fps: int = 10
    seed: int = 0
    """Seed of the background textures and of procedural object colours."""
    background: bool = True
    """False: flat ``background_color`` instead of ground and dome."""
    background_color: tuple[int, int, int] = (0, 0, 0)
    texture_path: str | Path | None = None
    """Texture image for a mesh with UVs; None = the mesh's own material (Spot: its texture)."""
    mesh_up_axis: str = "y"
    """Up axis of the source mesh ("x", "y" or "z"); it is rotated to world +z."""
    object_size: float = 1.0
    """Bounding-box diagonal of the normalised object."""
    backdrop_radius: float = 6.0
    """Radius of the ground disk and of the dome over it (centred at the world origin)."""
    supersample: int = 2
    """s: s x s samples per pixel, box-filtered; masks use coverage >= 0.5."""
    crf: int = 18
    """x264 constant rate factor of the video (lower = better quality)."""

    def __post_init__(self) -> None:
        problems = []
        if self.output not in ("video", "images"):
            problems.append(f"output must be 'video' or 'images', got {self.output!r}")
        if self.num_views < 1 or self.width < 2 or self.height < 2 or self.supersample < 1:
            problems.append("num_views, supersample must be >= 1 and width, height >= 2")
        if self.output == "video" and (self.width % 2 or self.height % 2):
            problems.append(f"video needs an even width and height (yuv420p), got {self.width}x{self.height}")
        if not 0.0 < self.fov_deg < 170.0:
            problems.append(f"fov_deg must be in (0, 170), got {self.fov_deg}")
        if abs(self.elevation_deg) + abs(self.elevation_wobble_deg) >= 89.0:
            problems.append("|elevation_deg| + |elevation_wobble_deg| must stay below 89 (look_at needs a horizon)")
        if not 0.0 < self.radius < self.backdrop_radius:
            problems.append(f"radius must be in (0, backdrop_radius={self.backdrop_radius}), got {self.radius}")
        if problems:
            raise ConfigError("SceneSpec: " + "; ".join(problems))


@dataclass(frozen=True)
class SyntheticScene:
    """Paths written by :func:`generate` (layout fixed; see the module docstring of the package)."""

    out_dir: Path
    video: Path | None  # out_dir/video.mp4 when output == "video"
    images_dir: Path | None  # out_dir/images when output == "images"
    gt_dir: Path  # images/, masks/, transforms.json, cameras_sphere.npz, gt_mesh.ply, gt.json

    @property
    def input(self) -> Path:
        """What a pipeline run takes as input: the video file or the photo folder."""
        return self.video if self.video is not None else self.images_dir


def orbit_cameras(spec: SceneSpec, target: np.ndarray) -> Cameras:
    """Cameras on a circle around ``target`` (world z up), looking at it, orbit order."""
    f = 0.5 * spec.width / math.tan(math.radians(spec.fov_deg) / 2.0)
    K = intrinsics(f, f, spec.width / 2.0, spec.height / 2.0)
    c2ws = []
    for i in range(spec.num_views):
        az = 2.0 * math.pi * i / spec.num_views
        el = math.radians(spec.elevation_deg + spec.elevation_wobble_deg * math.sin(WOBBLE_CYCLES * az))
        eye = target + spec.radius * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        if eye[2] <= 1e-3:
            raise ConfigError(f"SceneSpec: camera {i} is at or below the ground (elevation {math.degrees(el):.1f} deg)")
        c2ws.append(look_at(eye, target, np.array([0.0, 0.0, 1.0])))
    names = [f"images/{i:06d}.png" for i in range(spec.num_views)]
    return Cameras(names, np.repeat(K[None], spec.num_views, 0), np.stack(c2ws), spec.width, spec.height)


def bounding_sphere(vertices: np.ndarray) -> tuple[np.ndarray, float]:
    """A small enclosing sphere: bounding-box centre, farthest-vertex radius."""
    centre = 0.5 * (vertices.min(0) + vertices.max(0))
    return centre, float(np.linalg.norm(vertices - centre, axis=1).max())


class _VideoWriter:
    """H.264 (libx264, yuv420p) writer through PyAV."""

    def __init__(self, path: Path, spec: SceneSpec):
        import av  # only needed for video output

        self.av = av
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=spec.fps)
        self.stream.width, self.stream.height, self.stream.pix_fmt = spec.width, spec.height, "yuv420p"
        self.stream.options = {"crf": str(spec.crf)}

    def write(self, rgb: np.ndarray) -> None:
        frame = self.av.VideoFrame.from_ndarray(rgb, format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _save_frame(i: int, rgb: np.ndarray, mask: np.ndarray, gt_dir: Path, images_dir: Path | None, video) -> None:
    gt_image = gt_dir / "images" / f"{i:06d}.png"
    cv2.imwrite(str(gt_image), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), PNG_FLAGS)
    cv2.imwrite(str(gt_dir / "masks" / f"{i:06d}.png"), mask.astype(np.uint8) * 255, PNG_FLAGS)
    if images_dir is not None:
        shutil.copyfile(gt_image, images_dir / gt_image.name)
    if video is not None:
        video.write(rgb)


def _write_ground_truth(gt_dir: Path, spec: SceneSpec, cams: Cameras, obj) -> None:
    vertices = np.asarray(obj.gt_mesh.vertices)
    centre, radius = bounding_sphere(vertices)
    save_transforms(gt_dir / "transforms.json", cams,
                    extra={"sphere_center": centre.tolist(), "sphere_radius": radius})
    scale_mat = np.diag([radius, radius, radius, 1.0])
    scale_mat[:3, 3] = centre
    save_neus_npz(gt_dir / "cameras_sphere.npz", cams, scale_mat)
    obj.gt_mesh.export(gt_dir / "gt_mesh.ply")
    fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(spec).items()}
    info = {**fields, "transform": obj.transform.tolist(), "source_mesh": obj.source_name,
            "mask_rule": MASK_RULE, "world_frame": "z up, ground plane z = 0, units of the normalised object",
            "object_bounds": [vertices.min(0).tolist(), vertices.max(0).tolist()],
            "sphere_center": centre.tolist(), "sphere_radius": radius, "support_plane_z": 0.0}
    (gt_dir / "gt.json").write_text(json.dumps(info, indent=1))


def generate(out_dir: Path, spec: SceneSpec = SceneSpec()) -> SyntheticScene:
    """Render ``spec`` into ``out_dir`` (video or photos, plus ``gt/``) and return the paths."""
    out_dir = Path(out_dir)
    gt_dir = out_dir / "gt"
    stale = [p for p in (gt_dir, out_dir / "images", out_dir / "video.mp4") if p.exists()]
    if stale:
        raise InputError(f"{stale[0]} already exists: generate() needs a fresh output folder "
                         f"(old frames would mix with new ones); delete it or pick another folder")
    for sub in ("images", "masks"):
        (gt_dir / sub).mkdir(parents=True, exist_ok=True)
    images_dir = out_dir / "images" if spec.output == "images" else None
    if images_dir is not None:
        images_dir.mkdir(parents=True, exist_ok=True)
    obj = prepare_object(spec.mesh_path, spec.texture_path, spec.mesh_up_axis, spec.object_size, spec.seed)
    backdrop = make_backdrop(spec.seed, float(spec.backdrop_radius)) if spec.background else None
    scene = make_scene(obj, backdrop, spec.background_color)
    lo, hi = obj.vertices.min(0).values.numpy(), obj.vertices.max(0).values.numpy()
    cams = orbit_cameras(spec, 0.5 * (lo + hi).astype(np.float64))
    video = _VideoWriter(out_dir / "video.mp4", spec) if spec.output == "video" else None
    try:
        # One writer thread: PNG/H.264 encoding overlaps rendering, frames stay in order.
        with ThreadPoolExecutor(max_workers=1) as pool:
            jobs = []
            for i in range(len(cams)):
                rgb, mask = render_view(scene, cams.K[i], cams.c2w[i], spec.width, spec.height, spec.supersample)
                jobs.append(pool.submit(_save_frame, i, rgb, mask, gt_dir, images_dir, video))
                if len(jobs) > 4:
                    jobs.pop(0).result()
            for job in jobs:
                job.result()
    finally:
        if video is not None:
            video.close()
    _write_ground_truth(gt_dir, spec, cams, obj)
    return SyntheticScene(out_dir, out_dir / "video.mp4" if video else None, images_dir, gt_dir)
