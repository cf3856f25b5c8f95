"""pycolmap 4.2.1 steps shared by the sfm stage: SIFT extraction, matching over explicit image
pairs, mapping, a final bundle adjustment, undistortion, and reading cameras back.

Matching always goes through ``match_image_pairs`` over a pair list we build
(``sequential_pairs`` / ``exhaustive_pairs``), in chunks: that gives a progress bar, loop
closure without a vocabulary tree, and resume (finished chunks are skipped, an interrupted one is
redone whole, so a resumed run verifies every pair with the same random draws).
Extraction runs in chunks for the same reasons (images with features are skipped).

Speed (benchmarks/sfm.py, 150-frame 1080p orbit video, frames at 1600x900): SIFT starts at full
size above ``sift_upsample_below`` (4x less work), the mappers run fewer and shorter global
bundle adjustments (constants below) and the final adjustment stops once the cost no longer
drops: 417 CPU s instead of 2054 with the previous settings; camera errors stay < 0.01 deg.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cameras import Cameras
from pipeline.dag import Context
from pipeline.log import progress

EXTRACT_CHUNK = 16  # images per extract_features call, at least (4 per thread)
MATCH_CHUNK = 400  # image pairs per match_image_pairs call
PP_MIN_GAIN = 0.03  # keep a refined principal point only if the reprojection error drops by 3 %
# Incremental mapper (COLMAP defaults in brackets): a global BA when the model grew by this
# factor (1.1), at most this many Ceres iterations (50) and retriangulate+BA rounds (5) each;
# one local refinement round (2); global BAs skip points whose images are already well covered.
INC_GLOBAL_BA_RATIO = 1.4
INC_GLOBAL_BA_ITERATIONS = 30
INC_GLOBAL_BA_REFINEMENTS = 2
INC_LOCAL_BA_REFINEMENTS = 1
INC_BA_THREADS_FROM_RESIDUALS = 10000  # local BAs with more residuals use all threads (50000)
# Global mapper (GLOMAP): global positioning and the first BAs use the longest tracks until each
# view has this many (all: 87k tracks, 3x the CPU time, same accuracy on the 150-frame orbit);
# retriangulation then brings every track back. Rounds of position-only + full BA (3).
GLOBAL_TRACKS_PER_VIEW = 500
GLOBAL_BA_ROUNDS = 2
# Mappers: a fixed seed (COLMAP's -1 seeds GLOMAP from the clock), so a rerun of the stage
# (resume after a kill) gives the same model with one thread.
RANDOM_SEED = 0
# Final bundle adjustment: stop when the cost drops by less than this fraction per iteration.
FINAL_BA_FUNCTION_TOLERANCE = 1e-5


def colmap_device(ctx: Context):
    """pycolmap.Device.auto (CUDA when a card is visible) for a CUDA build of pycolmap, else cpu.

    The PyPI wheel (also the one on the GPU machine) is CPU-only: ``pycolmap.has_cuda`` is False.
    """
    import pycolmap

    return pycolmap.Device.auto if pycolmap.has_cuda else pycolmap.Device.cpu


def num_threads(ctx: Context) -> int:
    return ctx.threads if ctx.threads and ctx.threads > 0 else -1


def cores(ctx: Context) -> int:
    return ctx.threads if ctx.threads and ctx.threads > 0 else (os.cpu_count() or 1)


def quiet_colmap(ctx: Context) -> None:
    """Keep COLMAP's glog output to errors unless the pipeline logs at DEBUG."""
    import logging

    import pycolmap

    pycolmap.logging.minloglevel = 0 if ctx.log.isEnabledFor(logging.DEBUG) else 2
    pycolmap.logging.stderrthreshold = 2


def extract(db: Path, image_dir: Path, names: list[str], cfg: Any, ctx: Context,
            camera_model: str, camera_params: str = "", per_image: bool = False,
            peak_threshold: float | None = None, octave: int | None = None) -> None:
    """SIFT features of ``names`` into ``db``; one shared camera unless ``per_image``. ``octave``
    overrides SIFT's first octave (-1: a 2x upsampled image; default: ``first_octave``)."""
    import pycolmap

    quiet_colmap(ctx)
    device = colmap_device(ctx)
    eo = pycolmap.FeatureExtractionOptions(max_image_size=cfg.max_image_size, num_threads=num_threads(ctx),
                                           use_gpu=device != pycolmap.Device.cpu)
    eo.sift.max_num_features = cfg.max_num_features
    eo.sift.peak_threshold = cfg.peak_threshold if peak_threshold is None else peak_threshold
    eo.sift.first_octave = first_octave(image_dir / names[0], cfg) if octave is None else octave
    mode = pycolmap.CameraMode.PER_IMAGE if per_image else pycolmap.CameraMode.SINGLE
    size = max(EXTRACT_CHUNK, 4 * cores(ctx))  # every thread busy until the chunk's tail
    chunks = [names[i:i + size] for i in range(0, len(names), size)]
    for chunk in progress(chunks, ctx.progress, desc="sift", unit="chunk"):
        ro = pycolmap.ImageReaderOptions(camera_model=camera_model, camera_params=camera_params)
        if not per_image:
            cam_id = _first_camera_id(db)
            if cam_id is not None:  # later chunks reuse the camera of the first one
                ro.existing_camera_id = cam_id
        pycolmap.extract_features(db, image_dir, image_names=chunk, camera_mode=mode,
                                  reader_options=ro, extraction_options=eo, device=device)


