"""The per-scene ``report.html`` of the evaluate stage: one self-contained file (pictures are
base64 data URIs, styles and scripts inline, a Content-Security-Policy that allows no request)
with the metrics, an interactive 3D view (``viewer.py``), stage times, input frames, masks,
cameras and bounding sphere, training curves and mesh renders; and ``thumbnail.jpg`` beside it.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dag import STAGES
from pipeline.fsutil import atomic_write_bytes, atomic_write_text
import stages.evaluate.figures as F
from pipeline.images import read_mask
from stages.evaluate.scene import bounding_sphere, held_out_views, pick_views, scaled_camera
from stages.evaluate.viewer import CSP, CSS as VIEWER_CSS, viewer_section

THUMB_SIDE = 160  # contact sheet thumbnails
OVERLAY_COUNT = 8  # frames with their mask overlaid
RENDER_VIEWS = 4  # mesh renders next to input frames
THUMBNAIL = "thumbnail.jpg"  # the first mesh render, small, for the batch report

CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; font-family: monospace; }
img { max-width: 100%; height: auto; display: block; } figure { margin: 8px 0 16px 0; }
figcaption, .note { color: #555; font-size: 90%; } .row { display: flex; gap: 8px; flex-wrap: wrap; }
.row figure { flex: 1 1 30%; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{esc(fmt(c))}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
        else f"<td>{esc(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(uri: str, caption: str, alt: str = "") -> str:
    return (f'<figure><img src="{uri}" alt="{esc(alt or caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


# ---------------------------------------------------------------- sections

def metrics_section(m: dict) -> str:
    rows: list[list[Any]] = []
    geo = m["geometry"]
    if geo.get("available"):
        rows.append(["Chamfer-L1", geo["chamfer_l1"], f"{geo['chamfer_l1_pct']:.3f} % of GT diagonal"])
        rows.append(["accuracy (mesh → GT)", geo["accuracy"], f"{geo['accuracy_pct']:.3f} %"])
        rows.append(["completeness (GT → mesh)", geo["completeness"], f"{geo['completeness_pct']:.3f} %"])
        surf = geo.get("surface")
        if surf:
            rows.append(["Chamfer-L1 to the surfaces", None,
                         f"{surf['chamfer_l1_pct']:.3f} % (accuracy {surf['accuracy_pct']:.3f} %, completeness "
                         f"{surf['completeness_pct']:.3f} %): point-to-surface, no sampling floor"])
        for s in geo["fscores"]:
            rows.append([f"F-score @ {s['tau_pct']:g} % ({s['tau']:.4g})", s["fscore"],
                         f"precision {s['precision']:.3f}, recall {s['recall']:.3f}"])
        if "before_icp" in geo:
            before = geo["before_icp"]
            rows.append(["Chamfer-L1 before ICP", before["chamfer_l1"],
                         f"{before['chamfer_l1_pct']:.3f} % of GT diagonal (camera alignment only)"])
        region = geo.get("object_region", {})
        if region.get("available"):
            floor = "" if region["support_plane_z"] is None else ", support plane left out"
            rows.append(["Chamfer-L1, object region", region["chamfer_l1"],
                         f"{region['chamfer_l1_pct']:.3f} % (GT bounds + {region['margin_pct']:g} %{floor}; "
                         f"{100 * region['faces_inside_share']:.0f} % of the faces inside)"])
    else:
        rows.append(["Chamfer-L1 / F-score", None, geo.get("reason", "")])
    for key, label in (("silhouette", "silhouette IoU"), ("silhouette_gt", "silhouette IoU vs GT")):
        s = m[key]
        if s.get("available"):
            rows.append([f"{label} (mean)", s["mean_iou"],
                         f"{s['against']}; {s['num_views']} views, min {s['min_iou']:.3f} ({s['worst_view']})"
                         + (f". Warning: {s['warning']}" if s.get("warning") else "")])
        elif key == "silhouette":
            rows.append([label, None, s.get("reason", "")])
    p = m["psnr"]
    rows.append(["held-out PSNR (dB)", p.get("holdout_psnr"),
                 f"mean over {p.get('num_views', '?')} views not used in training" if p.get("available")
                 else p.get("reason", "")])
    if "train_psnr" in p:
        rows.append(["training PSNR (dB)", p["train_psnr"], "from train.json"])
    mesh = m["mesh"]
    rows.append(["mesh", f"{mesh['vertices']} vertices, {mesh['faces']} faces",
                 ", ".join(f"{k} {fmt(v)}" for k, v in mesh.items() if k not in ("vertices", "faces"))])
    a = m["alignment"]
    detail = ", ".join(f"{k} {fmt(v)}" for k, v in a.items() if isinstance(v, (int, float, str)) and k != "method")
    if "icp" in a:
        detail += f"; ICP moved {a['icp']['rotation_deg']:.3g} deg, {a['icp']['translation']:.3g}"
    rows.append(["alignment to GT", a["method"], detail])
    out = "<h2>Metrics</h2>" + table(["metric", "value", "details"], rows)
    if m["silhouette"].get("available") and len(m["silhouette"]["per_view"]) > 1:
        out += figure(F.data_uri(F.iou_plot(m["silhouette"]["per_view"])), "silhouette IoU per view")
    return out


def _manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def fallbacks_section(scene) -> str:
    """What the stages chose in place of what was asked (their summaries' ``fallbacks``); empty
    when nothing fell back."""
    stages = sorted(scene.inputs.items(), key=lambda item: STAGES.index(item[0]))
    lines = [f"{name}: {line}" for name, folder in stages if folder is not None
             for line in (_manifest(folder).get("summary") or {}).get("fallbacks") or []]
    if not lines:
        return ""
    return ('<h2>Fallbacks</h2><ul class="fallbacks">' + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>")


def times_section(scene, m: dict) -> str:
    rows, total = [], 0.0
    for name, seconds in m["stage_seconds"].items():
        summary = _manifest(scene.inputs[name]).get("summary") or {}
        brief = ", ".join(f"{k}={fmt(v)}" for k, v in list(summary.items())[:6]
                          if isinstance(v, (int, float, str, bool)))
        rows.append([name, seconds, brief])
        total += seconds or 0.0
    rows.append(["evaluate", m["seconds"], "metrics (the report adds a little)"])
    rows.append(["total", total + m["seconds"], ""])
    return "<h2>Stage times (s)</h2>" + table(["stage", "seconds", "summary"], rows)


def frames_section(scene, cfg) -> str:
    records = scene.frames_meta.get("frames", [])
    if not records:
        return "<h2>Input frames</h2>" + note("frames.json lists no frames")
    pick = pick_views(len(records), cfg.report_frames)
    thumbs = [F.load_rgb(scene.inputs["frames"] / records[i]["file"], THUMB_SIDE) for i in pick]
    labels = [Path(records[i]["file"]).stem for i in pick]
    sheet = F.grid(thumbs, labels, columns=8)
    return ("<h2>Input frames</h2>" + figure(F.data_uri(sheet, "JPEG"),
            f"{len(pick)} of {len(records)} frames ({scene.frames_meta.get('source_kind', '?')} input, "
            f"{scene.frames_meta.get('width')}x{scene.frames_meta.get('height')})"))


def masks_section(scene) -> str:
    mask_dir = scene.inputs["masks"] / "masks"
    views = [i for i in pick_views(len(scene.cams), OVERLAY_COUNT)
             if (mask_dir / f"{Path(scene.cams.names[i]).stem}.png").is_file()]
    if not views:
        info_path = scene.inputs["masks"] / "masks.json"
        fallback = json.loads(info_path.read_text()).get("fallback") if info_path.is_file() else None
        if fallback:
            return "<h2>Masks</h2>" + note(f"the {fallback['from']} masks were set aside ({fallback['reason']}; "
                                           f"they are in {fallback['masks']}/): trained in scene mode, without masks")
        return "<h2>Masks</h2>" + note("no masks for this scene")
    tiles, labels = [], []
    for i in views:
        rgb = F.load_rgb(scene.inputs["sfm"] / scene.cams.names[i], 2 * THUMB_SIDE)
        mask = read_mask(mask_dir / f"{Path(scene.cams.names[i]).stem}.png", (rgb.shape[1], rgb.shape[0]),
                         resize=True)
        tiles.append(F.overlay_mask(rgb, mask))
        labels.append(f"{Path(scene.cams.names[i]).stem} ({100 * mask.mean():.0f} %)")
    return "<h2>Masks</h2>" + figure(F.data_uri(F.grid(tiles, labels, columns=4), "JPEG"),
                                     "masks over the undistorted frames (outline red, outside darkened; "
                                     "share of the image covered)")


def cameras_section(scene, cfg) -> str:
    sp = scene.inputs.get("sfm_points")
    center, radius = bounding_sphere(scene)
    points = np.load(sp / "points.npy", allow_pickle=False) if sp and (sp / "points.npy").is_file() else None
    held = held_out_views(scene, cfg)
    png = F.camera_plot(scene.cams.c2w, center, radius, points, held)
    caption = (f"SfM cameras (arrows: viewing direction), bounding sphere (green, centre "
               f"{np.round(center, 3).tolist()}, radius {radius:.4g})"
               + (f", {len(points)} SfM points (grey)" if points is not None else ""))
    return "<h2>Cameras and bounding sphere</h2>" + figure(F.data_uri(png), caption)


def training_section(scene) -> str:
    train_dir = scene.inputs.get("train")
    curves = F.read_scalars(train_dir) if train_dir else {}
    info = {}
    if train_dir and (train_dir / "train.json").is_file():
        data = json.loads((train_dir / "train.json").read_text())
        info = {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool))}
    out = "<h2>Training</h2>"
    if info:
        out += table(["train.json", "value"], [[k, v] for k, v in info.items()])
    if not curves:
        return out + note("no training curves (no curve in train.json, no TensorBoard events)")
    return out + figure(F.data_uri(F.training_plot(curves)), f"{len(curves)} scalar curves")


def renders_section(scene, cfg, thumbnail: Path | None = None) -> str:
    """Mesh renders next to the input frames; the first render also goes to ``thumbnail``."""
    held = held_out_views(scene, cfg)
    candidates = held if len(held) >= RENDER_VIEWS else list(range(len(scene.cams)))
    views = [candidates[k] for k in pick_views(len(candidates), RENDER_VIEWS)]
    mask_dir = scene.inputs["masks"] / "masks"
    blocks = []
    for i in views:
        K, w, h = scaled_camera(scene.cams.K[i], scene.cams.width, scene.cams.height, cfg.render_max_side)
        render, covered = F.render_shaded(scene.vertices, scene.faces, scene.colors, K, scene.cams.c2w[i], w, h)
        frame = F.load_rgb(scene.inputs["sfm"] / scene.cams.names[i], size=(w, h))
        name = Path(scene.cams.names[i]).stem
        if thumbnail is not None and i == views[0]:
            atomic_write_bytes(thumbnail, F.encode(render, "JPEG", max_side=THUMB_SIDE))
        note_held = " (held out from training)" if i in held else ""
        cells = [figure(F.data_uri(frame, "JPEG"), f"input frame {name}{note_held}"),
                 figure(F.data_uri(render, "JPEG"), f"mesh from camera {name}")]
        mask_path = mask_dir / f"{name}.png"
        if mask_path.is_file():
            cmp = F.compare_silhouettes(covered, read_mask(mask_path, (w, h), resize=True))
            cells.append(figure(F.data_uri(cmp), "silhouette: grey both, red mask only, blue mesh only"))
        blocks.append('<div class="row">' + "".join(cells) + "</div>")
    return ("<h2>Mesh renders next to the input frames</h2>"
            + note("Lambertian head-light shading" + (" with vertex colours" if scene.colors is not None else ""))
            + "".join(blocks))


def write_report(path: Path, scene, m: dict, cfg, ctx) -> None:
    """Assemble and write ``report.html`` (and ``thumbnail.jpg`` beside it); each section is
    independent of the others."""
    sections = [fallbacks_section(scene), metrics_section(m), viewer_section(scene, cfg.viewer_faces), times_section(scene, m),
                frames_section(scene, cfg), masks_section(scene), cameras_section(scene, cfg), training_section(scene),
                renders_section(scene, cfg, path.with_name(THUMBNAIL))]
    title = f"Reconstruction report: {ctx.scene}"
    doc = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
           f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>{esc(title)}</title>'
           f"<style>{CSS}{VIEWER_CSS}</style></head><body>"
           f"<h1>{esc(title)}</h1>"
           + note(f"written {time.strftime('%Y-%m-%d %H:%M:%S')}; source: "
                  f"{scene.frames_meta.get('source_kind', '?')}; ground truth: {'yes' if scene.gt_dir else 'no'}")
           + "".join(sections) + "</body></html>\n")
    atomic_write_text(path, doc)
