"""Free-disk checks: a per-stage estimate of the bytes a stage will write, checked before it runs.

The estimates are upper-ish bounds from the stage's config and the size of its inputs (no decoding):
frames = frame count x JPEG size at ``max_side``, sfm = twice its images + SIFT database, masks = a
share of the images, train = checkpoints x model size (hash-grid tables + Adam moments), mesh =
marching-cubes output at ``resolution`` (blocks + PLY), cleanup = three copies of the raw mesh.
``check_free`` raises a one-line ``StageError`` when the disk holding the stage folder has less free.
"""
from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path

from pipeline.errors import StageError

JPEG_BYTES_PER_PIXEL = 0.5  # JPEG at quality 95 of a textured photo: 0.2 .. 0.5 bytes per pixel
HEADROOM = 16 << 20  # logs, manifests, JSON files, temp copies during atomic writes
MARGIN = 1.1  # estimates are multiplied by this before the comparison
SIFT_BYTES_PER_FEATURE = 160  # 128-byte descriptor + keypoint + a share of the matches
CHECKPOINTS_ON_DISK = 3  # the last 2 kept + the one being written
MESH_BYTES_PER_CELL2 = 256  # mesh bytes per resolution^2 (surface cells x faces x bytes, blocks + PLY)
FULL_BELOW = 1 << 20  # a disk with less free than this after a failure is reported as full
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def human(n: float) -> str:
    """Bytes as a short string: 512 B, 3.4 MB, 12.0 GB."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def tree_size(path: Path | str | None) -> int:
    """Total size of the regular files under ``path`` (or of the file); 0 when it does not exist."""
    if not path:
        return 0
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):  # symlinks to folders are not followed: no loops
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def count_files(path: Path) -> int:
    try:
        return sum(1 for e in os.scandir(path) if not e.name.startswith("."))
    except OSError:
        return 0


def frame_bytes(max_side: int) -> float:
    return max_side * max_side * 0.75 * JPEG_BYTES_PER_PIXEL  # 4:3 frames at the long side


def hashgrid_params(section: dict) -> int:
    """Hash-grid parameters: per level min(res^3, 2^log2_table) x features (as in stages/train/hashgrid)."""
    levels, base, top = section["grid_levels"], section["grid_base_res"], section["grid_max_res"]
    scale = (top / base) ** (1.0 / (levels - 1)) if levels > 1 else 1.0
    rows = sum(min((math.ceil(base * scale ** lv - 1) + 1) ** 3, 1 << section["grid_log2_table"]) for lv in range(levels))
    mlp = 4 * 256 * 256  # the MLPs are small next to the tables
    return rows * section["grid_features"] + mlp


def estimate_bytes(stage: str, section: dict, inputs: dict[str, Path], source: dict | None) -> int:
    """Bytes ``stage`` will write into its folder (an estimate, never negative)."""
    up = {k: Path(v) for k, v in inputs.items()}
    if stage == "frames":
        src = source or {}
        extra = tree_size(src.get("gt"))
        if src.get("kind") == "dataset":
            return int(1.5 * tree_size(src.get("path"))) + extra
        count = section["target_count"] if src.get("kind") == "video" else count_files(Path(src.get("path", "")))
        return int(count * frame_bytes(section["max_side"])) + extra
    if stage == "sfm":
        images = up["frames"] / "images"
        return 2 * tree_size(images) + count_files(images) * section["max_num_features"] * SIFT_BYTES_PER_FEATURE
    if stage == "masks":
        return tree_size(up["sfm"] / "images") // 4
    if stage == "sfm_points":
        return 2 * tree_size(up["sfm"] / "sparse")
    if stage == "train":
        params = hashgrid_params(section) * 4  # float32
        return params * (3 * CHECKPOINTS_ON_DISK + 1)  # weights + 2 Adam moments per checkpoint, + model.pt
    if stage == "mesh":
        return MESH_BYTES_PER_CELL2 * section["resolution"] ** 2
    if stage == "cleanup":
        return 3 * tree_size(up["mesh"] / "mesh_raw.ply")
    return 0


def check_free(stage: str, section: dict, inputs: dict[str, Path], source: dict | None, out_dir: Path) -> int:
    """Raise StageError when the disk of ``out_dir`` has less free than ``stage`` needs; return the need.

    What a resumed stage already wrote into ``out_dir`` counts as written.
    """
    need = max(0, estimate_bytes(stage, section, inputs, source) - tree_size(out_dir))
    need = int(need * MARGIN) + HEADROOM
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise StageError(f"{stage}: needs ~{human(need)} free in {out_dir.parent}, has {human(free)}; free some "
                         "space or use a --workdir on a larger disk")
    return need


def is_full(path: Path) -> bool:
    """True when the disk holding ``path`` has (almost) nothing left."""
    try:
        return shutil.disk_usage(path).free < FULL_BELOW
    except OSError:
        return False


def space_error_path(exc: BaseException) -> str | None:
    """For an out-of-space error (ENOSPC, EDQUOT; also inside ``shutil.Error`` from copytree and
    in the exception's cause chain): the file being written, or '' when unknown. Else None."""
    codes = tuple(f"[Errno {code}]" for code in SPACE_ERRNOS)
    while exc is not None:
        if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
            for item in exc.args[0]:
                if isinstance(item, tuple) and len(item) == 3 and str(item[2]).startswith(codes):
                    return str(item[1])
        elif isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS:
            return str(exc.filename or "")
        exc = exc.__cause__ or exc.__context__
    return None
