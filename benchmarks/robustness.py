"""Object isolation on scenes the pipeline was not tuned on: masks and bounds, per scene.

For each generated scene (``pipeline.synthetic``: Spot as the reference, trimesh shapes that
are plain-coloured, procedurally coloured or coloured like the background; small, large and
dark-on-dark framings) the harness runs the CLI (``run --images ... --gt ... --until
sfm_points``) and measures, from the stage folders: the exit code and first FAILED line, the
mask IoU against the GT masks (mean, min; ``masks.json`` method and flags), and the bounding
sphere (``sfm_points/scene.json``) against the GT object's sphere after a similarity aligning
the SfM camera centres to the GT ones (centre error and radius ratio, in GT radii). ``--full``
runs to ``evaluate`` and adds Chamfer-L1 / F-score. ``--real`` adds the Middlebury dino and
temple (exact cameras, a README-recipe silhouette as approximate reference) and the skull (no
GT). Status: FAIL = non-zero exit; WRONG = exit 0 but mask IoU < 0.8, radius ratio outside
[0.8, 2] or centre error > 0.25 (the worst outcome); OK otherwise. A markdown table is printed
last; ``--out`` writes JSON. Scenes are cached in ``--workdir`` (``--fresh`` reruns the CLI).

    python benchmarks/robustness.py --list
    python benchmarks/robustness.py --out robustness.json                 # CPU: 24 views 320x240
    python benchmarks/robustness.py --scenes spot,torus_plain --real --out r.json
    python benchmarks/robustness.py --views 100 --width 640 --height 480 --preset default \\
        --device cuda --full --out robustness_gpu.json                  # GPU machine

On the GPU machine (no network) install the wheels first, as for ``benchmarks/e2e.py``; the real
sets are read from ``--data`` (default: ``shared/data`` next to or inside the checkout).
"""
from __future__ import annotations

import sys
from pathlib import Path

from bench_paths import ROOT  # noqa: E402

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.align import umeyama  # noqa: E402
from pipeline.cameras import Cameras, load_transforms  # noqa: E402
from robustness_scenes import BY_NAME, SCENES, SHAPES, Scene, generate_scene, write_mesh  # noqa: E402,F401

