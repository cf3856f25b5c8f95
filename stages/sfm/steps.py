"""The steps of the sfm stage that both paths share (mapping from scratch, and triangulation with
known cameras): reading frames/, the scratch folder, matching, mapping with a fallback, checks, outputs."""
from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline.dag import Context
from pipeline.errors import InputError, StageError

MIN_FRAMES = 3
FEW_FEATURES = 50  # a frame with fewer SIFT keypoints than this counts as blank / textureless
WORK = "_work"  # scratch folder inside out_dir (database, raw models); removed on success
TRY = ("Try: a more textured object or background, more overlap between views (slower camera motion, "
       "more frames), another sfm.matcher or sfm.mapper, or photos instead of a video.")


def match_all(db: Path, names: list[str], matcher: str, cfg: Any, work: Path, ctx: Context,
              timings: dict, cpu: dict | None = None) -> list[tuple[int, int]]:
    """Build the pair list for ``matcher`` and match it (skipped when a killed run had finished it)."""
    import stages.sfm.colmap as sc

    pairs = (sc.sequential_pairs(len(names), cfg.sequential_overlap, cfg.loop_closure_stride)
             if matcher == "sequential" else sc.exhaustive_pairs(len(names)))
    with timed(ctx, "match", timings, f"{matcher} matching, {len(pairs)} pairs", cpu):
        if not (work / "match.done").exists():
            sc.match(db, names, pairs, work, ctx)
            (work / "match.done").touch()
    return pairs


WEAK_FEATURES = 300  # a median below this many keypoints per frame: extract again, more sensitive
PEAK_STEPS = 2  # at most two halvings of the peak threshold (down to a quarter)
FULL_SIZE_FEATURES = 1500  # SIFT at full size (not upsampled) finding fewer: extract again from 2x images


