"""The report's interactive 3D view: the cleaned mesh, decimated to ``evaluate.viewer_faces``,
packed into one zlib-compressed blob (base64 inside a JSON script block) with the capture's
camera frustums and the bounding sphere, drawn by ``viewer.js`` on the vendored three.js
(``vendor/three.min.js``), both inlined. The page makes no request: everything is in the file.

Blob layout: ``position`` uint16 (vertices quantised over their bounding box), ``color`` uint8
RGB, ``index`` int32 differences of consecutive face indices (small numbers, so they compress),
one float32 line-segment array per overlay, each starting on a 4-byte boundary.
"""
from __future__ import annotations

import base64
import html
import json
import zlib
from pathlib import Path

import numpy as np

from stages.evaluate.scene import EvalScene, bounding_sphere

HERE = Path(__file__).resolve().parent
THREE_JS = HERE / "vendor" / "three.min.js"
VIEWER_JS = HERE / "viewer.js"
# The report's Content-Security-Policy: inline scripts and styles, data: pictures, nothing else.
CSP = "default-src 'none'; script-src 'unsafe-inline'; img-src data: blob:; style-src 'unsafe-inline'"
FOV_DEG = 40.0
FRUSTUM_DEPTH = 0.08  # frustum depth as a share of the mean camera distance to the sphere centre
CIRCLE_SEGMENTS = 96
NO_SCRIPT = "3D view off: JavaScript is disabled; the static renders below stay."
CSS = """
#viewer canvas { display: none; width: 100%; border: 1px solid #ccc; cursor: grab; touch-action: none; }
#viewer[data-state="ready"] canvas { display: block; }
#viewer .controls, #viewer .hint { display: none; gap: 14px; align-items: center; margin: 6px 0; flex-wrap: wrap; }
#viewer[data-state="ready"] .controls { display: flex; }
#viewer[data-state="ready"] .hint { display: block; }
#viewer .overlays label { margin-right: 12px; }
#viewer[data-state="off"] .viewer-status { color: #a33; font-weight: bold; }
"""


