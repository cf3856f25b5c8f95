"""Optional native code, guarded in one place: tiny-cuda-nn (tinycudann) and Triton for the hash grid.

``tcnn_available()`` says whether it imports; ``make_tcnn_grid`` builds an encoding that reads
the *same* flat parameter table as the torch backend (tcnn's own HashGrid layout), so
checkpoints are backend-independent. Nothing here runs unless the backend asks for tcnn.
"""
from __future__ import annotations

import functools

from pipeline.errors import StageError


@functools.lru_cache(maxsize=1)
def _import_tcnn():
    try:
        import tinycudann as tcnn  # noqa: F401  (optional, built from source, CUDA only)
    except Exception as exc:  # ImportError, OSError (missing libcuda), RuntimeError
        return None, f"{type(exc).__name__}: {exc}"
    return tcnn, ""


def tcnn_available() -> bool:
    return _import_tcnn()[0] is not None


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Triton and this project's kernels import (the CUDA path of the ``triton`` backend)."""
    try:
        import stages.train.hashgrid_triton  # noqa: F401
    except Exception:  # ImportError, or a triton build that does not match the driver
        return False
    return True


def make_tcnn_grid(spec):
    """A callable ``(x01 [N,3] cuda, table [entries, F]) -> [N, L*F] float32`` through tcnn."""
    tcnn, why = _import_tcnn()
    if tcnn is None:
        raise StageError(f"train.grid_backend=tcnn but tinycudann does not import ({why}); "
                         "use grid_backend=torch or auto")
    if spec.features not in (1, 2, 4, 8):
        raise StageError(f"tcnn supports 1, 2, 4 or 8 features per level, got {spec.features}")
    import torch
    from tinycudann.modules import _module_function  # mirrors tcnn.modules.Module.forward

    config = {"otype": "HashGrid", "n_levels": spec.levels, "n_features_per_level": spec.features,
              "log2_hashmap_size": spec.log2_table, "base_resolution": spec.base_res,
              "per_level_scale": spec.per_level_scale, "interpolation": "Linear"}
    module = tcnn.Encoding(3, config, dtype=torch.float32)
    if module.n_params != spec.num_entries * spec.features:
        raise StageError(f"tcnn hash grid has {module.n_params} parameters, the torch layout "
                         f"{spec.num_entries * spec.features}; use grid_backend=torch")
    native = module.native_tcnn_module

    def encode(x01, table):
        flat = table.reshape(-1).contiguous()
        out = _module_function.apply(native, x01.float().clamp(0, 1).contiguous(), flat, module.loss_scale)
        return out[:, :spec.out_dim].float()

    encode.module = module  # keep it alive
    return encode