DATA = next((p for p in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data") if p.is_dir()),
            ROOT.parent / "shared" / "data")
IOU_MIN, RATIO_RANGE, CENTRE_MAX = 0.8, (0.8, 2.0), 0.25
BOX_PAD_PX = 8  # Middlebury reference silhouettes are cut to the README box's projection grown by this


# ---------------------------------------------------------------- measures

def mask_iou(pred: np.ndarray, ref: np.ndarray, A: np.ndarray | None = None) -> float:
    """IoU of ``pred`` resampled into ``ref``'s pixels by ``A`` (3x3, continuous pixel coordinates
    with pixel centres at +0.5; None = identity), over the ref pixels that ``pred``'s image covers."""
    h, w = ref.shape[:2]
    T = np.array([[1.0, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])  # pixel index -> continuous
    M = (np.linalg.inv(T) @ (np.eye(3) if A is None else A) @ T)[:2]
    p = cv2.warpAffine((pred > 0).astype(np.uint8), M, (w, h), flags=cv2.INTER_NEAREST) > 0
    valid = cv2.warpAffine(np.ones(pred.shape[:2], np.uint8), M, (w, h), flags=cv2.INTER_NEAREST) > 0
    r = (ref > 0) & valid
    union = np.count_nonzero(p | r)
    return 1.0 if union == 0 else float(np.count_nonzero(p & r) / union)


def align(est_centres: np.ndarray, ref_centres: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
    """Similarity (s, R, t) taking estimated camera centres to reference ones, and the RMS residual."""
    s, R, t = umeyama(est_centres, ref_centres)
    res = np.linalg.norm(s * est_centres @ R.T + t - ref_centres, axis=1)
    return s, R, t, float(np.sqrt(np.mean(res ** 2)))


def sphere_errors(centre, radius: float, sim, gt_centre, gt_radius: float) -> tuple[float, float]:
    """(centre error, radius ratio) of a sphere moved by ``sim`` = (s, R, t), in GT radii."""
    s, R, t = sim[:3]
    c = s * R @ np.asarray(centre, float) + t
    return float(np.linalg.norm(c - np.asarray(gt_centre, float)) / gt_radius), float(s * radius / gt_radius)


def recipe_silhouette(rgb: np.ndarray, threshold: float = 0.19, dilate: int = 10, erode: int = 7) -> np.ndarray:
    """Middlebury README recipe: threshold (any channel, values 0..1), dilate, erode (disks)."""
    m = (rgb.max(axis=2) > threshold * 255).astype(np.uint8)
    dk, ek = (cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)) for r in (dilate, erode))
    return cv2.erode(cv2.dilate(m, dk), ek) > 0


def classify(row: dict) -> tuple[str, list[str]]:
    """OK / FAIL (non-zero exit) / WRONG (exit 0 with evidence of a wrong result) and why."""
    if row.get("rc") != 0:
        return "FAIL", [row.get("first_error") or f"exit {row.get('rc')}"]
    why = []
    if row.get("iou_mean") is not None and row["iou_mean"] < IOU_MIN:
        why.append(f"mask IoU {row['iou_mean']:.2f} < {IOU_MIN}")
    ratio = row.get("radius_ratio")
    if ratio is not None and not RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]:
        why.append(f"radius ratio {ratio:.2f} outside {list(RATIO_RANGE)}")
    if row.get("centre_err") is not None and row["centre_err"] > CENTRE_MAX:
        why.append(f"centre error {row['centre_err']:.2f} > {CENTRE_MAX}")
    return ("WRONG" if why else "OK"), why


def stage_dirs(run_dir: Path) -> dict[str, Path]:
    """Finished stage folders of the scene's latest plan."""
    plan_path = run_dir / "plan.json"
    if not plan_path.is_file():
        return {}
    keys = json.loads(plan_path.read_text()).get("keys", {})
    return {st: run_dir / f"{st}-{k}" for st, k in keys.items() if (run_dir / f"{st}-{k}" / "manifest.json").is_file()}


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def source_K(sfm_dir: Path, cams: Cameras) -> list[np.ndarray]:
    """Per view: the intrinsics of the frames/ image (the camera before undistortion)."""
    dist = _read(sfm_dir / "sfm.json").get("distorted_cameras") or []
    if len(dist) != 1:
        return list(cams.K)  # known cameras: images copied as they are
    m, p = dist[0]["model"], dist[0]["params"]
    fx, fy, cx, cy = (p[0], p[0], p[1], p[2]) if m.startswith("SIMPLE") or m == "RADIAL" else p[:4]
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
    return [K] * len(cams)


def view_map(dirs: dict[str, Path]) -> tuple[Cameras | None, list[str]]:
    """SfM cameras and, per SfM view, the stem of the source photo it came from."""
    if "sfm" not in dirs or "frames" not in dirs:
        return None, []
    cams = load_transforms(dirs["sfm"] / "transforms.json")
    by_stem = {Path(r["file"]).stem: Path(r.get("source_file", r["file"])).stem
               for r in _read(dirs["frames"] / "frames.json").get("frames", [])}
    return cams, [by_stem.get(Path(n).stem, "") for n in cams.names]


