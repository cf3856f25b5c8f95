"""Camera conventions, owned in one place.

- ``Cameras.c2w`` is camera-to-world in **OpenCV axes** (x right, y down, z forward).
  OpenGL axes (x right, y up, z backward, used by ``transforms.json``) differ by
  ``diag(1, -1, -1)`` on the camera side: ``c2w_gl = c2w_cv @ diag(1, -1, -1, 1)``.
- ``w2c = inv(c2w)``; a world point X maps to the camera as ``x_cam = R X + t``.
- Pixel coordinates are continuous with (0, 0) at the top-left corner of the top-left pixel,
  so pixel (row i, column j) has its centre at (u, v) = (j + 0.5, i + 0.5) (COLMAP's convention).
- ``transforms.json`` (instant-ngp / Neuralangelo / nerfstudio): ``fl_x, fl_y, cx, cy, w, h``,
  ``aabb_scale`` and ``frames[].file_path`` / ``frames[].transform_matrix`` (camera-to-world,
  OpenGL axes), ``frames[].mask_path`` where there is a mask; paths relative to the file's folder.
- NeuS/IDR ``cameras_sphere.npz``: ``world_mat_i = K @ w2c`` (4x4) and ``scale_mat_i``, the
  similarity that maps the unit sphere to world coordinates.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg

from pipeline.errors import InputError

GL_FROM_CV = np.diag([1.0, -1.0, -1.0, 1.0])
NGP_SCALE = 0.33  # instant-ngp's default "scale": transforms.json units to its unit cube


@dataclass
class Cameras:
    """Pinhole cameras sharing one image size. Arrays are float64."""

    names: list[str]
    K: np.ndarray  # (N, 3, 3) intrinsics
    c2w: np.ndarray  # (N, 4, 4) camera-to-world, OpenCV axes
    width: int
    height: int
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def w2c(self) -> np.ndarray:
        return np.linalg.inv(self.c2w)

    @property
    def centers(self) -> np.ndarray:
        return self.c2w[:, :3, 3].copy()

    def subset(self, index) -> "Cameras":
        index = np.asarray(index)
        return Cameras([self.names[i] for i in index], self.K[index], self.c2w[index],
                       self.width, self.height, dict(self.extra))


def intrinsics(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def gl_from_cv(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world with OpenCV camera axes -> OpenGL camera axes (works on (..., 4, 4))."""
    return c2w @ GL_FROM_CV


def cv_from_gl(c2w: np.ndarray) -> np.ndarray:
    return c2w @ GL_FROM_CV


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Camera-to-world (OpenCV axes) of a camera at ``eye`` looking at ``target``."""
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up)
    right = right / np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def project(points: np.ndarray, K: np.ndarray, w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points (M, 3) -> pixel coordinates (M, 2) and camera depth (M,)."""
    cam = (w2c[:3, :3] @ points.T).T + w2c[:3, 3]  # (R @ X.T) is far faster than X @ R.T here
    depth = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uvw = cam @ K.T
        uv = uvw[:, :2] / uvw[:, 2:3]
    return uv, depth


