"""Where ``torch.compile`` keeps what it compiled, so that the next run loads it instead of
compiling again (issue 21: more than half of a 2000-step run was compilation).

inductor's FX-graph cache and AOTAutograd cache (on by default in torch) and Triton's kernel
cache are all on disk; by default inductor's live in ``/tmp/torchinductor_<user>``, which a
reboot or a fresh container empties. ``configure`` points them at one folder that survives:
``$MESHPIPE_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/meshpipe/compile``, else
``~/.cache/meshpipe/compile`` (``MESHPIPE_COMPILE_CACHE=off`` leaves torch's defaults). A
``TORCHINDUCTOR_CACHE_DIR`` or ``TRITON_CACHE_DIR`` the user set wins. The folder is not part of
any stage key: a cache entry is keyed by torch itself (graph, torch version, device), and a hit
gives the same kernels a miss would compile.

``stats`` reads torch's counters: how many graphs were hits and misses in this process, which
``train.json`` records as ``compile_cache`` (a second run of the same shapes: no misses).
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "MESHPIPE_COMPILE_CACHE"
OFF = ("off", "0", "false", "no", "none")


def cache_root() -> Path | None:
    """The folder for compiled graphs and kernels, or None when ``MESHPIPE_COMPILE_CACHE=off``."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base).expanduser() / "meshpipe" / "compile"


def configure(log=None) -> Path | None:
    """Point inductor's and Triton's caches into ``cache_root()`` (call before the first compile:
    inductor reads the folder at each use; processes started later inherit it). Returns the
    folder, or None when off or not writable (then torch's defaults stay, with one warning)."""
    root = cache_root()
    if root is None:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if log is not None:
            log.warning("train: compile cache %s is not writable (%s); torch's own cache folder is used "
                        "(set %s to a writable folder, or off)", root, exc.strerror or exc, ENV)
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # importing torch._dynamo writes torch's default folder into the variable: that is not the user's
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    cache_autocast_graphs()
    return root


def cache_autocast_graphs() -> None:
    """Let AOTAutograd cache graphs that enter autocast (the colour and background MLPs do): it
    bypasses its cache for any function it does not know, these two included, although what they
    do is fixed by their arguments (device, dtype, enabled), which are constants of the cached
    graph and so part of its key. Keyed by the torch version, as torch's own example does."""
    import torch
    import torch._inductor.config as inductor_config

    marked = dict(inductor_config.unsafe_marked_cacheable_functions)
    for name in AUTOCAST_FUNCTIONS:
        marked.setdefault(name, torch.__version__)
    inductor_config.unsafe_marked_cacheable_functions = marked


AUTOCAST_FUNCTIONS = ("torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast")


def stats() -> dict:
    """This process's compile-cache counters so far (torch's ``counters``): FX graphs and
    AOTAutograd graphs loaded from the cache (hits) and compiled (misses), and dynamo's graphs."""
    from torch._dynamo.utils import counters

    return {"dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            "graphs": int(counters["stats"]["unique_graphs"]),
            "fx_graph_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
            "fx_graph_misses": int(counters["inductor"]["fxgraph_cache_miss"]),
            "autograd_hits": int(counters["aot_autograd"]["autograd_cache_hit"]),
            "autograd_misses": int(counters["aot_autograd"]["autograd_cache_miss"])}
