"""The evaluate stage's report.html: self-contained (only data URIs and inline scripts under a
Content-Security-Policy that allows no request), every picture decodes, the embedded 3D view
holds the decimated mesh and overlays, and headless Chromium (when installed) draws the mesh
with software WebGL without a request leaving the page, and without WebGL says why the view is
off while the static renders stay. Also the batch report's thumbnails."""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cameras import look_at
from pipeline.config import EvaluateConfig
from stages.evaluate import metrics as M
from stages.evaluate.viewer import CSP, NO_SCRIPT, THREE_JS, VIEWER_JS
from tasks.batch import write_summary
try:  # pytest's default import mode puts tests/ on sys.path; --import-mode=importlib does not
    from test_evaluate import build_inputs, perturbed_gt, random_similarity, run_stage, synthetic_scene
except ImportError:
    from tests.test_evaluate import build_inputs, perturbed_gt, random_similarity, run_stage, synthetic_scene

CHROMIUM = Path("/usr/bin/chromium")
VIEWER_FACES = 3000  # the test mesh has 5856 faces: the view gets a decimated copy
CFG = EvaluateConfig(num_samples=5000, icp_iterations=5, iou_max_views=4, render_max_side=320, report_frames=16,
                     viewer_faces=VIEWER_FACES)
WINDOW = (1280, 4000)
NO_GL = ["--disable-gpu", "--disable-3d-apis"]
SOFTWARE_GL = ["--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
BACKGROUND = (244, 244, 244)  # viewer.js's clear colour
# Injected after the CSP meta: records CSP violations, script errors, resources fetched, and the
# canvas box once the viewer drew its first frame; with #exercise it then works every control.
PROBE = """<script>(function () {
  var root = document.documentElement, seen = [];
  function note(key, text) { seen.push(text); root.setAttribute("data-" + key, seen.join(" | ")); }
  document.addEventListener("securitypolicyviolation", function (e) { note("csp", e.violatedDirective + " " + e.blockedURI); });
  window.addEventListener("error", function (e) { note("errors", String(e.message)); });
  window.addEventListener("load", function () {
    var imgs = document.images, bad = 0;
    for (var i = 0; i < imgs.length; i++) { if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) bad++; }
    root.setAttribute("data-img-check", imgs.length + ":" + bad);
  });
  new MutationObserver(function () {
    var viewer = document.getElementById("viewer");
    if (!viewer || viewer.dataset.frame !== "drawn" || root.hasAttribute("data-canvas")) return;
    var r = viewer.querySelector("canvas").getBoundingClientRect();
    root.setAttribute("data-canvas", [r.left + scrollX, r.top + scrollY, r.width, r.height].map(Math.round).join(","));
    root.setAttribute("data-resources", performance.getEntriesByType("resource").length);
    if (location.hash !== "#exercise") return;
    viewer.querySelector('input[value="shading"]').click();
    viewer.querySelectorAll(".overlays input").forEach(function (box) { box.click(); });
    viewer.querySelector('[data-action="reset"]').click();
    root.setAttribute("data-exercised", "yes"); // a handler that threw is in data-errors
  }).observe(root, { attributes: true, subtree: true, attributeFilter: ["data-frame"] });
})();</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict, dict]:
    syn = synthetic_scene(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("report")
    inputs = build_inputs(root / "in", syn, random_similarity(3), perturbed_gt(syn / "gt", 0.003))
    metrics = run_stage(inputs, root / "out", CFG)
    return root / "out" / "report.html", metrics, inputs


def viewer_payload(text: str) -> dict:
    """The viewer's JSON, with the blob decoded as viewer.js decodes it: vertices, faces, colours, overlays."""
    found = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', text, re.S)
    data = json.loads(found.group(1))
    raw = zlib.decompress(base64.b64decode(data["blob"], validate=True))
    arrays = {e["name"]: np.frombuffer(raw, e["type"], e["count"], e["offset"]) for e in data["layout"]}
    data["vertices_xyz"] = np.asarray(data["origin"]) + arrays["position"].reshape(-1, 3) * data["scale"]
    data["faces_ijk"] = np.cumsum(arrays["index"].astype(np.int64)).reshape(-1, 3)
    data["colors_rgb"] = arrays["color"].reshape(-1, 3) if "color" in arrays else None
    data["overlay_xyz"] = {o["label"]: arrays[o["array"]].reshape(-1, 3) for o in data["overlays"]}
    return data


def test_report_is_self_contained_and_every_image_decodes(report):
    path, metrics, _ = report
    text = path.read_text()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", text, re.S)
    assert [attrs for attrs, _ in scripts] == [' type="application/json" id="viewer-data"', "", ""]
    assert scripts[1][1] == THREE_JS.read_text() and scripts[2][1] == VIEWER_JS.read_text()
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in text[:600]
    page = re.sub(r"<script[^>]*>.*?</script>", "", text, flags=re.S)  # the HTML around the scripts
    assert "http://" not in page and "https://" not in page and 'src="file' not in page
    assert "<link" not in page and "url(" not in page and " href=" not in page
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == page.count("<img") >= 10
    for src in sources:
        head, _, payload = src.partition(",")
        assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as img:
            img.load()
            assert min(img.size) >= 16
    for heading in ("Metrics", "3D view", "Stage times", "Input frames", "Masks", "Cameras and bounding sphere",
                    "Training", "Mesh renders next to the input frames"):
        assert f"<h2>{heading}" in page, heading
    assert NO_SCRIPT in page  # what the status line says until the viewer's script runs
    chamfer = metrics["geometry"]["chamfer_l1_pct"]
    assert f"{chamfer:.3f} % of GT diagonal" in page
    assert "2 scalar curves" in page  # the two tags the test wrote with SummaryWriter
    assert path.stat().st_size < 2_000_000  # 1.2 MB: 0.6 MB of it the 3D view (three.js 0.55 MB)
    with Image.open(path.with_name("thumbnail.jpg")) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) == 160


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


