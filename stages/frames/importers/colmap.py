"""An existing COLMAP model: ``sparse/0/`` (or ``sparse/``) + ``images/``, optional ``masks/``
or ``matting/`` (OmniObject3D; ``<image stem>.png`` or ``<image name>.png``, grey or RGBA).
Only undistorted PINHOLE / SIMPLE_PINHOLE cameras are accepted. The model is also written to ``frames/sparse/`` with the images renamed to the
imported frame names, so the sfm stage can reuse its points.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.cameras import intrinsics
from pipeline.dag import Context
from pipeline.errors import InputError
from stages.frames.importers.common import DatasetScene, check_cameras, resolve_inside

PINHOLE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")


def find_model(root: Path) -> Path:
    for cand in (root / "sparse" / "0", root / "sparse"):
        if any((cand / f"cameras.{ext}").is_file() for ext in ("bin", "txt")):
            return cand
    raise InputError(f"{root}: no COLMAP model in sparse/0/ or sparse/ (cameras.bin or cameras.txt)")


def camera_matrix(camera, model_dir: Path) -> np.ndarray:
    name = camera.model.name
    if name not in PINHOLE_MODELS:
        raise InputError(f"{model_dir}: camera {camera.camera_id} uses the {name} model; undistort the "
                         "images first (COLMAP image_undistorter gives PINHOLE) or run from the photos "
                         "with --images")
    p = [float(v) for v in camera.params]
    return intrinsics(p[0], p[0], p[1], p[2]) if name == "SIMPLE_PINHOLE" else intrinsics(*p[:4])


def _find_mask(mask_dir: Path, root: Path, name: str) -> Path | None:
    for cand in (Path(name).with_suffix(".png"), Path(name + ".png")):
        path = resolve_inside(root, mask_dir, cand.as_posix(), mask_dir)
        if path.is_file():
            return path
    return None


def load(root: Path, ctx: Context) -> DatasetScene:
    import pycolmap

    model_dir = find_model(root)
    try:
        rec = pycolmap.Reconstruction(str(model_dir))
    except Exception as exc:  # pycolmap raises ValueError/RuntimeError with C++ messages
        raise InputError(f"{model_dir}: cannot read the COLMAP model ({str(exc).splitlines()[0]})") from None
    posed = sorted((img for img in rec.images.values() if img.has_pose), key=lambda img: img.name)
    if len(posed) < 2:
        raise InputError(f"{model_dir}: fewer than 2 registered images")
    images, Ks, c2ws, sizes = [], [], [], set()
    for img in posed:
        camera = rec.cameras[img.camera_id]
        sizes.add((int(camera.width), int(camera.height)))
        Ks.append(camera_matrix(camera, model_dir))
        w2c = np.eye(4)
        w2c[:3, :4] = img.cam_from_world().matrix()
        c2ws.append(np.linalg.inv(w2c) if np.all(np.isfinite(w2c)) else w2c)
        path = resolve_inside(root, root / "images", img.name, model_dir)
        if not path.is_file():
            raise InputError(f"{model_dir}: image '{img.name}' not found in {root / 'images'}")
        images.append(path)
    if len(sizes) > 1:
        raise InputError(f"{model_dir}: cameras of different image sizes {sorted(sizes)} are not supported")
    K, c2w = np.stack(Ks), np.stack(c2ws)
    check_cameras(K, c2w, model_dir)
    masks = None
    mask_dir = next((root / n for n in ("masks", "matting") if (root / n).is_dir()), None)
    if mask_dir is not None:
        found = [_find_mask(mask_dir, root, img.name) for img in posed]
        masks = found if all(found) else None
        if masks is None:
            ctx.log.warning("colmap: %s lacks a mask for some images; importing without masks", mask_dir)
    width, height = sizes.pop()

    def finish(out_dir: Path, names: list[str]) -> dict:
        for img, name in zip(posed, names):
            rec.image(img.image_id).name = name
        (out_dir / "sparse").mkdir(exist_ok=True)
        rec.write(str(out_dir / "sparse"))
        return {"sparse_points": int(rec.num_points3D())}

    ctx.log.info("colmap: %d registered images from %s", len(posed), model_dir)
    return DatasetScene(images, K, c2w, width, height, masks=masks, finish=finish)
