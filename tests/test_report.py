"""The evaluate stage's report.html: self-contained (only data URIs, no external references),
every picture decodes, and headless Chromium (when installed) loads it without console errors
with every image decoded."""
from __future__ import annotations

import base64
import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import EvaluateConfig
try:  # pytest's default import mode puts tests/ on sys.path; --import-mode=importlib does not
    from test_evaluate import build_inputs, perturbed_gt, random_similarity, run_stage, synthetic_scene
except ImportError:
    from tests.test_evaluate import build_inputs, perturbed_gt, random_similarity, run_stage, synthetic_scene

CHROMIUM = Path("/usr/bin/chromium")
CFG = EvaluateConfig(num_samples=5000, icp_iterations=5, iou_max_views=4, render_max_side=320, report_frames=16)
IMG_CHECK = """<script>window.addEventListener("load", function () {
  var imgs = document.images, bad = 0;
  for (var i = 0; i < imgs.length; i++) { if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) bad++; }
  document.body.setAttribute("data-img-check", imgs.length + ":" + bad);
});</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    syn = synthetic_scene(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("report")
    inputs = build_inputs(root / "in", syn, random_similarity(3), perturbed_gt(syn / "gt", 0.003))
    metrics = run_stage(inputs, root / "out", CFG)
    return root / "out" / "report.html", metrics


def test_report_is_self_contained_and_every_image_decodes(report):
    path, metrics = report
    text = path.read_text()
    assert "http://" not in text and "https://" not in text and 'src="file' not in text
    assert "<script" not in text and "<link" not in text and "url(" not in text
    sources = re.findall(r'<img src="([^"]*)"', text)
    assert len(sources) == text.count("<img") >= 10
    for src in sources:
        head, _, payload = src.partition(",")
        assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as img:
            img.load()
            assert min(img.size) >= 16
    for heading in ("Metrics", "Stage times", "Input frames", "Masks", "Cameras and bounding sphere",
                    "Training", "Mesh renders next to the input frames"):
        assert f"<h2>{heading}" in text, heading
    chamfer = metrics["geometry"]["chamfer_l1_pct"]
    assert f"{chamfer:.3f} % of GT diagonal" in text
    assert "2 scalar curves" in text  # the two tags the test wrote with SummaryWriter


def test_report_section_pictures_show_what_they_claim(report, tmp_path):
    """The mesh render from an input camera covers the same pixels as that frame's mask."""
    text = report[0].read_text()
    uris = re.findall(r'<img src="data:image/(?:png|jpeg);base64,([^"]*)" alt="silhouette: grey both', text)
    assert len(uris) == 4
    for payload in uris:
        cmp = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")).reshape(-1, 3)
        both = np.all(cmp == (150, 150, 150), axis=1).sum()
        disagree = np.all(cmp == (230, 50, 50), axis=1).sum() + np.all(cmp == (50, 90, 230), axis=1).sum()
        assert both > 500 and disagree < 0.15 * both


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_errors(stderr: str) -> list[str]:
    """Page console lines: the report has no scripts (the check script logs nothing), so any
    console output (Chromium logs console.error as INFO:CONSOLE too) or exception is a failure."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed (apt-get install -y chromium)")
def test_report_loads_in_headless_chromium(report, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(report[0].read_text().replace("</body>", IMG_CHECK + "</body>"))
    dom = _chromium(["--dump-dom", page.as_uri()], tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'data-img-check="(\d+):(\d+)"', dom.stdout)
    assert found, "the image check did not run"
    total, bad = map(int, found.groups())
    assert total == report[0].read_text().count("<img") and bad == 0
    assert not _console_errors(dom.stderr), _console_errors(dom.stderr)
    shot = tmp_path / "report.png"
    run = _chromium([f"--screenshot={shot}", "--window-size=1280,4000", report[0].as_uri()], tmp_path / "profile2")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert not _console_errors(run.stderr)
    with Image.open(shot) as img:
        assert img.size == (1280, 4000)
        assert len(np.unique(np.asarray(img.convert("L"))[::8, ::8])) > 50  # pictures drawn, not blank
