"""Stage 2, sfm: frames/ -> camera poses and intrinsics with pycolmap (COLMAP 4.2.1).

SIFT extraction (one shared camera), matching (sequential with loop closure for video,
exhaustive for photo sets), incremental or global mapping, a final bundle adjustment that
may refine the principal point, and undistortion to PINHOLE. Outputs: ``sparse/`` (the
undistorted largest model), ``images/`` (undistorted, names as in frames/images),
``transforms.json`` (paths relative to it; ``mask_path`` for masks a dataset brought;
``aabb_scale``) and ``sfm.json``. When frames/ carries ``transforms.json`` (a dataset
importer brought cameras), no mapping runs: points are triangulated with the given poses
(``stages.sfm.known``). Too few registered frames end the stage with a ``StageError``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.dag import Context
from pipeline.errors import StageError
from stages.sfm.steps import (MIN_FRAMES, WORK, check_features, check_registration, dataset_masks, extract_enough,
                              map_with_fallback, match_all, prepare_work, publish_undistorted, read_frames,
                              resolve_matcher, timed, write_outputs)

VERSION = "5"  # 4: a weak feature set is extracted again, more sensitive (steps.extract_enough); 5: full-size SIFT
# finding few features runs again on 2x upsampled images


def run(inputs: dict[str, Path], cfg: Any, out_dir: Path, ctx: Context) -> dict:
    """Reconstruct cameras for ``inputs['frames']`` into ``out_dir``; return the sfm.json summary."""
    frames_dir, out_dir = Path(inputs["frames"]), Path(out_dir)
    names, source_kind = read_frames(frames_dir)
    if (frames_dir / "transforms.json").is_file():
        from stages.sfm.known import run_known

        return run_known(frames_dir, source_kind, cfg, out_dir, ctx)
    if len(names) < MIN_FRAMES:
        raise StageError(f"sfm: {len(names)} frame(s) in {frames_dir}, SfM needs at least {MIN_FRAMES}. "
                         "Give more photos or a longer video (or lower frames.dedup_threshold).")
    import stages.sfm.colmap as sc

    sc.quiet_colmap(ctx)
    work, image_dir = out_dir / WORK, frames_dir / "images"
    timings: dict[str, float] = {}  # wall seconds per step
    cpu: dict[str, float] = {}  # process CPU seconds per step (all threads)
    db = prepare_work(work, ctx)
    with timed(ctx, "extract", timings, f"SIFT features of {len(names)} frames", cpu):
        if not (work / "extract.done").exists():
            used = extract_enough(db, image_dir, names, cfg, ctx, cfg.camera_model)
            sc.reset_implausible_focal(db, ctx)
            (work / "extract.done").write_text(json.dumps(used))
    used = json.loads((work / "extract.done").read_text())
    counts = sc.feature_counts(db)
    check_features(names, counts)
    matcher = resolve_matcher(cfg.matcher, source_kind)
    pairs = match_all(db, names, matcher, cfg, work, ctx, timings, cpu)
    verified = sc.num_verified_pairs(db)
    with timed(ctx, "map", timings, f"{cfg.mapper} mapping", cpu):
        rec, mapping = map_with_fallback(db, image_dir, work, names, cfg, ctx)
    check_registration(rec, names, counts, verified, cfg)
    with timed(ctx, "ba", timings, "final bundle adjustment", cpu):
        rec, ba_report = sc.refine_intrinsics(rec, cfg.refine_principal_point, cfg.ba_max_iterations, ctx)
    distorted = sc.camera_summary(rec)
    with timed(ctx, "undistort", timings, "undistortion to PINHOLE", cpu):
        (work / "model").mkdir(exist_ok=True)
        rec.write(work / "model")
        sc.undistort(work / "model", image_dir, work / "undistorted", ctx)
        publish_undistorted(work / "undistorted", out_dir)
    summary = write_outputs(out_dir, names, rec, {**timings, "cpu": cpu}, extra={
        "known_cameras": False, "matcher": matcher, "num_pairs": len(pairs), "num_verified_pairs": verified,
        **mapping, "camera_model": cfg.camera_model, "distorted_cameras": distorted, "final_ba": ba_report,
        "device": str(sc.colmap_device(ctx)).split(".")[-1],
        "peak_threshold": used["peak_threshold"], "sift_first_octave": used["first_octave"],
        "features_median": int(sorted(counts.values())[len(counts) // 2]) if counts else 0,
        "threads": sc.cores(ctx),
    }, mask_dir=dataset_masks(frames_dir))
    shutil.rmtree(work, ignore_errors=True)
    return summary


