"""Stage 5, train: a Neuralangelo-style neural SDF (hash grid, numerical gradients,
coarse-to-fine, NeuS rendering) from sfm/ images, masks/ and sfm_points/.

Outputs in the stage folder: ``checkpoints/step_XXXXXXXX.pt`` (last 2), ``model.pt``, ``tb/``
(TensorBoard) and ``train.json`` (with ``train.refine_cameras``: the training views' pose
corrections, ``stages.train.cameras``; they are in ``model.pt`` too). Compiled graphs and
kernels are kept across runs in one cache folder (``stages.train.compile_cache``; not part of
the key). A rerun in the same folder resumes from the latest checkpoint. For the mesh stage:
``load_sdf(model_dir, device)`` returns a callable SDF on unit-sphere points (``.world(...)``
for world points, ``.unit_to_world`` similarity) and ``load_color`` a colour query. Heavy
imports happen inside the functions.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError

VERSION = "1"


def run(inputs: dict[str, Path], cfg, out_dir: Path, ctx) -> dict:
    """Train in this process, or on ``train.gpus`` > 1 ranks started by torchrun
    (``stages.train.ddp.launch``), each of which runs ``stages.train.stage.run_stage``."""
    if cfg.gpus < 1:
        raise ConfigError(f"train.gpus must be at least 1, got {cfg.gpus}")
    if cfg.gpus > 1:
        from stages.train.ddp import launch

        return launch(inputs, cfg, Path(out_dir), ctx, VERSION)
    from stages.train.stage import run_stage

    return run_stage(inputs, cfg, Path(out_dir), ctx, version=VERSION)


def load_sdf(model_dir: Path, device="cpu"):
    """``sdf(points_unit [N, 3] tensor) -> [N]``; see :class:`stages.train.query.SdfQuery`."""
    from stages.train.query import load_sdf as _load

    return _load(Path(model_dir), device)


def load_color(model_dir: Path, device="cpu"):
    """``color(points_unit [N, 3]) -> rgb [N, 3]`` in [0, 1] (view direction = -normal)."""
    from stages.train.query import load_color as _load

    return _load(Path(model_dir), device)