def test_viewer_holds_the_decimated_mesh_cameras_and_sphere(report):
    import trimesh

    data = viewer_payload(report[0].read_text())
    v, f, full = data["vertices_xyz"], data["faces_ijk"], data["full_faces"]
    assert full == report[1]["mesh"]["faces"] == 5856
    assert len(f) == data["faces"] <= VIEWER_FACES * 1.01 and len(v) == data["vertices"]
    assert f.min() == 0 and f.max() == len(v) - 1 and data["colors_rgb"].shape == (len(v), 3)
    assert f"{len(f)} of {full} faces (decimated" in report[0].read_text()
    # the decimated vertices lie on the full surface (quantisation: 1/65535 of the box)
    box = data["scale"] * 65535
    surface = trimesh.load(report[2]["cleanup"] / "mesh.ply", process=False).sample(100000, seed=0)
    assert np.percentile(M.nearest_distances(v, surface), 95) < 0.005 * box
    cams, sphere = data["overlay_xyz"]["cameras"], data["overlay_xyz"]["bounding sphere"]
    assert len(cams) == 16 * 14  # 8 segments (16 points) per frustum, 14 SfM views
    radius = np.linalg.norm(sphere - sphere.mean(0), axis=1)
    assert np.ptp(radius) < 1e-3 * radius.mean()
    view = data["view"]
    assert np.allclose(view["target"], (v.min(0) + v.max(0)) / 2, atol=1e-3 * box)


def _chromium(args: list[str], profile: Path, gl: list[str] = NO_GL) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", *gl, "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=15000",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_errors(stderr: str) -> list[str]:
    """Page console lines: the report logs nothing, so any console output (Chromium logs
    console.error as INFO:CONSOLE too) or exception is a failure."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _probed_copy(report: Path, folder: Path) -> Path:
    page = folder / "report.html"
    text = report.read_text()
    meta = text.index("<title>")  # right after the CSP meta, before any other script
    page.write_text(text[:meta] + PROBE + text[meta:])
    return page


def _dom(page_uri: str, profile: Path, gl: list[str], *extra: str) -> tuple[dict, str]:
    """The root element's data- attributes and the DOM after the page settled."""
    run = _chromium([*extra, "--dump-dom", page_uri], profile, gl)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not _console_errors(run.stderr), _console_errors(run.stderr)
    root = re.search(r"<html([^>]*)>", run.stdout).group(1)
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', root)), run.stdout


def page_requests(net_log: Path) -> list[str]:
    """URLs that the page (a file:// document) asked the network stack for, from a Chromium
    net-log; Chromium's own background requests (no file:// isolation key) are left out."""
    log = json.loads(net_log.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in log["events"] if e["type"] == start
            and str(e.get("params", {}).get("network_isolation_key", "")).startswith("file://")]


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="chromium is not installed (apt-get install -y chromium)")


