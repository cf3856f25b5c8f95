"""Stage 4, sfm_points: the object's bounding sphere and the sparse SfM points each view sees.

Inputs: sfm/ (``transforms.json``, ``sparse/`` COLMAP model) and masks/ (``masks/<stem>.png``;
no such folder when masks are off). Outputs: ``scene.json`` (sphere + similarities to and from
the unit sphere), ``transforms.json`` (sfm's cameras + ``sphere_center``, ``sphere_radius``,
``aabb_range``, ``aabb_scale``; ``file_path`` / ``mask_path`` name the sfm images and the masks
relative to this folder, so nerfstudio or instant-ngp can read it here), ``points.npy`` (M, 3)
float32 world, ``view_offsets.npy`` / ``view_indices.npy`` (int64 CSR over the views in
transforms.json order: view v sees ``points[view_indices[view_offsets[v]:view_offsets[v + 1]]]``)
and ``sfm_points.json`` (counts before and after each filter). A point is listed for a view only
when the view observes it in the COLMAP model and its projection lies inside that view's image and mask.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cameras import (Cameras, frame_paths, load_transforms, orbit_distance, project, save_transforms,
                              supporting_plane)
from pipeline.dag import Context
from pipeline.errors import InputError, StageError

VERSION = "5"  # 3: transforms.json paths relative to its folder, mask_path, aabb_scale; 4: hull cut at the plane;
# 5: carving also off the frame of views whose mask keeps clear of the image border
CACHE_MASK_BYTES = 512 << 20  # keep decoded masks in memory when they fit in this


@dataclass
class SfmPoints:
    """Points of a COLMAP model and their observations (view index in transforms.json order)."""

    xyz: np.ndarray  # (P, 3) float64
    error: np.ndarray  # (P,) reprojection error, pixels
    track: np.ndarray  # (P,) track length
    obs_view: np.ndarray  # (O,) int64
    obs_point: np.ndarray  # (O,) int64, index into xyz


def read_sfm_points(model_dir: Path, names: list[str]) -> SfmPoints:
    """Read a COLMAP model with pycolmap; images are matched to ``names`` ("images/<name>")."""
    import pycolmap

    try:
        rec = pycolmap.Reconstruction(str(model_dir))
    except Exception as exc:  # pycolmap raises ValueError/RuntimeError with C++ messages
        raise InputError(f"{model_dir}: cannot read the COLMAP model ({str(exc).splitlines()[0]})") from None
    view_of = {n.removeprefix("images/"): i for i, n in enumerate(names)}
    ids = np.array(sorted(rec.points3D.keys()), dtype=np.int64)
    row = {int(pid): k for k, pid in enumerate(ids)}
    xyz = np.zeros((len(ids), 3))
    error, track = np.zeros(len(ids)), np.zeros(len(ids), np.int64)
    for k, pid in enumerate(ids):
        point = rec.points3D[int(pid)]
        xyz[k], error[k], track[k] = point.xyz, point.error, point.track.length()
    obs_view, obs_point = [], []
    for img in rec.images.values():
        view = view_of.get(img.name)
        if view is None or not img.has_pose:
            continue
        seen = {row[p.point3D_id] for p in img.points2D if p.has_point3D()}
        obs_point.extend(sorted(seen))
        obs_view.extend([view] * len(seen))
    return SfmPoints(xyz, error, track, np.asarray(obs_view, np.int64), np.asarray(obs_point, np.int64))


class MaskSet:
    """``mask_at(i)`` -> bool (H, W) mask of view i, or None when the view has no usable mask."""

    def __init__(self, folder: Path, cams: Cameras, log):
        self.paths = [folder / f"{Path(n).stem}.png" for n in cams.names]
        self.size = (cams.height, cams.width)
        self.cache: dict[int, np.ndarray | None] | None = {} if \
            len(cams) * cams.width * cams.height <= CACHE_MASK_BYTES else None
        missing = [p.name for p in self.paths if not p.is_file()]
        if missing:
            log.warning("sfm_points: %d views have no mask (%s...); they do not vote", len(missing), missing[0])

    def __call__(self, i: int) -> np.ndarray | None:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        mask = self._load(self.paths[i])
        if self.cache is not None:
            self.cache[i] = mask
        return mask

    def _load(self, path: Path) -> np.ndarray | None:
        import cv2

        if not path.is_file():
            return None
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise InputError(f"{path}: cannot read mask")
        if img.shape != self.size:
            raise InputError(f"{path}: mask is {img.shape[1]}x{img.shape[0]}, expected "
                             f"{self.size[1]}x{self.size[0]} like the sfm images")
        mask = img > 127
        return mask if mask.any() else None  # an empty mask (segmentation failed) does not vote


def check_observations(cams: Cameras, pts: SfmPoints, mask_at) -> tuple[np.ndarray, np.ndarray]:
    """Per observation: (projects inside its view's image, ... and inside its mask)."""
    in_image = np.zeros(len(pts.obs_view), bool)
    in_mask = np.zeros(len(pts.obs_view), bool)
    w2c = cams.w2c
    for v in range(len(cams)):
        sel = np.flatnonzero(pts.obs_view == v)
        if len(sel) == 0:
            continue
        uv, depth = project(pts.xyz[pts.obs_point[sel]], cams.K[v], w2c[v])
        col, row = np.floor(uv[:, 0]).astype(np.int64), np.floor(uv[:, 1]).astype(np.int64)
        ok = (depth > 0) & (col >= 0) & (col < cams.width) & (row >= 0) & (row < cams.height)
        in_image[sel] = ok
        mask = mask_at(v) if mask_at is not None else None
        if mask is not None:
            in_mask[sel[ok]] = mask[row[ok], col[ok]]
    return in_image, in_mask


def csr(obs_view: np.ndarray, obs_point: np.ndarray, num_views: int) -> tuple[np.ndarray, np.ndarray]:
    """(view_offsets (N+1,), view_indices) from observation pairs; indices sorted per view."""
    pairs = np.unique(np.stack([obs_view, obs_point], 1), axis=0) if len(obs_view) else np.zeros((0, 2), np.int64)
    offsets = np.zeros(num_views + 1, np.int64)
    np.cumsum(np.bincount(pairs[:, 0], minlength=num_views), out=offsets[1:])
    return offsets, pairs[:, 1].astype(np.int64)


def similarities(center: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(world_to_unit, unit_to_world) 4x4: x_unit = (x_world - center) / radius."""
    unit_to_world = np.eye(4)
    unit_to_world[:3, :3] *= radius
    unit_to_world[:3, 3] = center
    world_to_unit = np.eye(4)
    world_to_unit[:3, :3] /= radius
    world_to_unit[:3, 3] = -center / radius
    return world_to_unit, unit_to_world


def run(inputs: dict[str, Path], cfg: Any, out_dir: Path, ctx: Context) -> dict:
    import stages.sfm_points.bounds as bounds

    sfm_dir, out_dir = Path(inputs["sfm"]), Path(out_dir)
    cams = load_transforms(sfm_dir / "transforms.json")
    mask_dir = Path(inputs["masks"]) / "masks" if inputs.get("masks") else None
    mask_at = MaskSet(mask_dir, cams, ctx.log) if mask_dir is not None and mask_dir.is_dir() else None
    pts = _read_points(sfm_dir / "sparse", cams, ctx)
    counts = {"points_total": len(pts.xyz), "observations_total": len(pts.obs_view)}
    keep = pts.track >= cfg.min_track_length
    counts["points_after_track_length"] = int(keep.sum())
    keep &= pts.error <= cfg.max_error_px
    counts["points_after_reprojection_error"] = int(keep.sum())
    in_image, in_mask = check_observations(cams, pts, mask_at)
    obs_ok = keep[pts.obs_point] & in_image
    counts["observations_in_image"] = int(obs_ok.sum())
    if mask_at is not None:
        votes = np.bincount(pts.obs_point[obs_ok], minlength=len(keep))
        inside = np.bincount(pts.obs_point[obs_ok & in_mask], minlength=len(keep))
        keep &= (inside > 0) & (inside >= cfg.mask_vote * votes)
        obs_ok &= in_mask & keep[pts.obs_point]
        counts["points_after_mask"] = int(keep.sum())
        counts["observations_in_mask"] = int(obs_ok.sum())
        scale = orbit_distance(cams)
        plane = supporting_plane(pts.xyz[pts.track >= cfg.min_track_length], cams, 0.01 * scale)
        sphere = bounds.sphere_with_masks(cams, mask_at, pts.xyz[keep], cfg.carve_resolution, cfg.sphere_margin,
                                          plane)
    else:
        sphere = bounds.sphere_without_masks(cams, pts.xyz[keep], cfg.sphere_margin)
    if not sphere.radius > 0:
        raise StageError("sfm_points: could not estimate the object's bounds (empty visual hull and no SfM "
                         "points inside the masks); check the masks, or rerun with --set masks.method=none")
    sphere = bounds.clear_cameras(sphere, cams)
    problem = bounds.implausible(sphere, cams)
    if problem:
        hint = ("the masks do not isolate the object; try --set masks.method=none (scene mode) or give masks"
                if mask_at is not None else "the cameras do not look at one object (an orbit around it)")
        raise StageError(f"sfm_points: implausible bounds ({sphere.info.get('method')}): {problem}; {hint}")
    keep &= np.linalg.norm(pts.xyz - sphere.center, axis=1) < sphere.radius
    obs_ok &= keep[pts.obs_point]
    keep &= np.bincount(pts.obs_point[obs_ok], minlength=len(keep)) > 0
    counts["points_after_sphere"] = int(keep.sum())
    counts["observations_after_sphere"] = int(obs_ok.sum())
    cams_here = _relocated(cams, sfm_dir, out_dir, mask_dir if mask_at is not None else None)
    summary = _write_outputs(out_dir, cams_here, pts, keep, obs_ok, sphere, cfg)
    summary.update(counts=counts, masks=mask_at is not None, bounds=_jsonable(sphere.info))
    (out_dir / "sfm_points.json").write_text(json.dumps(summary, indent=1) + "\n")
    ctx.log.info("sfm_points: sphere r=%.4g at %s (%s); %d of %d points kept", sphere.radius,
                 np.round(sphere.center, 4).tolist(), sphere.info.get("method"), keep.sum(), len(keep))
    return summary


def _read_points(model_dir: Path, cams: Cameras, ctx: Context) -> SfmPoints:
    if not model_dir.is_dir() or not any(model_dir.glob("points3D.*")):
        ctx.log.warning("sfm_points: no COLMAP model in %s; bounds from masks and cameras only", model_dir)
        empty = np.zeros(0, np.int64)
        return SfmPoints(np.zeros((0, 3)), np.zeros(0), empty, empty, empty)
    return read_sfm_points(model_dir, cams.names)


def _relocated(cams: Cameras, sfm_dir: Path, out_dir: Path, mask_dir: Path | None) -> tuple[Cameras, list]:
    """``cams`` named for a transforms.json in ``out_dir``: the sfm images (and the masks)
    relative to it, e.g. ``../sfm-<key>/images/000000.jpg`` beside a sibling stage folder."""
    images, masks = frame_paths(cams, sfm_dir, out_dir, mask_dir)
    return replace(cams, names=images), masks


def _write_outputs(out_dir: Path, relocated: tuple[Cameras, list], pts: SfmPoints, keep: np.ndarray,
                   obs_ok: np.ndarray, sphere, cfg: Any) -> dict:
    """Write scene.json, transforms.json (``relocated``: cameras named relative to ``out_dir``
    and their mask paths), points.npy and the CSR pair; return the summary."""
    cams, masks = relocated
    center, radius = np.asarray(sphere.center, np.float64), float(sphere.radius)
    world_to_unit, unit_to_world = similarities(center, radius)
    scene = {"sphere_center": center.tolist(), "sphere_radius": radius,
             "world_to_unit": world_to_unit.tolist(), "unit_to_world": unit_to_world.tolist()}
    (out_dir / "scene.json").write_text(json.dumps(scene, indent=1) + "\n")
    aabb = np.stack([center - radius, center + radius], 1).tolist()
    save_transforms(out_dir / "transforms.json", cams, mask_paths=masks,
                    extra={"sphere_center": center.tolist(), "sphere_radius": radius, "aabb_range": aabb})
    new_index = np.cumsum(keep) - 1
    points = pts.xyz[keep].astype(np.float32)
    offsets, indices = csr(pts.obs_view[obs_ok], new_index[pts.obs_point[obs_ok]], len(cams))
    np.save(out_dir / "points.npy", points)
    np.save(out_dir / "view_offsets.npy", offsets)
    np.save(out_dir / "view_indices.npy", indices)
    if cfg.export_legacy:
        write_legacy(out_dir, points, offsets, indices, world_to_unit)
    per_view = np.diff(offsets)
    return {"sphere_center": center.tolist(), "sphere_radius": radius, "num_points": int(len(points)),
            "num_observations": int(len(indices)), "points_per_view_min": int(per_view.min()),
            "points_per_view_median": float(np.median(per_view)), "views_without_points": int((per_view == 0).sum())}


def write_legacy(out_dir: Path, points: np.ndarray, offsets: np.ndarray, indices: np.ndarray,
                 world_to_unit: np.ndarray) -> None:
    """Geo-NeuS-style pair, never read back here: ``points_legacy.npy`` (M, 3) float32 in
    unit-sphere coordinates and ``view_id.npy``, an object array of per-view index arrays."""
    unit = points.astype(np.float64) @ world_to_unit[:3, :3].T + world_to_unit[:3, 3]
    np.save(out_dir / "points_legacy.npy", unit.astype(np.float32))
    view_id = np.empty(len(offsets) - 1, dtype=object)
    for v in range(len(view_id)):
        view_id[v] = indices[offsets[v]:offsets[v + 1]].copy()
    np.save(out_dir / "view_id.npy", view_id, allow_pickle=True)


def _jsonable(info: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else float(v) if isinstance(v, np.floating) else v)
            for k, v in info.items()}
