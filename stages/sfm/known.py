"""sfm with known cameras: a dataset importer brought ``frames/transforms.json``.

No mapping: SIFT features are extracted and matched, then points are triangulated with the
given poses and PINHOLE intrinsics held fixed (``pycolmap.triangulate_points``), so every input
gets SfM points. Images are already undistorted and are copied; ``transforms.json`` holds the
given cameras and keys (same frame order) with ``aabb_scale`` and, for the dataset's masks,
``mask_path`` (relative to the file's folder, like ``file_path``).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cameras import Cameras, frame_paths, load_transforms, save_transforms
from pipeline.dag import Context
from pipeline.errors import InputError, StageError
from pipeline.log import progress
from stages.sfm.steps import dataset_masks


def run_known(frames_dir: Path, source_kind: str, cfg: Any, out_dir: Path, ctx: Context) -> dict:
    """Triangulate points for the cameras in ``frames_dir/transforms.json``; write the sfm/ folder."""
    import stages.sfm.colmap as sc
    from stages.sfm.steps import WORK, match_all, prepare_work, resolve_matcher, timed

    cams = load_transforms(frames_dir / "transforms.json")
    names = [Path(n).name for n in cams.names]
    image_dir = frames_dir / "images"
    missing = [n for n in names if not (image_dir / n).is_file()]
    if missing:
        raise InputError(f"sfm: {len(missing)} image(s) named in {frames_dir / 'transforms.json'} are missing "
                         f"from {image_dir} ({', '.join(missing[:5])}); rerun the frames stage")
    if len(names) < 2:
        raise StageError(f"sfm: {len(names)} camera(s) in {frames_dir / 'transforms.json'}; triangulation needs 2")
    ctx.log.info("sfm: %d known cameras from the dataset: triangulating points, no mapping", len(names))
    sc.quiet_colmap(ctx)
    work = out_dir / WORK
    db = prepare_work(work, ctx)
    timings: dict[str, float] = {}
    shared = bool(np.allclose(cams.K, cams.K[0], rtol=0, atol=1e-6))
    with timed(ctx, "extract", timings, f"SIFT features of {len(names)} images"):
        if not (work / "extract.done").exists():
            sc.extract(db, image_dir, names, cfg, ctx, "PINHOLE", pinhole_params(cams.K[0]), per_image=not shared)
            (work / "extract.done").touch()
    matcher = resolve_matcher(cfg.matcher, source_kind)
    pairs = match_all(db, names, matcher, cfg, work, ctx, timings)
    with timed(ctx, "triangulate", timings, "triangulation with fixed poses"):
        rec = triangulate(db, image_dir, known_reconstruction(db, cams, names), work / "triangulated", ctx)
    if rec.num_points3D() == 0:
        raise StageError(f"sfm: no points could be triangulated from {len(names)} images with the given cameras "
                         f"({sc.num_verified_pairs(db)} image pairs matched). Check that the dataset's poses "
                         "match its images (axes convention) and that the images have texture.")
    with timed(ctx, "copy", timings, "copy of the (already undistorted) images"):
        publish(rec, frames_dir, names, out_dir, ctx)
    stats = sc.model_stats(rec)
    stats["num_registered"] = len(names)
    summary = {"num_images": len(names), **stats, "unregistered": [], "known_cameras": True,
               "matcher": matcher, "num_pairs": len(pairs), "num_verified_pairs": sc.num_verified_pairs(db),
               "shared_intrinsics": shared, "device": str(sc.colmap_device(ctx)).split(".")[-1],
               "timings": timings}
    (out_dir / "sfm.json").write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return summary


def pinhole_params(K: np.ndarray) -> str:
    return ",".join(repr(float(v)) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))


def known_reconstruction(db: Path, cams: Cameras, names: list[str]) -> Any:
    """A pycolmap Reconstruction holding the given PINHOLE cameras and poses, ids as in ``db``."""
    import pycolmap

    index = {n: i for i, n in enumerate(names)}
    rec = pycolmap.Reconstruction()
    with pycolmap.Database.open(db) as database:
        db_images = database.read_all_images()
        db_cameras = {c.camera_id: c for c in database.read_all_cameras()}
        for image in db_images:  # one camera per image, or one shared camera
            if rec.exists_camera(image.camera_id):
                continue
            K = cams.K[index[image.name]]
            cam = pycolmap.Camera.create_from_model_name(image.camera_id, "PINHOLE", float(K[0, 0]),
                                                         cams.width, cams.height)
            cam.params = [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
            if db_cameras[image.camera_id].params.tolist() != cam.params.tolist():
                database.update_camera(cam)
            rec.add_camera_with_trivial_rig(cam)
    for image in db_images:
        w2c = np.linalg.inv(cams.c2w[index[image.name]])
        new = pycolmap.Image(name=image.name, camera_id=image.camera_id, image_id=image.image_id)
        rec.add_image_with_trivial_frame(new, pycolmap.Rigid3d(w2c[:3, :4]))
    return rec


def triangulate(db: Path, image_dir: Path, rec: Any, out: Path, ctx: Context) -> Any:
    """pycolmap.triangulate_points with poses and intrinsics held fixed."""
    import pycolmap

    from stages.sfm.colmap import num_threads, quiet_colmap

    out.mkdir(parents=True, exist_ok=True)
    quiet_colmap(ctx)
    opts = pycolmap.IncrementalPipelineOptions(num_threads=num_threads(ctx))
    return pycolmap.triangulate_points(rec, db, image_dir, out, clear_points=True, options=opts,
                                       refine_intrinsics=False)


def publish(rec: Any, frames_dir: Path, names: list[str], out_dir: Path, ctx: Context) -> None:
    """Write sparse/, copy images/ and the given transforms.json into ``out_dir``."""
    sparse = out_dir / "sparse"
    if sparse.exists():
        shutil.rmtree(sparse)
    sparse.mkdir()
    rec.write(sparse)
    images = out_dir / "images"
    images.mkdir(exist_ok=True)
    for name in progress(names, ctx.progress, desc="copy images", unit="img"):
        shutil.copyfile(frames_dir / "images" / name, images / name)
    given = frames_dir / "transforms.json"
    cams = load_transforms(given)
    cams = replace(cams, names=[Path(n).name for n in cams.names])
    keys = {k: v for k, v in json.loads(given.read_text()).items() if k != "frames"}
    images, masks = frame_paths(cams, out_dir / "images", out_dir, dataset_masks(frames_dir))
    save_transforms(out_dir / "transforms.json", replace(cams, names=images), extra=keys, mask_paths=masks)
