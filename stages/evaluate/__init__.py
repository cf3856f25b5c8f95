"""Stage 8, evaluate: score the cleaned mesh and write ``metrics.json`` and ``report.html`` (with
an interactive 3D view of the mesh, ``viewer.py``) and a small render, ``thumbnail.jpg``.

With ground truth (``frames/gt/``): Chamfer-L1 and F-scores against ``gt_mesh.ply`` after
bringing the mesh into the GT frame (identity for dataset imports whose cameras are GT; else a
similarity fitted from the SfM camera centres to the GT camera centres of the same source
frames, refined by trimmed rigid ICP). With masks: silhouette IoU of the mesh rendered into
every SfM view against the masks stage's masks (and, with GT, against the GT masks in the GT
cameras). Held-out PSNR is read from ``train.json`` (``holdout_psnr``), never recomputed here.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.align import camera_errors
from pipeline.cameras import Cameras, load_transforms
from pipeline.dag import STAGES, Context
from pipeline.fsutil import atomic_write_json
from pipeline.images import read_mask
from pipeline.log import progress
import stages.evaluate.metrics as M
from stages.evaluate.scene import (HOLDOUT_EVERY, EvalScene, find_gt_mesh, gt_info, load_mesh, load_scene,
                                   pick_views, read_json, scaled_camera)

VERSION = "4"  # 3: point-to-surface Chamfer block (geometry.surface); 4: IoU against set-aside masks
DISAGREE_IOU = 0.7  # after a scene-mode fallback: a mesh this far from the set-aside masks gets a warning
PUBLISH = ("report.html", "metrics.json", "thumbnail.jpg")
ICP_POINTS = 20000  # reconstruction samples used by ICP
SURFACE_POINTS = 50000  # samples per side for the point-to-surface Chamfer (no floor: fewer suffice)


def run(inputs: dict[str, Path], cfg: Any, out_dir: Path, ctx: Context) -> dict:
    """Compute the metrics, write ``metrics.json``, ``report.html`` and ``thumbnail.jpg`` into ``out_dir``."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    scene = load_scene(inputs)
    ctx.log.info("evaluate: mesh with %d vertices, %d faces; %d views; ground truth: %s",
                 len(scene.vertices), len(scene.faces), len(scene.cams), "yes" if scene.gt_dir else "no")
    result: dict[str, Any] = {"scene": ctx.scene, "mesh": _mesh_info(scene)}
    geometry, alignment = evaluate_geometry(scene, cfg, ctx)
    result["geometry"], result["alignment"] = geometry, alignment
    ctx.log.info("evaluate: geometry %s (alignment: %s)", "scored" if geometry.get("available")
                 else geometry.get("reason"), alignment["method"])
    result["silhouette"] = evaluate_silhouettes(scene, cfg, ctx)
    result["silhouette_gt"] = evaluate_gt_silhouettes(scene, alignment, cfg, ctx)
    ctx.log.info("evaluate: silhouette IoU done; writing the report")
    result["psnr"] = read_psnr(inputs.get("train"), cfg)
    result["stage_seconds"] = stage_seconds(inputs)
    result["seconds"] = round(time.perf_counter() - start, 3)
    atomic_write_json(out_dir / "metrics.json", result)
    from stages.evaluate.report import write_report

    write_report(out_dir / "report.html", scene, result, cfg, ctx)
    summary = summarize(result)
    ctx.log.info("evaluate: %s", ", ".join(f"{k}={v}" for k, v in summary.items()))
    return summary


# ---------------------------------------------------------------- loading


def _mesh_info(scene: EvalScene) -> dict:
    info = {"vertices": int(len(scene.vertices)), "faces": int(len(scene.faces)),
            "vertex_colors": scene.colors is not None}
    cleanup = scene.inputs["cleanup"] / "cleanup.json"
    if cleanup.is_file():
        data = read_json(cleanup)
        info.update({k: v for k, v in data.items() if isinstance(v, (bool, int, float, str))})
    return info


# ---------------------------------------------------------------- alignment and geometry

