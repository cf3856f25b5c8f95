"""Pictures for the evaluate report: contact sheets, mask overlays, a camera plot, training
curves and shaded mesh renders, returned as images (uint8 arrays) or PNG bytes.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no display). Renders use the
torch rasteriser of ``pipeline.raster`` with Lambertian head-light shading.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np

import stages.evaluate.metrics as M

BACKGROUND = np.array([235, 235, 235], np.float32)  # render background (light grey)
GREY = np.array([200, 200, 200], np.float32)  # mesh colour without vertex colours


def encode(image, fmt: str = "PNG", quality: int = 85, max_side: int | None = None) -> bytes:
    """PNG or JPEG bytes of a uint8 array / PIL image, shrunk so its long side is <= ``max_side``."""
    from PIL import Image

    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if max_side and max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.LANCZOS)
    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(image, fmt: str = "PNG", quality: int = 85) -> str:
    """A ``data:`` URI of a uint8 array / PIL image (PNG or JPEG) or of PNG bytes."""
    if isinstance(image, bytes):
        payload, mime = image, "image/png"
    else:
        payload, mime = encode(image, fmt, quality), f"image/{fmt.lower()}"
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def load_rgb(path: Path, max_side: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as uint8 RGB, resized to ``size`` (w, h) or so its long side is <= ``max_side``."""
    from PIL import Image

    with Image.open(path) as img:
        if max_side or size:  # JPEG: decode at a reduced scale when that is enough
            img.draft("RGB", tuple(size) if size else (max_side, max_side))
        img = img.convert("RGB")
        if size is None and max_side and max(img.size) > max_side:
            s = max_side / max(img.size)
            size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
        if size is not None and tuple(size) != img.size:
            img = img.resize(tuple(size), Image.LANCZOS)
        return np.asarray(img)