def first_octave(image: Path, cfg: Any) -> int:
    """-1 (SIFT on a 2x upsampled image) when the image, downscaled to ``cfg.max_image_size``, has a
    long side below ``cfg.sift_upsample_below``; else 0 (4x less work, enough features at >= 1000 px)."""
    from PIL import Image

    with Image.open(image) as im:
        side = max(im.size)
    if cfg.max_image_size > 0:
        side = min(side, cfg.max_image_size)
    return -1 if side < cfg.sift_upsample_below else 0


def _first_camera_id(db: Path) -> int | None:
    import pycolmap

    if not db.exists():
        return None
    with pycolmap.Database.open(db) as database:
        cams = database.read_all_cameras()
    return min(c.camera_id for c in cams) if cams else None


def reset_implausible_focal(db: Path, ctx: Context, lo: float = 0.3, hi: float = 5.0) -> None:
    """Drop an EXIF focal-length prior outside [lo, hi] x the long image side.

    EXIF focal lengths are in pixels of the ORIGINAL sensor image; photos downscaled with their
    EXIF kept (e.g. 4272 -> 1200 px) get a prior several times too long, which breaks the global
    mapper's relative poses. Such a prior is replaced by COLMAP's default guess (1.2 x long side).
    """
    import pycolmap

    with pycolmap.Database.open(db) as database:
        for cam in database.read_all_cameras():
            side = max(cam.width, cam.height)
            if cam.has_prior_focal_length and not lo * side <= cam.mean_focal_length() <= hi * side:
                ctx.log.warning("sfm: ignoring the EXIF focal length prior %.0f px of a %dx%d image "
                                "(resized photo?); starting from %.0f px", cam.mean_focal_length(),
                                cam.width, cam.height, 1.2 * side)
                params = np.array(cam.params, dtype=np.float64)
                params[list(cam.focal_length_idxs())] = 1.2 * side
                cam.params = params
                cam.has_prior_focal_length = False
                database.update_camera(cam)


def feature_counts(db: Path) -> dict[str, int]:
    """Number of SIFT keypoints per image name."""
    import pycolmap

    with pycolmap.Database.open(db) as database:
        return {im.name: database.num_keypoints_for_image(im.image_id) for im in database.read_all_images()}


def num_verified_pairs(db: Path) -> int:
    import pycolmap

    with pycolmap.Database.open(db) as database:
        _, inliers = database.read_two_view_geometry_num_inliers()
    return sum(1 for n in inliers if n > 0)


def sequential_pairs(n: int, overlap: int, loop_stride: int) -> list[tuple[int, int]]:
    """Pairs (i < j) for a video: each frame with its next ``overlap`` frames and with frames
    2^k ahead (COLMAP's quadratic overlap), plus every pair among keyframes spaced
    ``loop_stride`` apart (loop closure without a vocabulary tree; 0 = none)."""
    pairs = set()
    for i in range(n):
        for d in range(1, max(overlap, 0) + 1):
            if i + d < n:
                pairs.add((i, i + d))
        for k in range(max(overlap, 1)):
            if i + (1 << k) < n:
                pairs.add((i, i + (1 << k)))
    if loop_stride > 0:
        keys = list(range(0, n, loop_stride))
        pairs.update((a, b) for ai, a in enumerate(keys) for b in keys[ai + 1:])
    return sorted(pairs)