def gt_view_pairs(frames_meta: dict, sfm_names: list[str], gt_names: list[str]) -> list[tuple[int, int]]:
    """(SfM view, GT view) index pairs of the same source frame.

    Video frames map by ``source_index`` (the GT views are the video frames in order); photo
    frames by the stem of ``source_file`` against the GT image stems.
    """
    by_stem = {Path(r["file"]).stem: r for r in frames_meta.get("frames", [])}
    gt_by_stem = {Path(n).stem: j for j, n in enumerate(gt_names)}
    pairs = []
    for i, name in enumerate(sfm_names):
        rec = by_stem.get(Path(name).stem)
        if rec is None:
            continue
        if "source_index" in rec and 0 <= int(rec["source_index"]) < len(gt_names):
            pairs.append((i, int(rec["source_index"])))
        elif "source_file" in rec and Path(rec["source_file"]).stem in gt_by_stem:
            pairs.append((i, gt_by_stem[Path(rec["source_file"]).stem]))
    return pairs


def reference_cameras(scene: EvalScene) -> tuple[Path, list[tuple[int, int]]]:
    """The GT-world cameras to align to and the (SfM view, reference view) pairs.

    Dataset imports: the importer's cameras (``frames/transforms.json``), matched by file stem.
    Videos and photo folders: ``gt/transforms.json``, matched through frames.json.
    """
    frames_dir = scene.inputs["frames"]
    if scene.frames_meta.get("source_kind") == "dataset":
        path = frames_dir / "transforms.json"
        if not path.is_file():
            raise LookupError("the dataset import wrote no transforms.json (no GT cameras)")
        index = {Path(n).stem: j for j, n in enumerate(load_transforms(path).names)}
        return path, [(i, index[Path(n).stem]) for i, n in enumerate(scene.cams.names) if Path(n).stem in index]
    path = scene.gt_dir / "transforms.json"
    if not path.is_file():
        raise LookupError(f"no GT cameras ({path.name} missing in the ground-truth folder)")
    return path, gt_view_pairs(scene.frames_meta, scene.cams.names, load_transforms(path).names)


def gt_is_unaligned(gt_dir: Path) -> bool:
    """``gt.json`` says ``"aligned": false`` when the GT mesh is not in the cameras' world frame."""
    return gt_info(gt_dir).get("aligned", True) is False


def region_scores(vertices: np.ndarray, faces: np.ndarray, gt: np.ndarray, gt_dir: Path, cfg: Any,
                  diag: float) -> dict:
    """Scores inside the object's region: the GT bounds grown by ``region_margin`` of the
    diagonal, without the support plane when ``gt.json`` names one (``support_plane_z``, z up).
    What a scene-mode reconstruction (ground, walls) is judged on. The faces whose centroid is
    inside are sampled afresh (as densely as the whole mesh is); GT samples are cropped alike."""
    import trimesh

    floor = gt_info(gt_dir).get("support_plane_z")
    floor = float(floor) if isinstance(floor, (int, float)) else None
    args = (gt.min(0), gt.max(0), cfg.region_margin * diag, floor, cfg.floor_margin * diag)
    inside = M.object_region(vertices[faces].mean(1), *args)
    out = {"margin_pct": 100.0 * cfg.region_margin, "support_plane_z": floor,
           "floor_margin_pct": 100.0 * cfg.floor_margin if floor is not None else None,
           "faces_inside_share": float(inside.mean()) if len(faces) else 0.0}
    keep_gt = M.object_region(gt, *args)
    if not inside.any() or not keep_gt.any():
        return {**out, "available": False, "reason": "no reconstructed surface inside the object region"}
    sub = trimesh.Trimesh(vertices, faces[inside], process=False)
    pred = np.asarray(trimesh.sample.sample_surface(sub, int(cfg.num_samples), seed=cfg.seed + 2)[0])
    pred = pred[M.object_region(pred, *args)]  # centroid inside, a corner outside: trim to the box
    return {**out, "available": True, **_score(pred, gt[keep_gt], cfg, diag)}