def pixels_in_image(points: np.ndarray, K: np.ndarray, w2c: np.ndarray,
                    shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pixels world points (M, 3) fall in, in an image of ``shape`` (h, w): the indices of the
    points in front of the camera that land inside the image, their pixels' rows and columns
    (int64) and their depths. Computed in the points' dtype (float32 voxel centres: carving)."""
    h, w = shape
    P = (K @ w2c[:3]).astype(points.dtype)
    uvw = points @ P[:, :3].T + P[:, 3]
    depth = uvw[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = np.floor(uvw[:, 0] / depth), np.floor(uvw[:, 1] / depth)
    sel = np.flatnonzero((depth > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h))
    return sel, v[sel].astype(np.int64), u[sel].astype(np.int64), depth[sel]


def pixel_rays(K: np.ndarray, c2w: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rays through continuous pixel coordinates ``uv`` (M, 2): world origins and unit directions."""
    xy = (uv - K[:2, 2]) / np.array([K[0, 0], K[1, 1]])
    dirs_cam = np.concatenate([xy, np.ones((len(uv), 1))], axis=1)
    dirs = dirs_cam @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origins = np.broadcast_to(c2w[:3, 3], dirs.shape).copy()
    return origins, dirs


def closest_point_to_rays(origins: np.ndarray, dirs: np.ndarray) -> np.ndarray | None:
    """Least-squares point nearest to all rays; None when they are (nearly) parallel."""
    dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    proj = np.eye(3)[None] - dirs[:, :, None] * dirs[:, None, :]
    A, b = proj.sum(0), (proj @ origins[:, :, None]).sum(0)[:, 0]
    if np.linalg.cond(A) > 1e6:
        return None
    return np.linalg.solve(A, b)


def look_at_point(cams: Cameras, uv: np.ndarray | None = None) -> np.ndarray:
    """Where the cameras look (the point nearest to all their rays through ``uv`` (N, 2) per view,
    default the principal points: the optical axes); of an orbit, the object's centre."""
    uv = cams.K[:, :2, 2] if uv is None else uv
    dirs_cam = np.concatenate([(uv - cams.K[:, :2, 2]) / cams.K[:, [0, 1], [0, 1]], np.ones((len(cams), 1))], 1)
    dirs = np.einsum("nij,nj->ni", cams.c2w[:, :3, :3], dirs_cam)
    point = closest_point_to_rays(cams.centers, dirs)
    if point is None:  # parallel axes: a point one mean camera spacing in front of the cameras
        spread = float(np.linalg.norm(cams.centers - cams.centers.mean(0), axis=1).mean()) or 1.0
        point = cams.centers.mean(0) + dirs.mean(0) / np.linalg.norm(dirs.mean(0)) * 3.0 * spread
    return point


def framed_radius(cams: Cameras, target: np.ndarray) -> float:
    """Radius of the ball around ``target`` that the median view just frames (distance x sin of
    the half diagonal field of view): the scale an orbit's cameras give, with no SfM point."""
    dist_cam = np.linalg.norm(cams.centers - target, axis=1)
    half_diag = np.hypot(0.5 * cams.width / cams.K[:, 0, 0], 0.5 * cams.height / cams.K[:, 1, 1])
    return float(np.median(dist_cam * np.sin(np.arctan(half_diag))))


def orbit_distance(cams: Cameras, centre: np.ndarray | None = None) -> float:
    """Median distance of the camera centres to ``centre`` (default the ``look_at_point``): an
    orbit's radius, the scale for tolerances that grow with the camera distance."""
    centre = look_at_point(cams) if centre is None else centre
    return float(np.median(np.linalg.norm(cams.centers - centre, axis=1)))


def supporting_plane(pts: np.ndarray, cams: Cameras, thresh: float, rng: np.random.Generator | None = None):
    """RANSAC plane (n, d) of the points (inliers within ``thresh``) with n.x + d > 0 on the cameras'
    side, or None when it holds under 15 % of the points or cameras lie on both sides (not the ground)."""
    rng = np.random.default_rng(0) if rng is None else rng
    if len(pts) < 50:
        return None
    sample = pts[rng.choice(len(pts), min(len(pts), 4000), replace=False)]
    best, best_n = None, 0
    for _ in range(300):
        a, b, c = sample[rng.choice(len(sample), 3, replace=False)]
        n = np.cross(b - a, c - a)
        if np.linalg.norm(n) < 1e-12:
            continue
        n /= np.linalg.norm(n)
        count = int((np.abs(sample @ n - n @ a) < thresh).sum())
        if count > best_n:
            best, best_n = (n, -float(n @ a)), count
    if best is None or best_n < 0.15 * len(sample):
        return None
    n, d = best
    side = cams.centers @ n + d
    if (side > 0).mean() < 0.5:
        n, d, side = -n, -d, -side
    return (n, d) if (side > 0).mean() >= 0.9 else None


def _check_finite(arr: np.ndarray, what: str, path: Path) -> None:
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{path}: {what} contains NaN or infinite values")


def aabb_scale(center, radius: float) -> int:
    """instant-ngp's ``aabb_scale`` for a ball in transforms.json units: the smallest power of two
    (1 to 128) whose box holds the ball, with instant-ngp's default mapping of those units to its
    unit cube (x ``NGP_SCALE``, world origin at the cube's centre)."""
    extent = 2.0 * NGP_SCALE * (float(np.abs(np.asarray(center, np.float64)).max()) + float(radius))
    return int(min(128, max(1, 2 ** math.ceil(math.log2(max(extent, 1e-9))))))


def scene_ball(cams: Cameras) -> tuple[np.ndarray, float]:
    """The ball around the point the cameras look at that holds every camera: the region a
    transforms.json without an object sphere describes."""
    center = look_at_point(cams)
    return center, float(np.linalg.norm(cams.centers - center, axis=1).max())


def frame_paths(cams: Cameras, image_root: Path, json_dir: Path,
                mask_dir: Path | None = None) -> tuple[list[str], list[str | None]]:
    """``file_path`` values for a transforms.json in ``json_dir`` whose images are ``cams.names``
    under ``image_root``, and ``mask_path`` values of their masks ``mask_dir/<stem>.png`` (None
    where there is none): relative to ``json_dir``, as nerfstudio and instant-ngp resolve them."""
    def rel(path: Path) -> str:
        return Path(os.path.relpath(path, json_dir)).as_posix()
    images = [rel(Path(image_root) / name) for name in cams.names]
    masks: list[str | None] = [None] * len(cams)
    if mask_dir is not None:
        masks = [rel(p) if (p := Path(mask_dir) / f"{Path(name).stem}.png").is_file() else None
                 for name in cams.names]
    return images, masks


def save_transforms(path: Path, cams: Cameras, extra: dict | None = None,
                    mask_paths: list[str | None] | None = None) -> None:
    """Write ``transforms.json``; ``names`` become ``file_path`` values as given, ``mask_paths``
    (None entries skipped) ``mask_path`` values. ``aabb_scale`` comes from the object sphere
    (``sphere_center``/``sphere_radius`` in the extras) or else the cameras' ``scene_ball``,
    unless the extras give one."""
    K0 = cams.K[0]
    keys = {**cams.extra, **(extra or {})}
    sphere = "sphere_center" in keys and "sphere_radius" in keys
    ball = (keys["sphere_center"], keys["sphere_radius"]) if sphere else scene_ball(cams)
    data = {
        "fl_x": float(K0[0, 0]), "fl_y": float(K0[1, 1]),
        "cx": float(K0[0, 2]), "cy": float(K0[1, 2]),
        "w": int(cams.width), "h": int(cams.height),
        "camera_angle_x": 2.0 * math.atan(cams.width / (2.0 * K0[0, 0])),
        "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
        "aabb_scale": aabb_scale(*ball),
        **keys,
        "frames": [],
    }
    for i, name in enumerate(cams.names):
        frame = {"file_path": name, "transform_matrix": gl_from_cv(cams.c2w[i]).tolist()}
        if mask_paths is not None and mask_paths[i] is not None:
            frame["mask_path"] = mask_paths[i]
        if not np.allclose(cams.K[i], K0):
            Ki = cams.K[i]
            frame.update(fl_x=float(Ki[0, 0]), fl_y=float(Ki[1, 1]), cx=float(Ki[0, 2]), cy=float(Ki[1, 2]))
        data["frames"].append(frame)
    path.write_text(json.dumps(data, indent=1))


def load_transforms(path: Path) -> Cameras:
    """Read a ``transforms.json`` with per-file or per-frame intrinsics (fl_x or camera_angle_x)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read camera file ({exc})") from None
    except RecursionError:
        raise InputError(f"{path}: cannot read camera file (JSON nested too deeply)") from None
    try:
        w, h = int(data["w"]), int(data["h"])
        names, Ks, c2ws = [], [], []
        for frame in data["frames"]:
            fx = frame.get("fl_x", data.get("fl_x"))
            if fx is None:
                fx = 0.5 * w / math.tan(0.5 * float(data["camera_angle_x"]))
            fy = frame.get("fl_y", data.get("fl_y", fx))
            cx = frame.get("cx", data.get("cx", w / 2.0))
            cy = frame.get("cy", data.get("cy", h / 2.0))
            Ks.append(intrinsics(float(fx), float(fy), float(cx), float(cy)))
            c2ws.append(cv_from_gl(np.asarray(frame["transform_matrix"], dtype=np.float64)))
            names.append(str(frame["file_path"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: malformed transforms.json ({type(exc).__name__}: {exc})") from None
    if not names:
        raise InputError(f"{path}: no frames")
    K, c2w = np.stack(Ks), np.stack(c2ws)
    _check_finite(K, "an intrinsics value", path)
    _check_finite(c2w, "a transform_matrix", path)
    if np.any(np.abs(np.linalg.det(c2w[:, :3, :3])) < 1e-6):
        raise InputError(f"{path}: a transform_matrix has a singular rotation")
    keep = {k: v for k, v in data.items() if k not in ("frames",)}
    return Cameras(names, K, c2w, w, h, extra={k: keep[k] for k in ("sphere_center", "sphere_radius", "aabb_range") if k in keep})


def save_neus_npz(path: Path, cams: Cameras, scale_mat: np.ndarray) -> None:
    """Write IDR/NeuS ``cameras_sphere.npz``: ``world_mat_i = K @ w2c`` and ``scale_mat_i``."""
    arrays = {}
    for i in range(len(cams)):
        K4 = np.eye(4)
        K4[:3, :3] = cams.K[i]
        arrays[f"world_mat_{i}"] = K4 @ np.linalg.inv(cams.c2w[i])
        arrays[f"scale_mat_{i}"] = scale_mat
    np.savez(path, **arrays)


def decompose_projection(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a 3x4 projection ``K [R | t]`` into K (3x3, positive diagonal) and c2w (4x4)."""
    K, R = scipy.linalg.rq(P[:3, :3])
    signs = np.diag(np.sign(np.diag(K)))
    K, R = K @ signs, signs @ R
    t = np.linalg.solve(K, P[:3, 3])
    if np.linalg.det(R) < 0:
        R, t = -R, -t
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R, t
    return K / K[2, 2], np.linalg.inv(w2c)


def load_neus_npz(path: Path, names: list[str], width: int, height: int) -> tuple[Cameras, np.ndarray]:
    """Read ``cameras_sphere.npz`` for ``names`` (in index order); returns cameras and scale_mat_0."""
    try:
        data = np.load(path, allow_pickle=False)
        Ps = [data[f"world_mat_{i}"] for i in range(len(names))]
        scale = data["scale_mat_0"] if "scale_mat_0" in data else np.eye(4)
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: cannot read NeuS cameras ({exc})") from None
    Ks, c2ws = [], []
    for P in Ps:
        _check_finite(P, "a world_mat", path)
        K, c2w = decompose_projection(np.asarray(P, dtype=np.float64)[:3, :4])
        Ks.append(K)
        c2ws.append(c2w)
    return Cameras(list(names), np.stack(Ks), np.stack(c2ws), width, height), np.asarray(scale, np.float64)