def grid(images: list[np.ndarray], labels: list[str], columns: int) -> np.ndarray:
    """Tile equally sized RGB images into rows of ``columns``, each with a small caption."""
    from PIL import Image, ImageDraw

    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    pad, text_h = 4, 14
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (img, label) in enumerate(zip(images, labels)):
        x = pad + (k % columns) * (w + pad)
        y = pad + (k // columns) * (h + text_h + pad)
        sheet.paste(Image.fromarray(img).resize((w, h)), (x, y))
        draw.text((x + 2, y + h + 1), label, fill=(40, 40, 40))
    return np.asarray(sheet)


def overlay_mask(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Darken what lies outside ``mask`` and draw its outline in red."""
    from scipy.ndimage import binary_erosion

    out = rgb.astype(np.float32)
    out[~mask] *= 0.35
    edge = mask & ~binary_erosion(mask, iterations=max(1, round(max(mask.shape) / 240)))
    out[edge] = (255, 40, 40)
    return out.astype(np.uint8)


def compare_silhouettes(render_mask: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Agreement picture: grey = both, red = only the mask, blue = only the mesh."""
    out = np.full(mask.shape + (3,), 255, np.uint8)
    out[mask & render_mask] = (150, 150, 150)
    out[mask & ~render_mask] = (230, 50, 50)
    out[~mask & render_mask] = (50, 90, 230)
    return out


def render_shaded(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None, K: np.ndarray,
                  c2w: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Lambertian render (head light, two-sided) with vertex colours: RGB uint8 and coverage mask."""
    import torch

    from pipeline.raster import rasterize

    image = np.tile(BACKGROUND, (height * width, 1))
    if len(faces) == 0:
        return image.reshape(height, width, 3).astype(np.uint8), np.zeros((height, width), bool)
    xy, z = M.project_vertices(vertices, K, c2w)
    face, bary = rasterize(xy, z, torch.as_tensor(faces, dtype=torch.int64), width, height)
    face, bary = face.numpy(), bary.numpy().astype(np.float64)
    hit = np.nonzero(face >= 0)[0]
    tri = faces[face[hit]]
    v = np.asarray(vertices, np.float64)
    normal = np.cross(v[tri[:, 1]] - v[tri[:, 0]], v[tri[:, 2]] - v[tri[:, 0]])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    points = (v[tri] * bary[hit, :, None]).sum(1)
    view = points - c2w[:3, 3]
    view /= np.maximum(np.linalg.norm(view, axis=1, keepdims=True), 1e-12)
    shade = 0.25 + 0.75 * np.abs((normal * view).sum(1))
    albedo = (colors[tri].astype(np.float32) * bary[hit, :, None]).sum(1) if colors is not None else GREY
    image[hit] = np.clip(albedo * shade[:, None], 0, 255)
    return image.reshape(height, width, 3).astype(np.uint8), (face >= 0).reshape(height, width)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _up_rotation(c2w: np.ndarray) -> np.ndarray:
    """Rotation taking the cameras' mean up direction (-y of OpenCV axes) to +z, for plotting."""
    up = -c2w[:, :3, 1].mean(0)
    up = up / max(np.linalg.norm(up), 1e-12)
    z = np.array([0.0, 0.0, 1.0])
    axis, c = np.cross(up, z), float(up @ z)
    if np.linalg.norm(axis) < 1e-9:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + k + k @ k / (1.0 + c)


def camera_plot(c2w: np.ndarray, center: np.ndarray, radius: float, points: np.ndarray | None,
                held_out: list[int]) -> bytes:
    """Cameras (centres + viewing directions), the bounding sphere and SfM points: a 3D view and
    a top view, in a frame whose z axis is the cameras' mean up direction."""
    from matplotlib.figure import Figure

    R = _up_rotation(c2w)
    centres = (c2w[:, :3, 3] - center) @ R.T
    dirs = c2w[:, :3, 2] @ R.T
    pts = None
    if points is not None and len(points):
        pts = (points[np.random.default_rng(0).permutation(len(points))[:3000]] - center) @ R.T
    extent = max(float(np.abs(centres).max()), radius) * 1.1
    length = 0.15 * extent
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    u, v = np.mgrid[0:2 * np.pi:24j, 0:np.pi:12j]
    ax.plot_wireframe(radius * np.cos(u) * np.sin(v), radius * np.sin(u) * np.sin(v), radius * np.cos(v),
                      color="tab:green", linewidth=0.4, alpha=0.6)
    if pts is not None:
        ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=0.5, c="0.35", alpha=0.6)
    ax.quiver(centres[:, 0], centres[:, 1], centres[:, 2], dirs[:, 0], dirs[:, 1], dirs[:, 2],
              length=length, color="tab:blue", linewidth=0.8)
    ax.scatter(centres[:, 0], centres[:, 1], centres[:, 2], s=18, c=np.arange(len(centres)), cmap="viridis")
    for setter in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
        setter(-extent, extent)
    ax.set_box_aspect((1, 1, 1))
    ax.set_title("3D view (z = cameras' mean up)", fontsize=10)
    top = fig.add_subplot(1, 2, 2)
    top.add_patch(_circle(radius))
    if pts is not None:
        top.scatter(pts[:, 0], pts[:, 1], s=0.5, c="0.35", alpha=0.6)
    top.quiver(centres[:, 0], centres[:, 1], dirs[:, 0], dirs[:, 1], color="tab:blue", width=0.003,
               angles="xy", scale_units="xy", scale=1.0 / length)
    dots = top.scatter(centres[:, 0], centres[:, 1], s=18, c=np.arange(len(centres)), cmap="viridis", zorder=3)
    if held_out:
        top.scatter(centres[held_out, 0], centres[held_out, 1], s=70, facecolors="none",
                    edgecolors="tab:red", zorder=4, label="held out from training")
        top.legend(loc="upper right", fontsize=8)
    fig.colorbar(dots, ax=top, label="frame order", shrink=0.8)
    top.set_xlim(-extent, extent)
    top.set_ylim(-extent, extent)
    top.set_aspect("equal")
    top.grid(alpha=0.3)
    top.set_title(f"top view: {len(c2w)} cameras, bounding sphere r = {radius:.3g} (green)", fontsize=10)
    return _png(fig)


def _circle(radius: float):
    from matplotlib.patches import Circle

    return Circle((0.0, 0.0), radius, fill=False, edgecolor="tab:green", linewidth=1.5)


def read_scalars(train_dir: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Training curves {tag: (steps, values)} from the TensorBoard events under ``train_dir``,
    else from train.json ``curve`` / ``history``: {tag: [[step, value], ...]} or
    [{"step": s, tag: value, ...}, ...]."""
    curves = _tensorboard_scalars(train_dir)
    info = train_dir / "train.json"
    if curves or not info.is_file():
        return curves
    data = json.loads(info.read_text())
    curve = data.get("curve", data.get("history"))
    if isinstance(curve, dict):
        for tag, pairs in curve.items():
            curves[tag] = ([p[0] for p in pairs], [p[1] for p in pairs])
    elif isinstance(curve, list):
        for k, row in enumerate(curve):
            for tag, value in row.items() if isinstance(row, dict) else ():
                if tag != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    steps, values = curves.setdefault(tag, ([], []))
                    steps.append(row.get("step", k))
                    values.append(value)
    return curves


def _tensorboard_scalars(train_dir: Path) -> dict[str, tuple[list[float], list[float]]]:
    curves: dict[str, tuple[list[float], list[float]]] = {}
    event_dirs = sorted({p.parent for p in train_dir.rglob("events.out.tfevents.*")})
    if not event_dirs:
        return curves
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for folder in event_dirs:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            events = acc.Scalars(tag)
            curves[tag] = ([e.step for e in events], [e.value for e in events])
    return curves


def training_plot(curves: dict[str, tuple[list[float], list[float]]], max_plots: int = 12) -> bytes:
    """One small panel per scalar tag; log scale when a positive curve spans > 20x."""
    from matplotlib.figure import Figure

    tags = sorted(curves)[:max_plots]
    cols = min(3, len(tags))
    rows = (len(tags) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows), layout="constrained")
    for k, tag in enumerate(tags):
        ax = fig.add_subplot(rows, cols, k + 1)
        steps, values = np.asarray(curves[tag][0]), np.asarray(curves[tag][1], np.float64)
        ax.plot(steps, values, linewidth=1.0)
        pos = values[np.isfinite(values)]
        if len(pos) and pos.min() > 0 and pos.max() > 20 * pos.min():
            ax.set_yscale("log")
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _png(fig)


def iou_plot(per_view: dict[str, float]) -> bytes:
    """Silhouette IoU per view, in view order."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(range(len(per_view)), list(per_view.values()), marker=".", linewidth=0.8)
    ax.set_ylim(min(0.5, min(per_view.values()) - 0.02), 1.0)
    ax.set_xlabel("view (evaluated views, in order)", fontsize=8)
    ax.set_ylabel("IoU", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)
