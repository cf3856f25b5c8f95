"""Batches of dataset scenes: discovery, one Luigi run over all of them, CSV + HTML summary.

A failing scene does not stop the others (Luigi keeps scheduling independent tasks); the
summary names each failed scene's stage and reason.
"""
from __future__ import annotations

import csv
import fnmatch
import html
import io
from dataclasses import dataclass
from pathlib import Path

from pipeline import store
from pipeline.config import PipelineConfig
from pipeline.dag import Source
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_text, read_json

SPLITS = {
    # split: (glob under the root, dataset format handed to the importer)
    "blender": ("blender_renders/*/*/render", "omniobject3d_blender"),
    "video": ("videos_processed/*/*/standard", "omniobject3d_video"),
}


@dataclass(frozen=True)
class BatchScene:
    name: str
    source: Source


def discover(root: Path, split: str, include: str = "*", limit: int = 0) -> list[BatchScene]:
    """OmniObject3D scenes under ``root``: ``<split folder>/<category>/<object>/...``."""
    pattern, fmt = SPLITS[split]
    scenes = []
    for folder in sorted(Path(root).glob(pattern)):
        obj = folder.parent
        if not fnmatch.fnmatch(obj.name, include) and not fnmatch.fnmatch(f"{obj.parent.name}/{obj.name}", include):
            continue
        scan = Path(root) / "raw_scans" / obj.parent.name / obj.name / "Scan"
        gt = str(scan.resolve()) if (scan / "Scan.obj").is_file() else ""
        scenes.append(BatchScene(obj.name, Source("dataset", str(folder.resolve()), format=fmt, gt=gt)))
    if limit:
        scenes = scenes[:limit]
    if not scenes:
        raise PipelineError(f"{root}: no OmniObject3D scenes found under {pattern} matching '{include}'")
    return scenes


def plan_all(scenes: list[BatchScene], cfg: PipelineConfig, until: str) -> tuple[list[dict], list[dict]]:
    """Plans for the scenes whose input can be read; a failure record for the others."""
    plans, failures = [], []
    for scene in scenes:
        try:
            plans.append(store.make_plan(scene.name, scene.source, cfg, until))
        except PipelineError as exc:
            failures.append({"scene": scene.name, "stage": "input", "message": str(exc)})
    return plans, failures


def scene_rows(workdir: Path, plans: list[dict], failures: list[dict]) -> list[dict]:
    by_scene = {f["scene"]: f for f in failures}
    rows = []
    for plan in plans:
        scene, row = plan["scene"], {"scene": plan["scene"]}
        done = True
        for stage, key in plan["keys"].items():
            manifest = store.load_manifest(store.stage_dir(workdir, scene, stage, key))
            row[f"{stage}_s"] = manifest["seconds"] if manifest else ""
            done &= manifest is not None
        metrics_path = store.scene_dir(workdir, scene) / "metrics.json"
        if done and metrics_path.is_file():
            row.update({k: v for k, v in read_json(metrics_path).items() if isinstance(v, (int, float))})
        fail = by_scene.get(scene)
        row["status"] = "done" if done else "failed" if fail else "incomplete"
        row["failed_stage"] = fail["stage"] if fail else ""
        row["reason"] = fail["message"] if fail else ""
        row["fallbacks"] = "; ".join(store.plan_fallbacks(workdir, plan))
        report = store.scene_dir(workdir, scene) / "report.html"
        row["report"] = f"{scene}/report.html" if report.is_file() else ""
        rows.append(row)
    planned = {p["scene"] for p in plans}
    for fail in failures:
        if fail["scene"] not in planned:
            rows.append({"scene": fail["scene"], "status": "failed", "failed_stage": fail["stage"],
                         "reason": fail["message"], "report": ""})
    return rows


THUMBNAIL = "thumbnail.jpg"  # the evaluate stage's small mesh render, published beside report.html
STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}td.view img{display:block;max-height:90px}"
         "tr.failed{background:#fdd}tr.done{background:#efe}tr.incomplete{background:#ffd}")


def write_summary(workdir: Path, rows: list[dict]) -> tuple[Path, Path]:
    columns = ["scene", "status", "failed_stage", "reason", "fallbacks"]
    columns += sorted({k for r in rows for k in r} - set(columns) - {"report"}) + ["report"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    csv_path, html_path = workdir / "batch_summary.csv", workdir / "batch_report.html"
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(html_path, summary_page(workdir, rows, columns))
    return csv_path, html_path


def _view_cell(workdir: Path, report: str) -> str:
    """The scene's thumbnail (or the word "report") linking to its report; empty without one."""
    if not report:
        return '<td class="view"></td>'
    thumb = Path(report).with_name(THUMBNAIL).as_posix()
    inner = (f'<img src="{html.escape(thumb)}" alt="mesh render" loading="lazy">'
             if (workdir / thumb).is_file() else "report")
    return f'<td class="view"><a href="{html.escape(report)}">{inner}</a></td>'


def summary_page(workdir: Path, rows: list[dict], columns: list[str]) -> str:
    """batch_report.html: one row per scene, its thumbnail linking to its report.html."""
    ok = sum(r["status"] == "done" for r in rows)
    cells = []
    for r in rows:
        tds = [_view_cell(workdir, r.get("report", ""))]
        for c in columns[:-1]:  # the last column, report, is the view cell
            value = r.get(c, "")
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            tds.append(f'<td class="{html.escape(c)}">{html.escape(text)}</td>')
        cells.append(f'<tr class="{html.escape(r["status"])}">{"".join(tds)}</tr>')
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["report", *columns[:-1]])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Batch report</title><style>{STYLE}</style>"
            f"</head><body><h1>Batch report</h1><p>{ok} of {len(rows)} scenes done.</p>"
            f"<table><tr>{head}</tr>{''.join(cells)}</table></body></html>")
