"""A mesh seen from the calibrated views: per-view visibility by a z-buffer (the torch
rasteriser ``pipeline.raster``), mask votes for culling, colours blended from the
images for vertices or any surface points (texels of a UV atlas), and the atlas baking.

A point is *seen* by a view when it projects inside the image, faces the camera and is not
behind the z-buffer surface at its pixel by more than a tolerance (a share of the mesh
diagonal plus the pixel footprint). Cameras follow ``pipeline.cameras`` (OpenCV axes, pixel
centres at +0.5).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cameras import Cameras, load_transforms
from pipeline.errors import InputError
from pipeline.log import progress as progress_bar

DEPTH_TOL_DIAG = 0.005  # visibility tolerance: this share of the mesh diagonal ...
DEPTH_TOL_PIXELS = 1.5  # ... plus this many pixel footprints at the point's depth
CULL_MIN_COS = 0.05  # a view sees a point only when cos(normal, direction to camera) exceeds
COLOUR_MIN_COS = 0.2  # this (grazing views smear colours: a stricter bound for colouring)
COLOUR_ERODE_PX = 1  # colours are taken only this far inside the mask (no silhouette mixing)
WEIGHT_POWER = 3  # colour blending weight = cos^WEIGHT_POWER (frontal views count most)


@dataclass
class Views:
    """The views of an sfm/ folder, optionally with masks (``masks/<stem>.png``)."""

    cams: Cameras
    root: Path  # file_path values are relative to this folder
    mask_dir: Path | None

    def image(self, i: int) -> np.ndarray:
        import cv2

        path = self.root / self.cams.names[i]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise InputError(f"{path}: cannot read image")
        return np.ascontiguousarray(img[:, :, ::-1])

    def mask(self, i: int) -> np.ndarray | None:
        import cv2

        if self.mask_dir is None:
            return None
        path = self.mask_dir / f"{Path(self.cams.names[i]).stem}.png"
        m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise InputError(f"{path}: mask missing or unreadable")
        if m.shape != (self.cams.height, self.cams.width):
            raise InputError(f"{path}: mask is {m.shape[1]}x{m.shape[0]}, images are "
                             f"{self.cams.width}x{self.cams.height}")
        return m > 127


def load_views(sfm_dir: Path, masks_dir: Path | None, max_views: int) -> Views:
    """Cameras of ``sfm_dir/transforms.json`` (at most ``max_views``, evenly spread) and the
    mask folder when it holds a mask for every chosen view."""
    cams = load_transforms(Path(sfm_dir) / "transforms.json")
    if max_views and len(cams) > max_views:
        cams = cams.subset(np.unique(np.linspace(0, len(cams) - 1, max_views).round().astype(int)))
    mask_dir = Path(masks_dir) / "masks" if masks_dir is not None else None
    if mask_dir is not None and not all((mask_dir / f"{Path(n).stem}.png").exists() for n in cams.names):
        mask_dir = None
    return Views(cams, Path(sfm_dir), mask_dir)


class ViewDepth:
    """The mesh rasterised into one view: depth per pixel (inf where empty)."""

    def __init__(self, vertices, faces, K: np.ndarray, c2w: np.ndarray, width: int, height: int):
        import torch

        from pipeline.raster import rasterize

        w2c = np.linalg.inv(c2w)
        self.R = torch.as_tensor(w2c[:3, :3], dtype=torch.float64)
        self.t = torch.as_tensor(w2c[:3, 3], dtype=torch.float64)
        self.centre = torch.as_tensor(c2w[:3, 3], dtype=torch.float64)
        self.K, self.width, self.height = K, width, height
        xy, z = self.project(vertices)
        face, bary = rasterize(xy, z, faces, width, height)
        zf = z.float()[faces.clamp(min=0)[face.clamp(min=0)]]
        self.depth = torch.where(face >= 0, (bary * zf).sum(1), torch.full_like(bary[:, 0], float("inf")))

    def project(self, points):
        """Pixel coordinates (N, 2) and camera depth (N,) of world points (float64 tensors)."""
        import torch

        cam = points @ self.R.T + self.t
        z = cam[:, 2]
        f = torch.tensor([self.K[0, 0], self.K[1, 1]], dtype=torch.float64)
        c = torch.tensor([self.K[0, 2], self.K[1, 2]], dtype=torch.float64)
        return cam[:, :2] / z[:, None].clamp(min=1e-9) * f + c, z

    def seen(self, points, normals, diag: float, min_cos: float):
        """Which points this view sees, their pixel coordinates and cosines to the camera."""
        import torch

        uv, z = self.project(points)
        to_cam = self.centre - points
        cos = (normals * to_cam).sum(1) / to_cam.norm(dim=1).clamp(min=1e-12)
        col, row = torch.floor(uv[:, 0]).long(), torch.floor(uv[:, 1]).long()
        inside = (z > 1e-6) & (col >= 0) & (col < self.width) & (row >= 0) & (row < self.height)
        pix = (row.clamp(0, self.height - 1) * self.width + col.clamp(0, self.width - 1))
        tol = DEPTH_TOL_DIAG * diag + DEPTH_TOL_PIXELS * z / float(self.K[0, 0])
        visible = inside & (cos > min_cos) & (z <= self.depth[pix].double() + tol)
        return visible, uv, pix, cos


def _tensors(vertices: np.ndarray, faces: np.ndarray):
    import torch

    return torch.as_tensor(vertices, dtype=torch.float64), torch.as_tensor(faces, dtype=torch.int64)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (outward for outward-oriented faces)."""
    tri = vertices[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    acc = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(acc, faces[:, k], fn)
    return acc / np.maximum(np.linalg.norm(acc, axis=1, keepdims=True), 1e-12)


def face_normals(v, f):
    n = (v[f[:, 1]] - v[f[:, 0]]).cross(v[f[:, 2]] - v[f[:, 0]], dim=1)
    return n / n.norm(dim=1, keepdim=True).clamp(min=1e-18)


def mask_votes(vertices: np.ndarray, faces: np.ndarray, views: Views, dilate_px: int,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per face: how many views see its centroid, and in how many of those it falls outside
    the (dilated) mask."""
    import cv2
    import torch

    v, f = _tensors(vertices, faces)
    centroids, normals = v[f].mean(1), face_normals(v, f)
    diag = float(np.linalg.norm(np.ptp(vertices, 0)))
    seen = torch.zeros(len(f), dtype=torch.int32)
    outside = torch.zeros(len(f), dtype=torch.int32)
    kernel = np.ones((2 * dilate_px + 1, 2 * dilate_px + 1), np.uint8) if dilate_px > 0 else None
    cams = views.cams
    for i in progress_bar(range(len(cams)), progress, desc="cull views", unit="view"):
        mask = views.mask(i).astype(np.uint8)
        if kernel is not None:
            mask = cv2.dilate(mask, kernel)
        vd = ViewDepth(v, f, cams.K[i], cams.c2w[i], cams.width, cams.height)
        vis, _, pix, _ = vd.seen(centroids, normals, diag, CULL_MIN_COS)
        off = torch.from_numpy(mask.reshape(-1) == 0)[pix]
        seen += vis.int()
        outside += (vis & off).int()
    return seen.numpy(), outside.numpy()


def _sample_bilinear(image: np.ndarray, uv):
    """Bilinear image samples (N, 3) float in [0, 1] at continuous pixel coordinates."""
    import torch
    import torch.nn.functional as F

    h, w = image.shape[:2]
    img = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    grid = torch.stack([2 * uv[:, 0] / w - 1, 2 * uv[:, 1] / h - 1], 1).float()[None, None]
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T


def blend_colours(points: np.ndarray, normals: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
                  views: Views, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Colours (N, 3) float in [0, 1] of surface points blended over the views that see them
    (inside the mask when there are masks), weighted by cos^WEIGHT_POWER; and the weight sum
    (N,) (0 = seen by no view, colour 0)."""
    import cv2
    import torch

    v, f = _tensors(vertices, faces)
    p = torch.as_tensor(points, dtype=torch.float64)
    n = torch.as_tensor(normals, dtype=torch.float64)
    diag = float(np.linalg.norm(np.ptp(vertices, 0)))
    acc = torch.zeros((len(p), 3), dtype=torch.float64)
    wsum = torch.zeros(len(p), dtype=torch.float64)
    cams = views.cams
    for i in progress_bar(range(len(cams)), progress, desc="colour views", unit="view"):
        vd = ViewDepth(v, f, cams.K[i], cams.c2w[i], cams.width, cams.height)
        vis, uv, pix, cos = vd.seen(p, n, diag, COLOUR_MIN_COS)
        mask = views.mask(i)
        if mask is not None:
            mask = cv2.erode(mask.astype(np.uint8), np.ones((2 * COLOUR_ERODE_PX + 1,) * 2, np.uint8))
            vis &= torch.from_numpy(mask.reshape(-1) > 0)[pix]
        idx = torch.nonzero(vis).squeeze(1)
        if len(idx) == 0:
            continue
        w = cos[idx] ** WEIGHT_POWER
        acc[idx] += w[:, None] * _sample_bilinear(views.image(i), uv[idx]).double()
        wsum[idx] += w
    colours = acc / wsum.clamp(min=1e-12)[:, None]
    return colours.numpy(), wsum.numpy()


def rasterize_atlas(uvs: np.ndarray, faces: np.ndarray, size: int):
    """Texel -> (face, barycentrics) of a UV layout (uv in [0, 1], v up; row 0 = top)."""
    import torch

    from pipeline.raster import rasterize

    xy = torch.as_tensor(np.stack([uvs[:, 0] * size, (1.0 - uvs[:, 1]) * size], 1), dtype=torch.float32)
    face, bary = rasterize(xy, torch.ones(len(uvs)), torch.as_tensor(faces, dtype=torch.int64), size, size)
    return face.numpy(), bary.numpy()


def fill_empty_texels(image: np.ndarray, filled: np.ndarray, iterations: int = 8) -> np.ndarray:
    """Grow texel colours into empty texels (so bilinear lookups at chart borders stay clean)."""
    import cv2

    img = image.astype(np.float32) * filled[:, :, None]
    w = filled.astype(np.float32)
    for _ in range(iterations):
        blur_img = cv2.blur(img, (3, 3))
        blur_w = cv2.blur(w, (3, 3))
        grow = (w == 0) & (blur_w > 0)
        img[grow] = blur_img[grow] / blur_w[grow, None]
        w[grow] = 1.0
    return img


def bake_texture(vertices: np.ndarray, faces: np.ndarray, views: Views, size: int,
                 fallback: np.ndarray, progress: bool = False):
    """UV-unwrap with xatlas and bake a texture from the views. Returns (vmapping, new faces,
    uvs, RGB uint8 image); texels no view sees take the interpolated vertex ``fallback``
    colours (V, 3) uint8."""
    import xatlas

    vmapping, new_faces, uvs = xatlas.parametrize(vertices.astype(np.float32), faces.astype(np.uint32))
    face, bary = rasterize_atlas(uvs, new_faces, size)
    texel = np.flatnonzero(face >= 0)
    src_faces = faces_of(new_faces, vmapping)
    corner = vertices[src_faces[face[texel]]]  # (T, 3, 3)
    points = (corner * bary[texel][:, :, None]).sum(1)
    e1, e2 = corner[:, 1] - corner[:, 0], corner[:, 2] - corner[:, 0]
    normals = np.cross(e1, e2)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-18)
    colours, weight = blend_colours(points, normals, vertices, faces, views, progress)
    fb = (fallback[src_faces[face[texel]]].astype(np.float64) * bary[texel][:, :, None]).sum(1) / 255.0
    colours = np.where(weight[:, None] > 0, colours, fb)
    image = np.zeros((size * size, 3), np.float32)
    image[texel] = colours
    filled = np.zeros(size * size, bool)
    filled[texel] = True
    image = fill_empty_texels(image.reshape(size, size, 3), filled.reshape(size, size))
    return vmapping, new_faces, uvs, (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def faces_of(new_faces: np.ndarray, vmapping: np.ndarray) -> np.ndarray:
    """Faces of the unwrapped mesh expressed in the original vertex indices."""
    return vmapping[new_faces].astype(np.int64)