def exhaustive_pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def match(db: Path, names: list[str], pairs: list[tuple[int, int]], work: Path, ctx: Context) -> None:
    """Match and geometrically verify the image pairs (indices into ``names``), in chunks.

    A chunk is redone whole after a kill (its pairs already in the database are dropped first):
    RANSAC's random state starts afresh with each call, so a chunk continued half way would
    verify its remaining pairs with other random draws than an uninterrupted run. Redone whole,
    the resumed run gives the same database (with one thread). Chunks run in order, so only the
    first one without its marker can hold pairs of a killed run."""
    import pycolmap

    quiet_colmap(ctx)
    device = colmap_device(ctx)
    mo = pycolmap.FeatureMatchingOptions(num_threads=num_threads(ctx), use_gpu=device != pycolmap.Device.cpu)
    chunks = [pairs[i:i + MATCH_CHUNK] for i in range(0, len(pairs), MATCH_CHUNK)]
    pair_file = work / "pairs.txt"
    checked = False  # the first chunk without a marker: the only one a killed run can have begun
    for k, chunk in enumerate(progress(chunks, ctx.progress, desc=f"match ({len(pairs)} pairs)", unit="chunk")):
        done = work / f"match_chunk_{k:05d}.done"
        if done.exists():
            continue
        if not checked:
            checked = True
            dropped = _forget_pairs(db, [(names[i], names[j]) for i, j in chunk])
            if dropped:
                ctx.log.info("sfm: redoing matching chunk %d whole (%d pairs of a killed run dropped)", k, dropped)
        pair_file.write_text("".join(f"{names[i]} {names[j]}\n" for i, j in chunk))
        po = pycolmap.ImportedPairingOptions(match_list_path=str(pair_file))
        pycolmap.match_image_pairs(db, matching_options=mo, pairing_options=po, device=device)
        done.touch()


def _forget_pairs(db: Path, pairs: list[tuple[str, str]]) -> int:
    """Delete the matches and two-view geometries of ``pairs`` (image names) from ``db``;
    returns how many pairs had any."""
    import pycolmap

    dropped = 0
    with pycolmap.Database.open(db) as database:
        if database.num_matched_image_pairs() == 0:
            return 0
        ids = {im.name: im.image_id for im in database.read_all_images()}
        for a, b in pairs:
            i, j = ids[a], ids[b]
            had = False
            if database.exists_matches(i, j):
                database.delete_matches(i, j)
                had = True
            if database.exists_two_view_geometry(i, j):
                database.delete_two_view_geometry(i, j)
                had = True
            dropped += had
    return dropped


def map_images(db: Path, image_dir: Path, out: Path, mapper: str, cfg: Any, num_images: int,
               ctx: Context) -> tuple[Any, int]:
    """Run the incremental or global mapper; return (model with most registered images, #models)."""
    import pycolmap

    out.mkdir(parents=True, exist_ok=True)
    quiet_colmap(ctx)
    if mapper == "global":
        recs = pycolmap.global_mapping(db, image_dir, out, options=global_options(ctx))
    else:
        recs = pycolmap.incremental_mapping(db, image_dir, out, options=incremental_options(cfg, num_images, ctx))
    if not recs:
        return None, 0
    best = max(recs.values(), key=lambda r: (r.num_reg_images(), r.num_points3D()))
    return best, len(recs)


