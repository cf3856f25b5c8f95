"""Stage 3, masks: one object mask per undistorted SfM image -> ``masks/<stem>.png`` + ``masks.json``.

Methods (``masks.method``): ``provided`` (masks that came with the dataset, frames/masks/),
``rembg`` (an ONNX segmentation model, ``stages.masks.rembg``), ``grabcut`` (no model; seeded from
the free-space hull, what the stereo sees through or the SfM points, ``stages.masks.seeds``, and
refined by multi-view consensus, ``stages.masks.grabcut``), ``none``, and
``auto`` = provided > rembg when its model is on disk > grabcut. Masks are written one by one
atomically; a rerun keeps every valid mask already in ``out_dir``. Computed masks are cleaned
(largest components, holes, dilation: ``stages.masks.post.clean_mask``); provided masks are only
dilated. Finally a visual hull of all masks flags frames that disagree with the others
(``stages.masks.post.consistency``); for GrabCut masks the plane-sweep stereo judges them too: masks
the views see the ground through, or whose hull floats above the supporting plane, are implausible
(``stages.masks.evidence``).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.cameras import Cameras, load_transforms
from pipeline.dag import Context
from pipeline.errors import InputError, StageError
from pipeline.fsutil import atomic_write_json
from pipeline.images import IMAGE_SUFFIXES
from pipeline.log import progress
from stages.masks import seeds
from stages.masks.checks import check_usable, consistency, implausible
import stages.masks.post as post

VERSION = "6"
WORK_DIR = "_grabcut_work"
REJECTED_DIR = "rejected_masks"  # computed masks that failed the plausibility check, kept to look at


def list_views(sfm_dir: Path) -> tuple[list[str], list[Path], Cameras | None]:
    """Stems and image paths of the undistorted images (transforms.json order when present)."""
    img_dir = sfm_dir / "images"
    tf = sfm_dir / "transforms.json"
    if tf.is_file():
        cams = load_transforms(tf)
        paths = []
        for name in cams.names:
            p = Path(os.path.normpath(sfm_dir / name))
            if not p.is_relative_to(os.path.normpath(sfm_dir)):
                raise InputError(f"masks: {tf} names '{name}', outside {sfm_dir}; rerun the sfm stage")
            paths.append(p if p.is_file() else img_dir / Path(name).name)
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise InputError(f"masks: {len(missing)} images named in {tf} are missing (first: {missing[0]})")
        if image_shape(paths[0]) != (cams.height, cams.width):
            raise InputError(f"masks: {paths[0]} is {image_shape(paths[0])[::-1]} but {tf} says "
                             f"{cams.width}x{cams.height}; the sfm stage output is inconsistent")
        return [p.stem for p in paths], paths, cams
    paths = sorted(p for p in img_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if img_dir.is_dir() else []
    if not paths:
        raise InputError(f"masks: no images in {img_dir}; the sfm stage output is incomplete")
    return [p.stem for p in paths], paths, None


def load_rgb(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f"masks: cannot read image {path}")
    return np.ascontiguousarray(img[..., ::-1])


def image_shape(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def provided_dir(frames_dir: Path | None) -> Path | None:
    d = frames_dir / "masks" if frames_dir is not None else None
    return d if d is not None and d.is_dir() and any(d.glob("*.png")) else None


def resolve_method(cfg: Any, frames_dir: Path | None, log) -> str:
    """``auto``: provided masks, else rembg when its model is on disk or downloads now, else grabcut
    (warned). ``rembg`` downloads a missing named model here too, or fails in one line."""
    import stages.masks.rembg as masks_rembg

    if cfg.method in ("auto", "rembg"):
        masks_rembg.check_download_config(cfg)
    if cfg.method != "auto":
        if cfg.method == "provided" and provided_dir(frames_dir) is None:
            raise InputError("masks.method=provided but the frames stage holds no masks/ folder; use "
                             "--set masks.method=rembg or --set masks.method=grabcut")
        if cfg.method == "rembg" and not cfg.model_path:
            try:
                masks_rembg.ensure_model(cfg.model, cfg.model_url, cfg.model_sha256, cfg.download, log)
            except masks_rembg.DownloadError as exc:
                raise StageError(masks_rembg.missing_model_message(cfg.model, str(exc))) from None
        return cfg.method
    if provided_dir(frames_dir) is not None:
        return "provided"
    if masks_rembg.local_model(cfg.model, cfg.model_path) is not None:
        return "rembg"
    why = "masks.model_path is missing"
    if not cfg.model_path:
        try:
            masks_rembg.ensure_model(cfg.model, cfg.model_url, cfg.model_sha256, cfg.download, log)
            return "rembg"
        except masks_rembg.DownloadError as exc:
            why = str(exc)
    log.warning("masks: no dataset masks and no rembg model on disk (%s): using grabcut, the model-free "
                "fallback (lower quality). For better masks put %s.onnx at %s or pass "
                "--set masks.model_path=/path/to/model.onnx", why, cfg.model,
                masks_rembg.model_file(cfg.model))
    return "grabcut"


def load_provided(src: Path, shape: tuple[int, int]) -> np.ndarray:
    """A dataset mask resampled to ``shape`` (linear, then threshold at 127)."""
    import cv2

    img = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(f"masks: cannot read provided mask {src}")
    if img.ndim == 3:
        img = img[..., 3] if img.shape[2] == 4 else img.max(axis=2)
    if img.dtype != np.uint8:
        img = (img.astype(np.float64) * 255.0 / max(float(np.iinfo(img.dtype).max), 1.0)).astype(np.uint8) \
            if np.issubdtype(img.dtype, np.integer) else (np.clip(img, 0, 1) * 255).astype(np.uint8)
    if img.shape != tuple(shape):
        img = cv2.resize(img, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return img > 127


def _clear_temp_files(mask_dir: Path) -> None:
    for p in mask_dir.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def _per_frame(stems: list[str], todo: list[int], predict: Callable[[int], np.ndarray], finish, bar) -> None:
    """Compute and write the masks of ``todo`` one at a time (a kill loses one frame at most)."""
    for i in bar(todo):
        finish(stems[i], predict(i))


def run(inputs: dict[str, Path], cfg: Any, out_dir: Path, ctx: Context) -> dict:
    start = time.perf_counter()
    log = ctx.log
    out_dir = Path(out_dir)
    sfm_dir, frames_dir = Path(inputs["sfm"]), Path(inputs["frames"]) if inputs.get("frames") else None
    method = resolve_method(cfg, frames_dir, log)
    summary: dict = {"method": method, "requested": cfg.method, "model": None}
    if method == "none":
        shutil.rmtree(out_dir / "masks", ignore_errors=True)
        atomic_write_json(out_dir / "masks.json", {**summary, "num_frames": 0, "frames": []})
        log.info("masks: method none; training runs in scene mode")
        return summary
    if ctx.threads > 0:
        import cv2

        cv2.setNumThreads(ctx.threads)
    stems, paths, cams = list_views(sfm_dir)
    shapes = [(cams.height, cams.width) if cams is not None else image_shape(p) for p in paths]
    mask_dir = out_dir / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    _clear_temp_files(mask_dir)
    final = {s: post.mask_or_none(mask_dir / f"{s}.png", shapes[i]) for i, s in enumerate(stems)}
    todo = [i for i, s in enumerate(stems) if final[s] is None]
    reused = len(stems) - len(todo)
    if reused:
        log.info("masks: reusing %d finished masks, computing %d", reused, len(todo))

    def finish(stem: str, mask: np.ndarray, clean: bool = True) -> None:
        if clean:
            mask = post.clean_mask(mask, cfg.keep_components, cfg.fill_holes, cfg.dilate_px)
        post.write_mask(mask_dir / f"{stem}.png", mask)

    def bar(it):
        return progress(it, ctx.progress, desc=f"masks ({method})", unit="frame")

    found: dict = {}  # the stereo and the supporting plane, when the method computed them
    summary.update(_compute(method, cfg, ctx, frames_dir, sfm_dir, stems, paths, shapes, cams, todo, final,
                            finish, bar, out_dir, found))

    def judge() -> tuple[list[dict], str | None]:
        masks = [post.mask_or_none(mask_dir / f"{s}.png", shapes[i]) for i, s in enumerate(stems)]
        if any(m is None for m in masks):
            raise StageError("masks: some masks were not written; rerun the stage")
        check_usable(masks, method, provided_dir(frames_dir) if method == "provided" else mask_dir)
        frames, gap = consistency(stems, masks, cams, cfg, log, found.get("stereo"), found.get("plane"))
        summary.pop("float_gap", None)
        if gap is not None:
            summary["float_gap"] = round(gap, 4)
        return frames, implausible(frames, method, cams is not None, gap)

    frames, reason = judge()
    other = seeds.can_retry(summary.get("seed"), found) if method == "grabcut" else None
    if reason and other:
        log.warning("masks: the masks seeded from %s are implausible (%s); redoing them seeded from %s",
                    seeds.NAMES[summary["seed"]], reason, seeds.NAMES[other])
        for p in mask_dir.glob("*.png"):
            p.unlink()
        todo = list(range(len(stems)))
        summary.update(seeds.grabcut(cfg, ctx, lambda i: load_rgb(paths[i]), sfm_dir, stems, shapes, cams, todo,
                                     {s: None for s in stems}, finish, bar, out_dir / WORK_DIR, found, seed=other),
                       retried={"seed": summary["seed"], "reason": reason})
        frames, reason = judge()
        if reason:
            reason += f"; seeded from {seeds.NAMES[summary['retried']['seed']]} before: {summary['retried']['reason']}"
    if reason and cfg.implausible == "fail":
        raise StageError(f"masks: the {method} masks are implausible ({reason}); give masks (a dataset with "
                         "masks, or a rembg model), or --set masks.implausible=scene to train in scene mode")
    if reason:
        log.warning("masks: the %s masks are implausible (%s); they are set aside in %s and training runs "
                    "in scene mode (no masks)", method, reason, out_dir / REJECTED_DIR)
        shutil.rmtree(out_dir / REJECTED_DIR, ignore_errors=True)
        os.replace(mask_dir, out_dir / REJECTED_DIR)
        summary.update(method="none", fallback={"from": method, "reason": reason, "masks": REJECTED_DIR})
    elapsed = time.perf_counter() - start
    summary["fallbacks"] = fallbacks(cfg, summary)
    summary.update(num_frames=len(stems), reused=reused, computed=len(todo),
                   flagged=[f["name"] for f in frames if f["flags"]],
                   mean_coverage=round(float(np.mean([f["coverage"] for f in frames])), 5),
                   seconds=round(elapsed, 3), seconds_per_frame=round(elapsed / max(len(todo), 1), 4))
    atomic_write_json(out_dir / "masks.json", {**summary, "frames": frames})
    return summary


def _compute(method, cfg, ctx, frames_dir, sfm_dir, stems, paths, shapes, cams, todo, final, finish, bar,
             out_dir, found: dict) -> dict:
    """Produce the missing masks with ``method``; returns method details for masks.json. GrabCut with
    cameras leaves its stereo (``stereo``) and supporting plane (``plane``) in ``found`` for the
    checks, also when every mask is reused."""
    if method == "provided":
        src = provided_dir(frames_dir)
        missing = [stems[i] for i in todo if not (src / f"{stems[i]}.png").is_file()]
        if missing:
            raise InputError(f"masks: {len(missing)} images have no provided mask in {src} (first: "
                             f"{missing[0]}.png); use --set masks.method=rembg or grabcut")
        _per_frame(stems, todo, lambda i: load_provided(src / f"{stems[i]}.png", shapes[i]),
                   lambda s, m: finish(s, post.dilate(m, cfg.dilate_px), clean=False), bar)
        return {"source": str(src.relative_to(frames_dir.parent)) if frames_dir else str(src)}
    if method == "rembg":
        from pipeline.fsutil import sha256_file
        import stages.masks.rembg as masks_rembg

        info: dict = {"model": Path(cfg.model_path).name if cfg.model_path else cfg.model}
        if todo:
            ctx.log.info("masks: loading rembg (the first import in a fresh environment takes ~50 s: numba)")
            session, provider = masks_rembg.open_session(cfg.model, cfg.model_path, ctx.threads, ctx.log)
            info["provider"] = provider
            _per_frame(stems, todo, lambda i: masks_rembg.predict(session, load_rgb(paths[i])), finish, bar)
        info.update(masks_rembg.pop_model_origin(cfg.model, cfg.model_path))
        local = masks_rembg.local_model(cfg.model, cfg.model_path)
        if local is not None:
            info["model_sha256"] = sha256_file(local)
        return info
    if method == "grabcut":
        return seeds.grabcut(cfg, ctx, lambda i: load_rgb(paths[i]), sfm_dir, stems, shapes, cams, todo, final, finish,
                             bar, out_dir / WORK_DIR, found)
    raise StageError(f"masks: unknown method {method!r}")


def prepare(cfg: Any, log) -> None:
    """Download a missing named rembg model for ``auto``/``rembg`` before the key is computed
    (``key_inputs`` reads the file), so the first run's masks are cached under the key the next
    run computes. A failed download is left to the stage: ``auto`` warns and uses GrabCut."""
    import stages.masks.rembg as masks_rembg

    if cfg.method not in ("auto", "rembg") or cfg.model_path or masks_rembg.local_model(cfg.model) is not None:
        return
    masks_rembg.check_download_config(cfg)
    if masks_rembg.download_blocked(cfg.download) is None:
        try:
            masks_rembg.ensure_model(cfg.model, cfg.model_url, cfg.model_sha256, cfg.download, log)
        except masks_rembg.DownloadError as exc:
            log.info("masks: the model download failed (%s); the masks stage says what it uses instead", exc)


def key_inputs(cfg: Any) -> dict:
    """What the masks depend on besides the config: the rembg model file that ``auto`` and
    ``rembg`` find on this machine (``auto`` without one makes GrabCut masks), so installing or
    replacing a model makes new masks. A ``model_path`` is already in the key by its content."""
    if cfg.method not in ("auto", "rembg") or cfg.model_path:
        return {}
    from stages.masks.rembg import local_model

    found = local_model(cfg.model)
    return {"rembg_model": _file_digest(found) if found is not None else "absent"}


_DIGESTS: dict[tuple, str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so a batch hashes the model once."""
    from pipeline.fsutil import sha256_file

    st = path.stat()
    token = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if token not in _DIGESTS:
        _DIGESTS[token] = "sha256:" + sha256_file(path)
    return _DIGESTS[token]


def fallbacks(cfg: Any, summary: dict) -> list[str]:
    """One line per choice the stage made in place of what was asked: the closing ``done:`` line
    and the report repeat them."""
    from stages.masks.rembg import model_file

    out = []
    if cfg.method == "auto" and summary.get("fallback", {}).get("from", summary["method"]) == "grabcut":
        out.append(f"no rembg model on disk ({model_file(cfg.model)}): model-free GrabCut masks")
    hull = summary.get("freespace") or {}
    first = summary.get("retried", {}).get("seed", summary.get("seed"))
    if first in ("points", "seen_through") and hull.get("reason"):
        out.append(f"free-space hull refused ({hull['reason']}): GrabCut seeded from {seeds.NAMES[first]}")
    if "retried" in summary:
        out.append(f"the masks seeded from {seeds.NAMES[summary['retried']['seed']]} were implausible "
                   f"({summary['retried']['reason']}): redone seeded from {seeds.NAMES[summary['seed']]}")
    if "fallback" in summary:
        fb = summary["fallback"]
        out.append(f"the {fb['from']} masks are implausible ({fb['reason']}): set aside in {fb['masks']}/, "
                   "trained in scene mode")
    return out