def measure_masks(dirs: dict[str, Path], ref_mask, ref_size: tuple[int, int]) -> dict:
    """Mask IoU per view against ``ref_mask(source_stem) -> bool array | None`` (at ``ref_size``)."""
    out: dict = {}
    if "masks" not in dirs:
        return out
    info = _read(dirs["masks"] / "masks.json")
    cov = [f["coverage"] for f in info.get("frames", [])]
    out.update(method=info.get("method"), seed=info.get("seed"), fallback=(info.get("fallback") or {}).get("from"),
               flagged=len(info.get("flagged", [])), frames=len(cov),
               coverage_mean=float(np.mean(cov)) if cov else None, coverage_min=min(cov, default=None),
               coverage_max=max(cov, default=None))
    cams, stems = view_map(dirs)
    if cams is None or ref_mask is None:
        return out
    fr = _read(dirs["frames"] / "frames.json")
    S = np.diag([ref_size[0] / fr["width"], ref_size[1] / fr["height"], 1.0])
    ious = {}
    for i, (name, K_src) in enumerate(zip(cams.names, source_K(dirs["sfm"], cams))):
        path = dirs["masks"] / "masks" / f"{Path(name).stem}.png"
        ref = ref_mask(stems[i])
        if ref is None or not path.is_file():
            continue
        pred = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        ious[stems[i]] = mask_iou(pred, ref, S @ K_src @ np.linalg.inv(cams.K[i]))  # SfM image -> source photo
    if ious:
        worst = min(ious, key=ious.get)
        out.update(iou_mean=float(np.mean(list(ious.values()))), iou_min=ious[worst], iou_worst_view=worst,
                   iou_views=len(ious))
    return out


def measure_sphere(dirs: dict[str, Path], ref_centres: dict[str, np.ndarray], gt_centre, gt_radius) -> dict:
    """Bounding sphere of scene.json against the GT sphere, after aligning SfM to reference cameras."""
    cams, stems = view_map(dirs)
    out: dict = {"registered": len(cams) if cams is not None else None}
    pairs = [(i, ref_centres[s]) for i, s in enumerate(stems) if s in ref_centres] if cams is not None else []
    if len(pairs) < 3:
        return out
    sim = align(cams.centers[[i for i, _ in pairs]], np.array([c for _, c in pairs]))
    out["cam_rms"] = sim[3] / gt_radius
    scene = _read(dirs["sfm_points"] / "scene.json") if "sfm_points" in dirs else {}
    if "sphere_radius" in scene:
        out["centre_err"], out["radius_ratio"] = sphere_errors(scene["sphere_center"], scene["sphere_radius"],
                                                               sim, gt_centre, gt_radius)
    return out


def measure_metrics(dirs: dict[str, Path]) -> dict:
    geo = _read(dirs["evaluate"] / "metrics.json").get("geometry", {}) if "evaluate" in dirs else {}
    if not geo.get("available"):
        return {}
    f = max(geo.get("fscores", []), key=lambda s: s["tau_pct"], default=None)
    return {"chamfer_pct": geo.get("chamfer_l1_pct"), "fscore": f and f["fscore"], "f_tau_pct": f and f["tau_pct"],
            "surface_chamfer_pct": geo.get("surface", {}).get("chamfer_l1_pct")}


# ---------------------------------------------------------------- references

def synthetic_reference(folder: Path):
    """(mask lookup, image size, camera centres by stem, GT centre, GT radius) of a generated scene."""
    gt = folder / "gt"
    info, cams = _read(gt / "gt.json"), load_transforms(gt / "transforms.json")

    def ref_mask(stem):
        p = gt / "masks" / f"{stem}.png"
        return cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 0 if p.is_file() else None
    centres = {Path(n).stem: c for n, c in zip(cams.names, cams.centers)}
    return ref_mask, (cams.width, cams.height), centres, info["sphere_center"], info["sphere_radius"]