def extract_enough(db: Path, image_dir: Path, names: list[str], cfg: Any, ctx: Context,
                   camera_model: str) -> dict:
    """``extract``, then again from an empty database while the median frame has few keypoints:
    - SIFT ran on images at full size (``colmap.first_octave`` 0: 1000 px and more) and the median
      frame has fewer than FULL_SIZE_FEATURES: once more on 2x upsampled images (4x the work). A
      small object on a plain backdrop is what this lifts: the skull's 1200x800 photos give 641
      a frame at full size and 49 of 66 frames register, 3394 upsampled and all 66 register;
    - then, while under WEAK_FEATURES, with half the SIFT peak threshold (at most PEAK_STEPS
      times). SIFT's responses scale with image contrast, so a dark or low-contrast capture (a dark
      object on a dark ground: ~80 keypoints a frame at 320x240, 8 of 24 frames registered) is
      what this lifts.
    A capture with enough features is extracted once, as configured. Returns the
    ``{"peak_threshold", "first_octave"}`` used."""
    from stages.sfm.colmap import extract, feature_counts, first_octave

    used = {"peak_threshold": cfg.peak_threshold, "first_octave": first_octave(image_dir / names[0], cfg)}
    halvings = 0
    while True:
        extract(db, image_dir, names, cfg, ctx, camera_model, peak_threshold=used["peak_threshold"],
                octave=used["first_octave"])
        counts = sorted(feature_counts(db).values())
        median = counts[len(counts) // 2] if counts else 0
        if used["first_octave"] == 0 and median < FULL_SIZE_FEATURES:
            ctx.log.info("sfm: the median frame has %d SIFT features at full size (under %d); extracting again "
                         "from 2x upsampled images", median, FULL_SIZE_FEATURES)
            used["first_octave"] = -1
        elif median < WEAK_FEATURES and halvings < PEAK_STEPS:
            ctx.log.info("sfm: the median frame has %d SIFT features (under %d: low contrast?); extracting "
                         "again with peak threshold %.4g", median, WEAK_FEATURES, used["peak_threshold"] / 2)
            used["peak_threshold"] /= 2
            halvings += 1
        else:
            return used
        db.unlink()


def map_with_fallback(db: Path, image_dir: Path, work: Path, names: list[str], cfg: Any,
                      ctx: Context) -> tuple[Any, dict]:
    """Map with ``cfg.mapper``; if it leaves frames out and ``cfg.fallback_mapper``, also map with
    the other mapper and keep the model with more registered frames. Returns (model, report)."""
    import stages.sfm.colmap as sc

    rec, num_models = sc.map_images(db, image_dir, work / "models", cfg.mapper, cfg, len(names), ctx)
    report = {"mapper": cfg.mapper, "num_models": num_models}
    n_reg = rec.num_reg_images() if rec is not None else 0
    if not cfg.fallback_mapper or n_reg == len(names):
        return rec, report
    other = "incremental" if cfg.mapper == "global" else "global"
    ctx.log.info("sfm: %s mapping registered %d of %d frames; trying the %s mapper", cfg.mapper, n_reg,
                 len(names), other)
    alt, alt_models = sc.map_images(db, image_dir, work / f"models_{other}", other, cfg, len(names), ctx)
    n_alt = alt.num_reg_images() if alt is not None else 0
    report["fallback"] = {f"{cfg.mapper}_registered": n_reg, f"{other}_registered": n_alt}
    if n_alt > n_reg:
        ctx.log.info("sfm: keeping the %s model (%d frames registered)", other, n_alt)
        return alt, {**report, "mapper": other, "num_models": alt_models}
    return rec, report


def read_frames(frames_dir: Path) -> tuple[list[str], str]:
    """Image names (frames.json order) and source kind of a frames/ folder."""
    path = frames_dir / "frames.json"
    try:
        meta = json.loads(path.read_text())
        names = [Path(f["file"]).name for f in meta["frames"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"sfm: cannot read {path} ({type(exc).__name__}: {exc}); rerun the frames stage") from None
    missing = [n for n in names if not (frames_dir / "images" / n).is_file()]
    if missing:
        raise InputError(f"sfm: {len(missing)} frame(s) listed in {path} are missing from "
                         f"{frames_dir / 'images'} ({abbreviate(missing)}); rerun the frames stage")
    return names, str(meta.get("source_kind", "images"))


def dataset_masks(frames_dir: Path) -> Path | None:
    """The masks a dataset import brought (``frames/masks/``), or None."""
    return frames_dir / "masks" if (frames_dir / "masks").is_dir() else None


def resolve_matcher(matcher: str, source_kind: str) -> str:
    if matcher == "auto":
        return "sequential" if source_kind == "video" else "exhaustive"
    return matcher


def prepare_work(work: Path, ctx: Context) -> Path:
    """Scratch folder; a killed run's database is reused once its extraction had finished."""
    db = work / "database.db"
    if work.exists() and not (work / "extract.done").exists():
        shutil.rmtree(work)
    elif work.exists():
        ctx.log.info("sfm: resuming from the features%s of an earlier run",
                     " and matches" if (work / "match.done").exists() else "")
        for sub in ("models", "models_global", "models_incremental", "model", "undistorted"):
            shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    return db


@contextmanager
def timed(ctx: Context, step: str, timings: dict, what: str, cpu: dict | None = None) -> Iterator[None]:
    """Record the step's wall seconds in ``timings`` and its process CPU seconds (all threads) in ``cpu``."""
    ctx.log.info("sfm: %s: %s ...", step, what)
    start, cpu_start = time.perf_counter(), time.process_time()
    yield
    timings[step] = round(time.perf_counter() - start, 3)
    used = round(time.process_time() - cpu_start, 3)
    if cpu is not None:
        cpu[step] = used
    ctx.log.info("sfm: %s done in %.1f s (%.1f CPU s)", step, timings[step], used)


def abbreviate(names: list[str], keep: int = 8) -> str:
    shown = ", ".join(names[:keep])
    return shown + (f", ... (+{len(names) - keep} more)" if len(names) > keep else "")


def check_features(names: list[str], counts: dict[str, int]) -> None:
    """Fail early when fewer than MIN_FRAMES frames have usable SIFT features."""
    textured = [n for n in names if counts.get(n, 0) >= FEW_FEATURES]
    if len(textured) < MIN_FRAMES:
        raise StageError(f"sfm: only {len(textured)} of {len(names)} frames have at least {FEW_FEATURES} "
                         "SIFT features (blank, black or textureless images?); no cameras can be estimated. "
                         + TRY)


def check_registration(rec: Any, names: list[str], counts: dict[str, int], verified: int, cfg: Any) -> None:
    """StageError when there is no model or too few frames registered in the best one."""
    blank = [n for n in names if counts.get(n, 0) < FEW_FEATURES]
    blank_note = (f"; {len(blank)} frame(s) have fewer than {FEW_FEATURES} features ({abbreviate(blank, 4)})"
                  if blank else "")
    if rec is None:
        raise StageError(f"sfm: no reconstruction from {len(names)} frames ({verified} image pairs matched "
                         f"after geometric verification{blank_note}). " + TRY)
    registered = {im.name for im in rec.images.values() if im.has_pose}
    need = cfg.min_registered_ratio * len(names)
    if len(registered) < max(MIN_FRAMES, need):
        missing = [n for n in names if n not in registered]
        raise StageError(f"sfm: only {len(registered)} of {len(names)} frames registered "
                         f"(need {cfg.min_registered_ratio:.0%}); unregistered: {abbreviate(missing)}{blank_note}. "
                         + TRY)


def publish_undistorted(undist: Path, out_dir: Path) -> None:
    """Move the undistorter's ``images/`` and ``sparse/`` into the stage folder."""
    for sub in ("images", "sparse"):
        target = out_dir / sub
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(undist / sub), str(target))


def write_outputs(out_dir: Path, names: list[str], rec_distorted: Any, timings: dict, extra: dict,
                  mask_dir: Path | None = None) -> dict:
    """transforms.json from the undistorted model in ``out_dir/sparse`` (``mask_path`` for the
    masks in ``mask_dir`` that a dataset brought) and sfm.json; return the summary."""
    import pycolmap

    from pipeline.cameras import frame_paths, save_transforms
    import stages.sfm.colmap as sc

    rec = pycolmap.Reconstruction(out_dir / "sparse")
    cams = sc.reconstruction_cameras(rec, names)
    save_transforms(out_dir / "transforms.json", cams, mask_paths=frame_paths(cams, out_dir, out_dir, mask_dir)[1])
    stats = sc.model_stats(rec_distorted)
    registered = {Path(n).name for n in cams.names}
    summary = {
        "num_images": len(names), **stats,
        "unregistered": [n for n in names if n not in registered],
        "pinhole": {"fl_x": float(cams.K[0, 0, 0]), "fl_y": float(cams.K[0, 1, 1]), "cx": float(cams.K[0, 0, 2]),
                    "cy": float(cams.K[0, 1, 2]), "w": cams.width, "h": cams.height},
        **extra, "timings": timings,
    }
    (out_dir / "sfm.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
