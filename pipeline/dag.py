"""The stage graph and what a stage receives when it runs.

A stage package ``stages/<name>/`` is cheap to import (heavy imports inside
functions) and exposes ``VERSION`` (bump when its outputs change), optionally ``PUBLISH``
(files copied to ``<workdir>/<scene>/`` when a run ends with it) and
``run(inputs: dict[str, Path], cfg, out_dir: Path, ctx: Context) -> dict``: ``inputs`` maps
each upstream stage name to its finished folder, ``cfg`` is the stage's config section, the
returned dict is a JSON-able summary stored in the manifest. User-facing failures raise
``pipeline.errors.StageError`` / ``InputError`` with a message that says what to try.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

STAGES = ("frames", "sfm", "masks", "sfm_points", "train", "mesh", "cleanup", "evaluate")

UPSTREAM: dict[str, tuple[str, ...]] = {
    "frames": (),
    "sfm": ("frames",),
    "masks": ("frames", "sfm"),
    "sfm_points": ("sfm", "masks"),
    "train": ("sfm", "masks", "sfm_points"),
    "mesh": ("train", "sfm_points"),
    "cleanup": ("mesh", "sfm", "masks", "sfm_points"),
    "evaluate": ("cleanup", "mesh", "train", "sfm_points", "masks", "sfm", "frames"),
}



def stage_module_name(stage: str) -> str:
    """The package that implements ``stage``: ``stages/<stage>/``."""
    return f"stages.{stage}"


# Stages that need a GPU when one is there; they run pinned by CUDA_VISIBLE_DEVICES.
GPU_STAGES = ("train", "mesh")


# What ``--dataset DIR --format FMT`` reads: one reader each in ``stages/frames/importers/``.
DATASET_FORMATS = ("neus", "blender", "neuralangelo", "colmap", "middlebury", "omniobject3d_blender",
                   "omniobject3d_video")


@dataclass(frozen=True)
class Source:
    """What the first stage reads. ``path`` is absolute; ``gt`` is a ground-truth folder or ''."""

    kind: Literal["video", "images", "dataset"]
    path: str
    format: str = ""
    gt: str = ""


@dataclass
class Context:
    """Operational settings of one stage run; none of these are part of the cache key."""

    scene: str
    device: str = "cpu"  # "cpu" or "cuda", resolved by the stage runner
    progress: bool = True
    source: Source | None = None
    threads: int = 0  # 0 = all cores
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("pipeline"))


def closure(until: str) -> list[str]:
    """Stages needed to produce ``until``, in pipeline order."""
    need, todo = set(), [until]
    while todo:
        name = todo.pop()
        if name not in need:
            need.add(name)
            todo.extend(UPSTREAM[name])
    return [s for s in STAGES if s in need]