def middlebury_reference(folder: Path):
    """The same from ``*_par.txt`` (P = K [R t]), the README bounding box and recipe silhouettes,
    cut to the projection of that (tight) box: the recipe's threshold also keeps the lit folds of
    the cloth beside the temple, which is not the object."""
    par = next(folder.glob("*_par.txt"))
    centres, proj = {}, {}
    for line in par.read_text().split("\n")[1:]:
        f = line.split()
        if len(f) == 22:
            K = np.array(f[1:10], float).reshape(3, 3)
            R, t = np.array(f[10:19], float).reshape(3, 3), np.array(f[19:22], float)
            centres[Path(f[0]).stem] = -R.T @ t
            proj[Path(f[0]).stem] = K @ np.hstack([R, t[:, None]])
    box = np.array(re.findall(r"\(([-\d.]+) ([-\d.]+) ([-\d.]+)\)", (folder / "README.txt").read_text()), float)
    corners = np.array([[box[i][0], box[j][1], box[k][2], 1.0] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    good = next(folder.glob("*_good_silhouette_images.txt"), None)
    keep = {Path(n).stem for n in good.read_text().split()[1:]} if good else set(centres)

    def ref_mask(stem):
        p = folder / f"{stem}.png"
        if stem not in keep or not p.is_file():
            return None
        sil = recipe_silhouette(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB))
        uvw = corners @ proj[stem].T
        region = np.zeros(sil.shape, np.uint8)
        cv2.fillConvexPoly(region, cv2.convexHull(np.round(uvw[:, :2] / uvw[:, 2:] - 0.5).astype(np.int32)), 1)
        pad = 2 * BOX_PAD_PX + 1  # the recipe's dilate/erode grows the silhouette by 3 px
        return sil & (cv2.dilate(region, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (pad, pad))) > 0)
    h, w = cv2.imread(str(next(folder.glob("*.png")))).shape[:2]
    return ref_mask, (w, h), centres, box.mean(0), float(np.linalg.norm(box[1] - box[0]) / 2)


# ---------------------------------------------------------------- running

def run_cli(images: Path, gt: Path | None, workdir: Path, name: str, args, fmt: str = "") -> dict:
    """One CLI run (``--images``, or ``--dataset --format fmt``); exit code, wall seconds, the
    first FAILED/error line; the log is kept."""
    source = ["--dataset", str(images), "--format", fmt] if fmt else ["--images", str(images)]
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "run", *source, "--workdir", str(workdir),
           "--scene", name, "--until", args.until, "--preset", args.preset, "--no-progress"]
    cmd += (["--gt", str(gt)] if gt else []) + (["--device", args.device] if args.device else [])
    cmd += [f"--set={s}" for s in args.set]
    t0 = time.time()
    log = workdir / "logs" / f"{name}.log"  # written live: tail it during long runs
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the CLI and its stage processes: the session this call started
            proc.wait()
            rc = 124
            out.write(f"\nFAILED: timed out after {args.timeout} s\n")
    text = log.read_text(errors="replace")
    lines = text.splitlines()
    first = next((ln for ln in lines if "FAILED" in ln), None) or \
        next((ln for ln in lines if re.search(r"\berror\b", ln, re.IGNORECASE)), None)
    warn = [ln.split("WARNING", 1)[1].strip()[:200] for ln in lines if " WARNING " in ln]
    return {"rc": rc, "seconds": round(time.time() - t0, 1), "first_error": first and first.strip()[:300],
            "warnings": warn[:8]}