def align_cameras(scene: EvalScene) -> tuple[np.ndarray, dict]:
    """Similarity SfM world -> GT world fitted on camera centres (Umeyama), and its description.

    ``method`` is "identity" when the SfM cameras already are the GT cameras (dataset imports
    that skip SfM), else "umeyama_cameras"; ``pairs`` and ``reference`` say what was matched.
    """
    path, pairs = reference_cameras(scene)
    if len(pairs) < 3:
        raise LookupError(f"only {len(pairs)} SfM views map to GT views (need 3)")
    ref = load_transforms(path)
    src = scene.cams.centers[[i for i, _ in pairs]]
    dst = ref.centers[[j for _, j in pairs]]
    T = M.umeyama(src, dst)
    err = np.linalg.norm(M.transform_points(T, src) - dst, axis=1)
    radius = float(ref.extra.get("sphere_radius") or np.linalg.norm(dst - dst.mean(0), axis=1).mean())
    rmse = float(np.sqrt(np.mean(err ** 2)))
    identity = np.allclose(src, dst, rtol=0.0, atol=1e-6 * radius)
    cam_err = camera_errors(scene.cams.c2w[[i for i, _ in pairs]], ref.c2w[[j for _, j in pairs]])
    info = {"method": "identity" if identity else "umeyama_cameras",
            "reference": path.relative_to(scene.inputs["frames"]).as_posix(), "num_cameras": len(pairs),
            "scale": M.similarity_scale(T), "camera_rmse": rmse, "camera_rmse_pct_radius": 100.0 * rmse / radius,
            "rotation_error_deg_median": cam_err["rotation_deg_median"],
            "relative_rotation_error_deg_median": cam_err["relative_rotation_deg_median"], "pairs": pairs}
    return (np.eye(4) if identity else T), info


def _score(pred: np.ndarray, gt: np.ndarray, cfg: Any, diag: float, meshes: tuple | None = None) -> dict:
    """Chamfer-L1 (absolute and % of ``diag``), accuracy, completeness and F-scores of two point
    samples; with ``meshes`` (predicted and GT ``(vertices, faces)``) a ``surface`` block: the
    same from point-to-surface distances (SURFACE_POINTS of the samples each way), free of the
    point samples' floor (0.1 % of the diagonal at 200k samples: a perfect mesh does not read 0
    above)."""
    taus = [f * diag for f in cfg.fscore_thresholds]
    raw = M.chamfer_fscore(pred, gt, taus)
    out = {k: raw[k] for k in ("chamfer_l1", "accuracy", "completeness")}
    out.update({f"{k}_pct": 100.0 * raw[k] / diag for k in ("chamfer_l1", "accuracy", "completeness")})
    out["fscores"] = [{**s, "tau_pct": 100.0 * f} for s, f in zip(raw["fscores"], cfg.fscore_thresholds)]
    if meshes is not None:
        rng = np.random.default_rng(cfg.seed)
        sub = [p[rng.permutation(len(p))[:SURFACE_POINTS]] for p in (pred, gt)]
        surf = M.chamfer_fscore_surface(sub[0], meshes[0], sub[1], meshes[1], taus)
        out["surface"] = {f"{k}_pct": 100.0 * surf[k] / diag for k in ("chamfer_l1", "accuracy", "completeness")}
        out["surface"]["fscores"] = [{**s, "tau_pct": 100.0 * f}
                                     for s, f in zip(surf["fscores"], cfg.fscore_thresholds)]
    return out


