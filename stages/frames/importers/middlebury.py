"""Middlebury multi-view stereo sets (``dinoSparseRing``, ``templeRing``, ...): the photos and one
``<name>_par.txt`` beside them. Its first line is the image count, then one line per image:
``<file> k11 .. k33 r11 .. r33 t1 t2 t3`` with the projection P = K [R | t] (world to OpenCV
camera). Only the cameras are read: the README's bounding box is not used as the scene's
sphere, so masks and bounds are found as for any capture.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.dag import Context
from pipeline.errors import InputError
from stages.frames.importers.common import DatasetScene, check_cameras, check_real_inside, image_size

FIELDS = 22  # file name, 9 of K, 9 of R, 3 of t


def parse_par(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(file name, K, world-to-camera 4x4) per image line of a ``_par.txt``; errors name the line."""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    try:
        count = int(lines[0].split()[0]) if lines else -1
    except ValueError:
        count = -1
    if count < 0:
        raise InputError(f"{path}: the first line must be the number of images")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        f = line.split()
        if len(f) != FIELDS:
            raise InputError(f"{path}: line {number} has {len(f)} fields, expected {FIELDS} (file, K, R, t)")
        try:
            values = np.array(f[1:], float)
        except ValueError:
            raise InputError(f"{path}: line {number} holds a value that is not a number") from None
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = values[9:18].reshape(3, 3), values[18:21]
        rows.append((f[0], values[:9].reshape(3, 3), w2c))
    if len(rows) != count:
        raise InputError(f"{path}: the first line says {count} images but {len(rows)} lines follow")
    return rows


def load(root: Path, ctx: Context) -> DatasetScene:
    pars = sorted(root.glob("*_par.txt"))
    if len(pars) != 1:
        raise InputError(f"{root}: expected one <name>_par.txt (Middlebury cameras), found {len(pars)}")
    rows = parse_par(pars[0])
    if not rows:
        raise InputError(f"{pars[0]}: no image lines")
    images = []
    for name, _, _ in rows:
        path = root / name
        if Path(name).name != name or not path.is_file():
            raise InputError(f"{pars[0]}: names {name}, which is not in {root}")
        check_real_inside(root, path)
        images.append(path)
    K = np.stack([k for _, k, _ in rows])
    w2c = np.stack([m for _, _, m in rows])
    if np.any(np.abs(np.linalg.det(w2c[:, :3, :3])) < 1e-6):
        raise InputError(f"{pars[0]}: a rotation matrix is singular")
    c2w = np.linalg.inv(w2c)
    check_cameras(K, c2w, pars[0])
    width, height = image_size(images[0])
    ctx.log.info("middlebury: %d cameras from %s", len(images), pars[0])
    return DatasetScene(images, K, c2w, width, height)
