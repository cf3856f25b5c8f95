"""Checks shared by the stages that spread over several GPUs (``train.gpus``, ``mesh.gpus``)."""
from __future__ import annotations

import os

from pipeline.errors import ConfigError


def require_visible_gpus(stage: str, wanted: int) -> None:
    """Raise a ConfigError naming ``<stage>.gpus`` when fewer than ``wanted`` CUDA devices are visible."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < wanted:
        raise ConfigError(f"{stage}.gpus={wanted} but {visible} GPU(s) are visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); pass --gpus with {wanted} cards "
                          f"or set {stage}.gpus={max(1, visible)}")