def run_scene(scene: Scene, args) -> dict:
    """Generate (synthetic), run the CLI, measure; one result row."""
    row: dict = {"name": scene.name, "note": scene.note, "kind": "real" if scene.real else "synthetic"}
    t0 = time.time()
    if scene.real:
        images = args.data / scene.real
        ref = middlebury_reference(images) if "middlebury" in scene.real else None
        gt = None
    else:
        folder = generate_scene(scene, args.workdir / "data", args.views, args.width, args.height)
        images, gt, ref = folder / "images", folder / "gt", synthetic_reference(folder)
        row["generate_s"] = round(time.time() - t0, 1)
    runs = args.workdir / "runs"
    if args.fresh:
        shutil.rmtree(runs / scene.name, ignore_errors=True)
    row.update(run_cli(images, gt, runs, scene.name, args, scene.dataset))
    dirs = stage_dirs(runs / scene.name)
    ref_mask, size, centres, gt_c, gt_r = ref or (None, (0, 0), {}, None, None)
    row.update(measure_masks(dirs, ref_mask, size))
    if ref is not None:
        row.update(measure_sphere(dirs, centres, gt_c, gt_r))
    else:
        cams = view_map(dirs)[0]
        row["registered"] = None if cams is None else len(cams)
    row["num_images"] = _read(dirs["frames"] / "frames.json").get("num_source_frames") if "frames" in dirs else None
    row.update(measure_metrics(dirs))
    row["status"], row["why"] = classify(row)
    return row


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(rows: list[dict]) -> str:
    head = ("| scene | status | exit | masks | IoU mean | IoU min | flagged | coverage | centre err | radius ratio "
            "| reg | Chamfer % | F | s | why / first error |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f = None if r.get("fscore") is None else f"{r['fscore']:.3f}@{r['f_tau_pct']:g}%"
        flagged = f"{r['flagged']}/{r['frames']}" if r.get("flagged") is not None else "-"
        reg = f"{r['registered']}/{r.get('num_images') or '?'}" if r.get("registered") is not None else "-"
        why = "; ".join(r["why"])[:140].replace("|", "/")
        cov = "-" if r.get("coverage_mean") is None else \
            f"{r['coverage_mean']:.3f} ({r['coverage_min']:.3f}-{r['coverage_max']:.3f})"
        masks = "/".join(str(v) for v in (r.get("method"), r.get("seed")) if v) or "-"
        lines.append(f"| {r['name']} | {r['status']} | {r['rc']} | {masks} | {_f(r.get('iou_mean'))} "
                     f"| {_f(r.get('iou_min'))} | {flagged} | {cov} | {_f(r.get('centre_err'), '{:.2f}')} "
                     f"| {_f(r.get('radius_ratio'), '{:.2f}')} | {reg} | {_f(r.get('chamfer_pct'))} | {f or '-'} "
                     f"| {r['seconds']:.0f} | {why} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", default="", help="comma-separated names (default: all synthetic; see --list)")
    ap.add_argument("--list", action="store_true", help="print the scenes and exit")
    ap.add_argument("--real", action="store_true", help="add the real sets (dino, temple, skull): minutes each")
    ap.add_argument("--views", type=int, default=24)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--full", action="store_true", help="run to evaluate (Chamfer, F-score)")
    ap.add_argument("--until", default=None, help="last stage (default sfm_points; evaluate with --full)")
    ap.add_argument("--preset", default="fast_cpu")
    ap.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE, passed to the CLI")
    ap.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/robustness"))
    ap.add_argument("--data", type=Path, default=DATA, help="the shared data folder (real sets)")
    ap.add_argument("--fresh", action="store_true", help="delete each scene's run folder first")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per CLI run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.until = args.until or ("evaluate" if args.full else "sfm_points")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in SCENES:
            print(f"{s.name:18s} {'real' if s.real else s.shape + '/' + s.look:18s} {s.note}")
        return 0
    names = [n.strip() for n in args.scenes.split(",") if n.strip()] or \
        [s.name for s in SCENES if not s.real or args.real]
    if args.scenes and args.real:
        names += [s.name for s in SCENES if s.real and s.name not in names]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"unknown scene(s): {', '.join(unknown)}; --list shows them", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        print(f"[robustness] {name} ...", flush=True)
        rows.append(run_scene(BY_NAME[name], args))
        r = rows[-1]
        print(f"[robustness] {name}: {r['status']} (exit {r['rc']}, {r['seconds']:.0f} s) {'; '.join(r['why'])}",
              flush=True)
    result = {"views": args.views, "size": f"{args.width}x{args.height}", "preset": args.preset, "set": args.set,
              "until": args.until, "device": args.device, "cpus": os.cpu_count(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=float))
    print(f"\nObject isolation: {args.views} views {args.width}x{args.height}, preset {args.preset}, "
          f"until {args.until}\n\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