@needs_chromium
def test_report_without_webgl_says_why_and_keeps_the_pictures(report, tmp_path):
    page = _probed_copy(report[0], tmp_path)
    attrs, dom = _dom(page.as_uri(), tmp_path / "profile", NO_GL)
    total, bad = map(int, attrs["img-check"].split(":"))
    assert total == page.read_text().count("<img") and bad == 0
    assert "csp" not in attrs and "errors" not in attrs
    assert '<div id="viewer" data-state="off">' in dom
    assert "3D view off: this browser gives no WebGL 2 context" in dom
    shot = tmp_path / "report.png"
    run = _chromium([f"--screenshot={shot}", report[0].as_uri()], tmp_path / "profile2", NO_GL)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert not _console_errors(run.stderr)
    with Image.open(shot) as img:
        assert img.size == WINDOW
        assert len(np.unique(np.asarray(img.convert("L"))[::8, ::8])) > 50  # pictures drawn, not blank


@needs_chromium
def test_report_draws_the_mesh_with_software_webgl_and_makes_no_request(report, tmp_path):
    page = _probed_copy(report[0], tmp_path)
    net_log = tmp_path / "net.json"
    attrs, dom = _dom(page.as_uri() + "#exercise", tmp_path / "p1", SOFTWARE_GL, f"--log-net-log={net_log}")
    assert re.search(r'<div id="viewer" data-state="ready" data-frame="drawn">', dom), dom[:3000]
    assert attrs.get("exercised") == "yes" and "errors" not in attrs, attrs
    assert "csp" not in attrs and attrs["resources"] == "0" and attrs["img-check"].endswith(":0")
    assert page_requests(net_log) == []
    left, top, width, height = map(int, attrs["canvas"].split(","))
    shot = tmp_path / "view.png"
    run = _chromium([f"--screenshot={shot}", page.as_uri()], tmp_path / "p2", SOFTWARE_GL)
    assert run.returncode == 0 and not _console_errors(run.stderr), run.stderr[-2000:]
    with Image.open(shot) as img:
        canvas = np.asarray(img.convert("RGB"), np.int16)[top + 1:top + height - 1, left + 1:left + width - 1]
    drawn = np.abs(canvas - BACKGROUND).max(-1) > 24
    # where the mesh should be: its silhouette from the viewer's home view
    data = viewer_payload(report[0].read_text())
    view, (h, w) = data["view"], drawn.shape
    focal = h / 2 / np.tan(np.radians(view["fov"]) / 2)
    K = np.array([[focal, 0, w / 2], [0, focal, h / 2], [0, 0, 1]])
    c2w = look_at(np.array(view["eye"]), np.array(view["target"]), np.array(view["up"]))
    expected = M.render_silhouette(data["vertices_xyz"], data["faces_ijk"], K, c2w, w, h)
    assert expected.mean() > 0.05  # the home view frames the mesh
    iou = (drawn & expected).sum() / (drawn | expected).sum()
    assert iou > 0.85, iou  # the rest: the sphere overlay's lines, antialiased edges


@needs_chromium
def test_page_requests_sees_a_request_that_leaves_the_page(tmp_path):
    """The net-log check above can see a page's request (a control without CSP)."""
    page = tmp_path / "probe.html"
    page.write_text('<html><body><img src="http://127.0.0.1:9/probe.png"></body></html>')
    net_log = tmp_path / "net.json"
    run = _chromium([f"--log-net-log={net_log}", "--dump-dom", page.as_uri()], tmp_path / "p", NO_GL)
    assert run.returncode == 0
    assert page_requests(net_log) == ["http://127.0.0.1:9/probe.png"]


def test_batch_report_links_each_report_with_its_thumbnail(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("report.html", "thumbnail.jpg"):
        (tmp_path / "a" / name).write_bytes(b"x")
    rows = [{"scene": "a", "status": "done", "failed_stage": "", "reason": "", "report": "a/report.html"},
            {"scene": "b", "status": "failed", "failed_stage": "sfm", "reason": "no <model>", "report": ""}]
    _, html_path = write_summary(tmp_path, rows)
    page = html_path.read_text()
    assert ('<td class="view"><a href="a/report.html"><img src="a/thumbnail.jpg" alt="mesh render" '
            'loading="lazy"></a></td>') in page
    assert '<td class="view"></td><td class="scene">b</td>' in page and "no &lt;model&gt;" in page