def evaluate_geometry(scene: EvalScene, cfg: Any, ctx: Context) -> tuple[dict, dict]:
    """Chamfer / F-score against the GT mesh (or why not) and the alignment used."""
    import trimesh

    if scene.gt_dir is None:
        return {"available": False, "reason": "no ground truth for this scene"}, {"method": "none"}
    gt_path = find_gt_mesh(scene.gt_dir)
    if gt_path is None:
        return {"available": False, "reason": "the ground-truth folder holds no mesh"}, {"method": "none"}
    if len(scene.faces) == 0:
        return {"available": False, "reason": "the reconstructed mesh is empty"}, {"method": "none"}
    try:
        T, alignment = align_cameras(scene)
        unaligned = gt_is_unaligned(scene.gt_dir)
    except LookupError as exc:
        ctx.log.warning("evaluate: cannot align to ground truth: %s", exc)
        return {"available": False, "reason": f"cannot align to ground truth: {exc}"}, {"method": "none"}
    gt_v, gt_f, _ = load_mesh(gt_path)
    gt_mesh = trimesh.Trimesh(gt_v, gt_f, process=False)
    diag = float(np.linalg.norm(gt_v.max(0) - gt_v.min(0)))
    n = int(cfg.num_samples)
    gt_pts = np.asarray(trimesh.sample.sample_surface(gt_mesh, n, seed=cfg.seed)[0])
    pred_local = np.asarray(trimesh.sample.sample_surface(
        trimesh.Trimesh(scene.vertices, scene.faces, process=False), n, seed=cfg.seed + 1)[0])
    geometry = {"available": True, "gt_mesh": gt_path.relative_to(scene.gt_dir.parent).as_posix(),
                "bbox_diagonal": diag, "num_samples": n}
    if unaligned:  # the GT mesh is not in the cameras' frame (OmniObject3D video scans)
        sub = pred_local[np.random.default_rng(cfg.seed).permutation(n)[:ICP_POINTS // 4]]
        T_shape, icp = M.align_by_shape(M.transform_points(T, sub), gt_pts[:ICP_POINTS // 4])
        T = T_shape @ T
        alignment.update(method="shape_icp_with_scale", icp=icp,
                         note="the ground truth is not registered to the cameras: scored after a similarity "
                              "fitted by ICP (24 axis-rotation starts), which can hide a global scale or pose error")
    if alignment["method"] not in ("identity", "shape_icp_with_scale") and cfg.icp_iterations > 0:
        sub = pred_local[np.random.default_rng(cfg.seed).permutation(n)[:ICP_POINTS]]
        T_icp, icp = M.icp_refine(sub, gt_pts, T, cfg.icp_iterations)
        angle, shift = M.motion_size(T_icp @ np.linalg.inv(T))
        alignment.update(method="umeyama_cameras+icp", icp={**icp, "rotation_deg": angle, "translation": shift})
        before = _score(M.transform_points(T, pred_local), gt_pts, cfg, diag)
        geometry["before_icp"] = {k: v for k, v in before.items() if k in ("chamfer_l1", "chamfer_l1_pct", "fscores")}
        T = T_icp
    verts = M.transform_points(T, scene.vertices)
    geometry.update(_score(M.transform_points(T, pred_local), gt_pts, cfg, diag, ((verts, scene.faces), (gt_v, gt_f))))
    geometry["object_region"] = region_scores(verts, scene.faces, gt_pts, scene.gt_dir, cfg, diag)
    alignment["sfm_to_gt"] = T.tolist()
    return geometry, alignment


# ---------------------------------------------------------------- silhouettes


def silhouette_ious(vertices, faces, cams: Cameras, views: list[int], mask_paths: list[Path],
                    max_side: int, show_progress: bool = False) -> dict[str, float]:
    """Per-view silhouette IoU {view name: iou} of the mesh against the mask files."""
    ious = {}
    for i, path in progress(list(zip(views, mask_paths)), show_progress, desc="silhouette IoU", unit="view"):
        K, w, h = scaled_camera(cams.K[i], cams.width, cams.height, max_side)
        sil = M.render_silhouette(vertices, faces, K, cams.c2w[i], w, h)
        ious[cams.names[i]] = M.silhouette_iou(sil, read_mask(path, (w, h), resize=True))
    return ious


def _iou_summary(ious: dict, against: str) -> dict:
    values = np.array(list(ious.values()))
    worst = min(ious, key=ious.get)
    return {"available": True, "against": against, "num_views": len(values), "mean_iou": float(values.mean()),
            "median_iou": float(np.median(values)), "min_iou": float(values.min()), "worst_view": worst,
            "per_view": ious}


def set_aside_masks(masks_dir: Path) -> Path | None:
    """The folder of masks the masks stage set aside when it fell back to scene mode, or None."""
    try:
        folder = json.loads((masks_dir / "masks.json").read_text()).get("fallback", {}).get("masks")
    except (OSError, ValueError, AttributeError):
        return None
    return masks_dir / folder if folder and (masks_dir / folder).is_dir() else None


def evaluate_silhouettes(scene: EvalScene, cfg: Any, ctx: Context) -> dict:
    """Silhouette IoU against the masks stage's masks; after a scene-mode fallback against the
    masks it set aside, with a warning when the two disagree (DISAGREE_IOU)."""
    mask_dir, against = scene.inputs["masks"] / "masks", "masks stage, SfM cameras"
    aside = None if mask_dir.is_dir() else set_aside_masks(scene.inputs["masks"])
    if aside is not None:
        mask_dir, against = aside, "masks set aside by the masks stage (scene-mode fallback), SfM cameras"
    views, paths = [], []
    for i in pick_views(len(scene.cams), cfg.iou_max_views):
        path = mask_dir / f"{Path(scene.cams.names[i]).stem}.png"
        if path.is_file():
            views.append(i)
            paths.append(path)
    if not views:
        return {"available": False, "reason": "no masks for this scene"}
    ious = silhouette_ious(scene.vertices, scene.faces, scene.cams, views, paths, cfg.render_max_side, ctx.progress)
    out = _iou_summary(ious, against)
    if aside is not None and out["mean_iou"] < DISAGREE_IOU:
        out["warning"] = (f"the scene-mode mesh and the masks set aside in {aside.name}/ disagree (mean silhouette "
                          f"IoU {out['mean_iou']:.2f} < {DISAGREE_IOU:g}): at least one of them is wrong; look at "
                          "the mesh before using it")
        ctx.log.warning("evaluate: %s", out["warning"])
    return out


def evaluate_gt_silhouettes(scene: EvalScene, alignment: dict, cfg: Any, ctx: Context) -> dict:
    """IoU of the aligned mesh in the GT cameras against the GT masks (synthetic scenes)."""
    pairs = alignment.get("pairs") or []
    if scene.gt_dir is None or not pairs or alignment.get("reference") != f"{scene.gt_dir.name}/transforms.json" \
            or not (scene.gt_dir / "masks").is_dir():
        return {"available": False, "reason": "needs GT masks, GT cameras and an alignment to them"}
    gt_cams = load_transforms(scene.gt_dir / "transforms.json")
    vertices = M.transform_points(np.asarray(alignment["sfm_to_gt"]), scene.vertices)
    chosen = [pairs[k] for k in pick_views(len(pairs), cfg.iou_max_views)]
    views, paths = [], []
    for _, j in chosen:
        path = scene.gt_dir / "masks" / f"{Path(gt_cams.names[j]).stem}.png"
        if path.is_file():
            views.append(j)
            paths.append(path)
    if not views:
        return {"available": False, "reason": "no GT mask matches the evaluated views"}
    ious = silhouette_ious(vertices, scene.faces, gt_cams, views, paths, cfg.render_max_side, ctx.progress)
    return _iou_summary(ious, "GT masks, GT cameras, aligned mesh")


# ---------------------------------------------------------------- PSNR, times, summary

def read_psnr(train_dir: Path | None, cfg: Any) -> dict:
    """Held-out PSNR from train.json (``holdout_psnr`` over ``holdout_psnr_views``) when the train
    stage measured it, else the reason it is missing. Training PSNR: ``train_psnr`` (or ``psnr``)."""
    data = {}
    if train_dir is not None and (train_dir / "train.json").is_file():
        data = read_json(train_dir / "train.json")
    out: dict[str, Any] = {}
    train_psnr = data.get("train_psnr", data.get("psnr"))
    if isinstance(train_psnr, (int, float)) and math.isfinite(train_psnr):
        out["train_psnr"] = float(train_psnr)
    value = data.get("holdout_psnr")
    views = data.get("holdout_psnr_views", data.get("holdout_views"))
    if not cfg.holdout:
        out.update(available=False, reason="evaluate.holdout is false: held-out PSNR not reported")
    elif isinstance(value, (int, float)) and math.isfinite(value):
        out.update(available=True, holdout_psnr=float(value))
        if isinstance(views, list):
            out["num_views"] = len(views)
    elif not data:
        out.update(available=False, reason="train.json is missing")
    elif data.get("holdout_views") == []:
        out.update(available=False, reason="no views were held out from training (too few views for "
                                            f"one in {HOLDOUT_EVERY}, or train.holdout_every off)")
    else:
        out.update(available=False, reason="train.json has no holdout_psnr (the train stage did not "
                                            "render the held-out views)")
    return out


def stage_seconds(inputs: dict[str, Path]) -> dict[str, float | None]:
    """Wall time of every upstream stage from its manifest.json (None when unreadable)."""
    out = {}
    for name in STAGES:
        if name not in inputs:
            continue
        try:
            out[name] = float(json.loads((inputs[name] / "manifest.json").read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            out[name] = None
    return out


def summarize(result: dict) -> dict:
    """The few numbers that go into the manifest summary."""
    out: dict[str, Any] = {"alignment": result["alignment"]["method"]}
    geo = result["geometry"]
    if geo.get("available"):
        out["chamfer_l1_pct"] = round(geo["chamfer_l1_pct"], 4)
        for s in geo["fscores"]:
            out[f"fscore@{s['tau_pct']:g}%"] = round(s["fscore"], 4)
        if geo.get("object_region", {}).get("available"):
            out["region_chamfer_l1_pct"] = round(geo["object_region"]["chamfer_l1_pct"], 4)
    for key in ("silhouette", "silhouette_gt"):
        if result[key].get("available"):
            out[f"{key}_mean_iou"] = round(result[key]["mean_iou"], 4)
    if result["psnr"].get("available"):
        out["holdout_psnr"] = round(result["psnr"]["holdout_psnr"], 3)
    return out