def decimate(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None,
             max_faces: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """At most about ``max_faces`` faces (pymeshlab quadric edge collapse; colours follow the
    kept vertices); a mesh already within the budget is returned as it is."""
    if len(faces) <= max_faces:
        return vertices, faces, colors
    import pymeshlab

    rgba = None if colors is None else np.hstack([colors / 255.0, np.ones((len(colors), 1))])
    mesh = pymeshlab.Mesh(vertex_matrix=vertices, face_matrix=faces.astype(np.int32),
                          **({} if rgba is None else {"v_color_matrix": rgba}))
    ms = pymeshlab.MeshSet()
    ms.add_mesh(mesh)
    ms.meshing_decimation_quadric_edge_collapse(targetfacenum=int(max_faces), preservenormal=True, autoclean=True)
    out = ms.current_mesh()
    new_colors = None
    if colors is not None:
        new_colors = np.clip(out.vertex_color_matrix()[:, :3] * 255 + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(out.vertex_matrix()), np.asarray(out.face_matrix(), np.int64), new_colors


def frustum_segments(K: np.ndarray, c2w: np.ndarray, width: int, height: int, depth: float) -> np.ndarray:
    """Line segments (N * 16, 3) of each camera's frustum (apex to the image corners at
    ``depth``, and the image rectangle); ``c2w`` in OpenCV axes, as ``Cameras`` holds them."""
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
    segments = []
    for k, pose in zip(K, c2w):
        cam = np.column_stack([(corners[:, 0] - k[0, 2]) / k[0, 0], (corners[:, 1] - k[1, 2]) / k[1, 1],
                               np.ones(4)]) * depth
        world = cam @ pose[:3, :3].T + pose[:3, 3]
        apex = pose[:3, 3]
        for a in range(4):
            segments += [apex, world[a], world[a], world[(a + 1) % 4]]
    return np.asarray(segments, np.float32).reshape(-1, 3)


def sphere_segments(center: np.ndarray, radius: float, n: int = CIRCLE_SEGMENTS) -> np.ndarray:
    """Three great circles of the sphere (one per world axis) as line segments (3 * n * 2, 3)."""
    t = np.linspace(0.0, 2 * np.pi, n + 1)
    ring = np.column_stack([np.cos(t), np.sin(t), np.zeros_like(t)]) * radius
    out = []
    for axes in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        pts = ring[:, axes] + center
        out.append(np.stack([pts[:-1], pts[1:]], 1).reshape(-1, 3))
    return np.concatenate(out).astype(np.float32)


def home_view(vertices: np.ndarray, c2w: np.ndarray) -> dict:
    """The starting (and reset) view: from the direction of the first capture camera, at the
    distance that frames the mesh's bounding box; up is the cameras' mean up direction."""
    lo, hi = vertices.min(0), vertices.max(0)
    target = (lo + hi) / 2
    half_diag = max(float(np.linalg.norm(hi - lo)) / 2, 1e-9)
    direction = c2w[0, :3, 3] - target
    direction = direction / max(np.linalg.norm(direction), 1e-12)
    up = -c2w[:, :3, 1].mean(0)  # OpenCV y points down
    up = up / max(np.linalg.norm(up), 1e-12)
    distance = half_diag / np.sin(np.radians(FOV_DEG) / 2)
    far = 4 * max(distance, float(np.linalg.norm(c2w[:, :3, 3] - target, axis=1).max()))
    return {"eye": (target + distance * direction).tolist(), "target": target.tolist(), "up": up.tolist(),
            "fov": FOV_DEG, "near": distance / 200, "far": far}


def pack(arrays: dict[str, np.ndarray]) -> tuple[str, list[dict]]:
    """One zlib blob (base64) of the arrays, each on a 4-byte boundary, and its layout."""
    chunks, layout, offset = [], [], 0
    for name, array in arrays.items():
        data = np.ascontiguousarray(array).tobytes()  # little-endian on every platform we run on
        layout.append({"name": name, "type": array.dtype.name, "offset": offset, "count": int(array.size)})
        pad = -len(data) % 4
        chunks += [data, b"\0" * pad]
        offset += len(data) + pad
    return base64.b64encode(zlib.compress(b"".join(chunks), 9)).decode("ascii"), layout


def viewer_data(scene: EvalScene, max_faces: int) -> dict:
    """What viewer.js reads: the packed mesh and overlays, the home view, counts."""
    center, radius = bounding_sphere(scene)
    v, f, c = decimate(scene.vertices, scene.faces, scene.colors, max_faces)
    lo, size = v.min(0), max(float(np.ptp(v, axis=0).max()), 1e-12)
    quantised = np.round((v - lo) / size * 65535).astype(np.uint16)
    flat = f.astype(np.int64).ravel()
    arrays = {"position": quantised, "index": np.diff(flat, prepend=0).astype(np.int32)}
    if c is not None:
        arrays["color"] = c.astype(np.uint8)
    depth = FRUSTUM_DEPTH * float(np.linalg.norm(scene.cams.centers - center, axis=1).mean())
    overlays = [("cameras", "#e07020", frustum_segments(scene.cams.K, scene.cams.c2w, scene.cams.width,
                                                        scene.cams.height, depth)),
                ("bounding sphere", "#20a040", sphere_segments(center, radius))]
    arrays.update({f"overlay{k}": seg for k, (_, _, seg) in enumerate(overlays)})
    blob, layout = pack(arrays)
    return {"blob": blob, "layout": layout, "origin": lo.tolist(), "scale": size / 65535,
            "vertices": len(v), "faces": len(f), "full_faces": len(scene.faces),
            "overlays": [{"label": label, "color": color, "array": f"overlay{k}"}
                         for k, (label, color, _) in enumerate(overlays)],
            "view": home_view(v, scene.cams.c2w)}


def viewer_section(scene: EvalScene, max_faces: int) -> str:
    """The "3D view" section: canvas, controls, status line, the data and both scripts inlined."""
    if max_faces <= 0 or len(scene.faces) == 0:
        why = "evaluate.viewer_faces is 0" if max_faces <= 0 else "the mesh is empty"
        return f'<h2>3D view</h2><p class="note">3D view off: {why}.</p>'
    import pymeshlab

    try:
        data = viewer_data(scene, max_faces)
    except pymeshlab.PyMeshLabException as exc:  # a mesh MeshLab cannot decimate: no view, the rest stays
        return f'<h2>3D view</h2><p class="note">3D view off: decimation failed ({html.escape(str(exc))}).</p>'
    faces = (f"{data['faces']} of {data['full_faces']} faces (decimated for the view; the full mesh is mesh.ply)"
             if data["faces"] < data["full_faces"] else f"all {data['faces']} faces")
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return ("<h2>3D view</h2>"
            f'<div id="viewer" data-state="loading"><p class="note viewer-status">{NO_SCRIPT}</p>'
            '<div class="controls"><button type="button" data-action="reset">reset view</button>'
            '<label><input type="radio" name="viewer-look" value="colours" checked> colours</label>'
            '<label><input type="radio" name="viewer-look" value="shading"> shading</label>'
            '<span class="overlays"></span></div><canvas></canvas>'
            f'<p class="note hint">{faces}; drag to orbit, wheel to zoom, right-drag or shift-drag to pan; '
            "zoom out to see the cameras of the capture.</p></div>"
            f'<script type="application/json" id="viewer-data">{payload}</script>'
            f"<script>{THREE_JS.read_text()}</script><script>{VIEWER_JS.read_text()}</script>")
