"""Load the training inputs from the upstream stage folders and move them to the unit sphere.

sfm/: ``images/<name>`` (undistorted); masks/: ``masks/<stem>.png`` + ``masks.json`` (method
"none" = no masks); sfm_points/: ``scene.json`` (world_to_unit similarity), ``transforms.json``
(cameras, frame order = CSR order, images named relative to sfm_points/), ``points.npy`` and the
CSR ``view_offsets/view_indices``.
Cameras become unit-sphere camera-to-world matrices (OpenCV axes, orthonormal rotation).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.cameras import load_transforms
from pipeline.errors import InputError


@dataclass
class SceneData:
    names: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray | None  # (N, H, W) bool, None in scene mode
    K: np.ndarray  # (N, 3, 3)
    c2w: np.ndarray  # (N, 4, 4) unit-sphere coordinates, OpenCV axes
    points: np.ndarray  # (M, 3) float32 unit coordinates
    view_offsets: np.ndarray  # (N + 1,) int64
    view_indices: np.ndarray  # int64
    world_to_unit: np.ndarray
    unit_to_world: np.ndarray
    scene: dict = field(default_factory=dict)
    views_with_masks: np.ndarray | None = None  # (N,) bool, object mode

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])


def similarity_scale(m: np.ndarray) -> float:
    return float(np.cbrt(np.linalg.det(m[:3, :3])))


def c2w_to_unit(c2w_world: np.ndarray, world_to_unit: np.ndarray) -> np.ndarray:
    """Apply the similarity to camera poses; the rotation stays orthonormal."""
    s = similarity_scale(world_to_unit)
    out = np.repeat(np.eye(4)[None], len(c2w_world), 0)
    out[:, :3, :3] = (world_to_unit[:3, :3] / s) @ c2w_world[:, :3, :3]
    out[:, :3, 3] = c2w_world[:, :3, 3] @ world_to_unit[:3, :3].T + world_to_unit[:3, 3]
    return out


def _read_image(path: Path, shape: tuple[int, int] | None, grey: bool = False) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if grey else "RGB")
            if shape is not None and im.size != (shape[1], shape[0]):
                if not grey:  # the intrinsics are for (w, h): never resize an image silently
                    raise InputError(f"{path}: image is {im.size[0]}x{im.size[1]}, transforms.json says "
                                     f"{shape[1]}x{shape[0]}; rerun the sfm stage")
                im = im.resize((shape[1], shape[0]), Image.NEAREST)
            return np.asarray(im)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read image ({exc})") from None


def _need(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"{path}: missing; rerun the upstream stage")
    return path


WRONG_MASK_FLAGS = ("empty", "outside_consensus", "seen_through")  # not "coverage_outlier" alone: a thin
# object seen edge-on has a small, right mask (rings3_plain: leaving those 4 of 24 views out cost 15 %)


def flagged_frames(info: dict) -> set[str]:
    """Stems of the computed masks that the masks stage found wrong (``masks.json`` ``info``,
    frames' ``flags``: empty, reaching outside the other views' silhouette consensus, or on what
    the stereo sees through). Provided masks are the user's word and are all kept."""
    if info.get("method") in ("provided", "none"):
        return set()
    return {Path(f["name"]).stem for f in info.get("frames", []) if set(f.get("flags", [])) & set(WRONG_MASK_FLAGS)}


def load_masks(masks_dir: Path | None, names: list[str], shape: tuple[int, int],
               log) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(N, H, W) bool masks and which views may be trained on in object mode (N,) bool, or
    (None, None) when masks are off or absent. A view without a mask file gets an all-False mask
    and is reported; so is a view whose computed mask the masks stage flagged as wrong
    (``flagged_frames``: it would teach the background as object, or the object as empty
    space). The loop leaves both out of object-mode training (``views_with_masks``)."""
    if masks_dir is None or not (masks_dir / "masks.json").is_file():
        return None, None
    info = json.loads((masks_dir / "masks.json").read_text())
    if info.get("method") == "none" or not (masks_dir / "masks").is_dir():
        return None, None
    out = np.zeros((len(names), *shape), dtype=bool)
    usable = np.zeros(len(names), dtype=bool)
    missing = []
    for i, name in enumerate(names):
        path = masks_dir / "masks" / f"{Path(name).stem}.png"
        if path.is_file():
            out[i] = _read_image(path, shape, grey=True) > 127
            usable[i] = True
        else:
            missing.append(Path(name).stem)
    if len(missing) == len(names):
        log.warning("train: masks.json exists but no mask files were found; training without masks")
        return None, None
    if missing:
        log.warning("train: %d views have no mask (%s ...); they are not trained on", len(missing), missing[0])
    flagged = flagged_frames(info)
    left_out = [Path(n).stem for n in names if Path(n).stem in flagged]
    if left_out:
        usable &= np.array([Path(n).stem not in flagged for n in names])
        shown = ", ".join(left_out[:10]) + (" ..." if len(left_out) > 10 else "")
        log.warning("train: %d views whose masks disagree with the others (masks.json flags) are not "
                    "trained on: %s", len(left_out), shown)
    return out, usable


def frame_names(json_dir: Path, file_paths: list[str], sfm: Path) -> list[str]:
    """The images a transforms.json in ``json_dir`` names (relative to that folder), as names
    inside the sfm folder (``images/<name>``)."""
    return [Path(os.path.relpath(os.path.normpath(json_dir / p), sfm)).as_posix() for p in file_paths]


def load_scene(inputs: dict[str, Path], log) -> SceneData:
    sfm, pts_dir = Path(inputs["sfm"]), Path(inputs["sfm_points"])
    scene = json.loads(_need(pts_dir / "scene.json").read_text())
    w2u = np.asarray(scene["world_to_unit"], dtype=np.float64)
    u2w = np.asarray(scene["unit_to_world"], dtype=np.float64)
    cams = load_transforms(_need(pts_dir / "transforms.json"))
    cams.names = frame_names(pts_dir, cams.names, sfm)
    shape = (cams.height, cams.width)
    images = np.stack([_read_image(_need(sfm / name), shape) for name in cams.names])
    masks, with_masks = load_masks(Path(inputs["masks"]) if inputs.get("masks") else None, cams.names, shape, log)
    points = np.load(_need(pts_dir / "points.npy")).astype(np.float64).reshape(-1, 3)
    offsets = np.load(_need(pts_dir / "view_offsets.npy")).astype(np.int64)
    indices = np.load(_need(pts_dir / "view_indices.npy")).astype(np.int64)
    if len(offsets) != len(cams) + 1 or (len(indices) and (indices.max() >= len(points) or indices.min() < 0)):
        raise InputError(f"{pts_dir}: view_offsets/view_indices do not match {len(cams)} views and "
                         f"{len(points)} points; rerun sfm_points")
    points_unit = (points @ w2u[:3, :3].T + w2u[:3, 3]).astype(np.float32)
    return SceneData(list(cams.names), images, masks, cams.K.copy(), c2w_to_unit(cams.c2w, w2u),
                     points_unit, offsets, indices, w2u, u2w, scene, with_masks)


def split_views(n: int, holdout_every: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out view indices: every ``holdout_every``-th view (from view 0) is held
    out when there are enough views to spare them."""
    all_views = np.arange(n)
    if holdout_every <= 1 or n < 2 * holdout_every:
        return all_views, all_views[:0]
    held = all_views[::holdout_every]
    return np.setdiff1d(all_views, held), held