def incremental_options(cfg: Any, num_images: int, ctx: Context):
    """IncrementalPipelineOptions: one model, cheaper global bundle adjustments (see the constants)."""
    import pycolmap

    opts = pycolmap.IncrementalPipelineOptions(num_threads=num_threads(ctx), random_seed=RANDOM_SEED)
    opts.min_model_size = max(3, min(10, num_images // 2))
    opts.multiple_models = False  # frames left out are handled by the global fallback
    opts.extract_colors = False  # nothing downstream reads point colours
    opts.ba_global_frames_ratio = opts.ba_global_points_ratio = INC_GLOBAL_BA_RATIO
    opts.ba_global_max_num_iterations = INC_GLOBAL_BA_ITERATIONS
    opts.ba_global_max_refinements = INC_GLOBAL_BA_REFINEMENTS
    opts.ba_local_max_refinements = INC_LOCAL_BA_REFINEMENTS
    opts.ba_min_num_residuals_for_cpu_multi_threading = INC_BA_THREADS_FROM_RESIDUALS
    opts.mapper.ba_global_ignore_redundant_points3D = True
    opts.mapper.abs_pose_min_num_inliers = cfg.min_num_inliers
    opts.mapper.init_min_num_inliers = max(2 * cfg.min_num_inliers, 50)
    return opts


def global_options(ctx: Context):
    """GlobalPipelineOptions (GLOMAP): fewer tracks and BA rounds before retriangulation (constants)."""
    import pycolmap

    opts = pycolmap.GlobalPipelineOptions(num_threads=num_threads(ctx), random_seed=RANDOM_SEED)
    opts.mapper.num_threads = num_threads(ctx)
    opts.mapper.random_seed = RANDOM_SEED
    opts.mapper.ba_num_iterations = GLOBAL_BA_ROUNDS
    opts.mapper.track_required_tracks_per_view = GLOBAL_TRACKS_PER_VIEW
    return opts


def bundle_adjust(rec: Any, refine_principal_point: bool, max_iterations: int, ctx: Context) -> dict:
    """Bundle adjustment over all poses, points and intrinsics (Cauchy loss, gauge fixed by two
    cameras); returns a short report of the Ceres solve."""
    import pycolmap

    quiet_colmap(ctx)
    opts = pycolmap.BundleAdjustmentOptions(refine_focal_length=True, refine_extra_params=True,
                                            refine_principal_point=refine_principal_point, print_summary=False)
    opts.ceres.loss_function_type = pycolmap.LossFunctionType.CAUCHY
    opts.ceres.solver_options.num_threads = num_threads(ctx)
    opts.ceres.solver_options.max_num_iterations = max_iterations
    opts.ceres.solver_options.function_tolerance = FINAL_BA_FUNCTION_TOLERANCE
    config = pycolmap.BundleAdjustmentConfig()
    for image_id, image in rec.images.items():
        if image.has_pose:
            config.add_image(image_id)
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    summary = pycolmap.create_default_bundle_adjuster(opts, config, rec).solve().ceres_summary
    rec.update_point_3d_errors()  # compute_mean_reprojection_error reads these cached values
    return {"iterations": int(summary.num_successful_steps + summary.num_unsuccessful_steps),
            "seconds": round(float(summary.total_time_in_seconds), 3), "threads": int(summary.num_threads_used),
            "solver": str(summary.linear_solver_type_used).split(".")[-1],
            "termination": str(summary.termination_type).split(".")[-1]}


def refine_intrinsics(rec: Any, refine_principal_point: bool, max_iterations: int,
                      ctx: Context) -> tuple[Any, dict]:
    """Final bundle adjustment (at most ``max_iterations`` Ceres iterations); returns (model, report).

    With ``refine_principal_point`` a second adjustment also frees the principal point, and its
    result is kept only when it lowers the mean reprojection error by at least PP_MIN_GAIN: on an
    orbit at constant elevation the principal point trades off against camera tilt (it drifted
    3 px in a synthetic test with no change in error and tilted every camera by 0.5 deg), while
    a real offset (25 px on a calibrated scan) shows as a clear drop in error.
    """
    import pycolmap

    solves = [bundle_adjust(rec, False, max_iterations, ctx)]
    err_fixed = float(rec.compute_mean_reprojection_error())
    report = {"error_fixed_pp_px": err_fixed, "principal_point_refined": False, "solves": solves}
    if not refine_principal_point:
        return rec, report
    trial = pycolmap.Reconstruction(rec)  # deep copy
    solves.append(bundle_adjust(trial, True, max_iterations, ctx))
    err_free = float(trial.compute_mean_reprojection_error())
    report["error_free_pp_px"] = err_free
    if err_free < (1.0 - PP_MIN_GAIN) * err_fixed:
        report["principal_point_refined"] = True
        return trial, report
    ctx.log.info("sfm: principal point kept at the image centre (refining it lowered the error only "
                 "from %.4f to %.4f px)", err_fixed, err_free)
    return rec, report


def undistort(model_dir: Path, image_dir: Path, out: Path, ctx: Context) -> None:
    """Undistort the model's images to PINHOLE: ``out/images/<name>`` and ``out/sparse/``."""
    import pycolmap

    quiet_colmap(ctx)
    pycolmap.undistort_images(out, model_dir, image_dir, output_type="COLMAP",
                              num_threads=num_threads(ctx), jpeg_quality=95)


def reconstruction_cameras(rec: Any, names: list[str], prefix: str = "images/") -> Cameras:
    """Cameras of the registered images among ``names`` (in that order), file paths ``prefix + name``."""
    Ks, c2ws, kept = [], [], []
    width = height = 0
    for name in names:
        image = rec.find_image_with_name(name)
        if image is None or not image.has_pose:
            continue
        cam = rec.cameras[image.camera_id]
        w2c = np.eye(4)
        w2c[:3, :4] = image.cam_from_world().matrix()
        Ks.append(np.asarray(cam.calibration_matrix(), dtype=np.float64))
        c2ws.append(np.linalg.inv(w2c))
        kept.append(prefix + name)
        width, height = int(cam.width), int(cam.height)
    return Cameras(kept, np.stack(Ks), np.stack(c2ws), width, height)


def model_stats(rec: Any) -> dict:
    """Counts and errors of a reconstruction, JSON-able."""
    n_pts = int(rec.num_points3D())
    return {
        "num_registered": int(rec.num_reg_images()),
        "num_points3d": n_pts,
        "mean_reprojection_error_px": float(rec.compute_mean_reprojection_error()) if n_pts else None,
        "mean_track_length": float(rec.compute_mean_track_length()) if n_pts else 0.0,
    }


def camera_summary(rec: Any) -> list[dict]:
    """Model, size and parameters of each camera of a reconstruction."""
    return [{"model": cam.model_name, "width": int(cam.width), "height": int(cam.height),
             "params": [float(p) for p in cam.params]} for cam in rec.cameras.values()]
