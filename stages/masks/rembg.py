"""rembg masks: one ONNX Runtime session for all frames, offline-safe model resolution.

``import rembg`` is done only inside ``open_session`` (its first import in a fresh
environment takes ~50 s while numba compiles). Named models are looked up where rembg looks
(``<home>/models/<name>/<name>.onnx`` or the legacy ``<home>/<name>.onnx``); a download is
tried only when the file is missing, and a failed download is a ``StageError`` that says
where to put the file. A custom ``model_path`` anywhere on disk is linked into a private,
temporary rembg home, because rembg refuses model paths outside its home.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import StageError

CUSTOM_SESSIONS = ("u2net_custom", "dis_custom", "ben_custom")
UNSUPPORTED = ("sam",)  # needs prompts
DOWNLOAD_TIMEOUT_S = 10  # per network read; only used when the model file is missing


def rembg_home() -> Path:
    """rembg's data root, resolved as rembg 2.0.86 does (U2NET_HOME, REMBG_HOME, XDG, ~)."""
    if os.getenv("U2NET_HOME"):
        return Path(os.path.expanduser(os.environ["U2NET_HOME"]))
    xdg = os.getenv("XDG_DATA_HOME")
    default = os.path.join(xdg, "rembg") if xdg else os.path.join("~", ".rembg")
    return Path(os.path.expanduser(os.getenv("REMBG_HOME", default)))


def legacy_home() -> Path:
    return Path(os.path.expanduser(os.getenv(
        "U2NET_HOME", os.path.join(os.getenv("XDG_DATA_HOME", "~"), ".u2net"))))


def model_file(model: str) -> Path:
    """Where rembg expects the ONNX file of a named model."""
    return rembg_home() / "models" / model / f"{model}.onnx"


def local_model(model: str, model_path: str = "") -> Path | None:
    """The model file when it is on disk (no import of rembg, no network)."""
    if model_path:
        p = Path(model_path).expanduser()
        return p if p.is_file() else None
    for p in (model_file(model), legacy_home() / f"{model}.onnx"):
        if p.is_file():
            return p
    return None


def missing_model_message(model: str, why: str) -> str:
    return (f"rembg model '{model}' is not on this machine and cannot be downloaded ({why}); "
            f"put {model}.onnx at {model_file(model)}, or pass --set masks.model_path=/path/to/model.onnx, "
            f"or use --set masks.method=grabcut (no model needed)")


def _providers() -> list[str]:
    """CUDA first when this onnxruntime build has it (the session may still fall back to CPU)."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if "CUDAExecutionProvider" in avail:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@contextlib.contextmanager
def _private_home(model_path: Path, session_name: str) -> Iterator[Path]:
    """A temporary rembg home holding a link to ``model_path``; yields the linked path."""
    home = Path(tempfile.mkdtemp(prefix="rembg_home_"))
    target = home / "models" / session_name / model_path.name
    target.parent.mkdir(parents=True)
    try:
        try:
            os.link(model_path, target)
        except OSError:
            try:
                os.symlink(model_path.resolve(), target)
            except OSError:
                shutil.copyfile(model_path, target)
        old = {k: os.environ.get(k) for k in ("U2NET_HOME", "REMBG_HOME")}
        os.environ["U2NET_HOME"] = str(home)
        os.environ.pop("REMBG_HOME", None)
        try:
            yield target
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _remove_empty_model_dir(model: str) -> None:
    d = model_file(model).parent
    with contextlib.suppress(OSError):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def _session_options(threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return opts


@contextlib.contextmanager
def _onnx_errors(path: Path) -> Iterator[None]:
    """ONNX Runtime's load errors (a corrupt or wrong file) as a StageError naming the file."""
    try:
        yield
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise StageError(f"cannot load the ONNX model {path} ({type(exc).__name__}: {str(exc)[:160]}); "
                         f"replace the file or use --set masks.method=grabcut") from None


def open_session(model: str, model_path: str, threads: int, log: logging.Logger):
    """Build one rembg session (reused for every frame) and log the active provider."""
    import time

    t0 = time.time()
    import rembg  # noqa: F401  (slow the first time: numba)
    from rembg import new_session
    from rembg.sessions import sessions

    log.info("masks: imported rembg in %.1f s", time.time() - t0)
    providers = _providers()
    opts = _session_options(threads)
    if model_path:
        src = Path(model_path).expanduser()
        if not src.is_file():
            raise StageError(f"masks.model_path {src} does not exist; give the path of an ONNX file "
                             f"or use --set masks.method=grabcut")
        name = model if model in CUSTOM_SESSIONS else "u2net_custom"
        with _private_home(src, name) as linked, _onnx_errors(src):
            session = new_session(name, sess_opts=opts, model_path=str(linked), providers=providers)
        label = f"{name}:{src.name}"
    else:
        if model not in sessions or model in UNSUPPORTED or model in CUSTOM_SESSIONS:
            usable = sorted(k for k in sessions if k not in UNSUPPORTED + CUSTOM_SESSIONS)
            raise StageError(f"masks.model '{model}' is not a usable rembg model; choose one of "
                             f"{', '.join(usable)} or set masks.model_path")
        cls = sessions[model]
        if not cls.is_local() or cls.requires_credentials():
            raise StageError(f"masks.model '{model}' runs remotely or needs credentials; choose a local model")
        with _onnx_errors(model_file(model)):
            session = _named_session(model, opts, providers, log)
        label = model
    active = session.inner_session.get_providers()
    log.info("masks: rembg model %s on ONNX Runtime provider %s (asked for %s)", label, active[0],
             ", ".join(providers))
    return session, active[0]


def _named_session(model: str, opts, providers: list[str], log: logging.Logger):
    """Use the local file; download only when it is missing; map network errors to a StageError."""
    import pooch.downloaders
    import requests
    from rembg import new_session

    if local_model(model) is None:
        log.info("masks: %s not found at %s; trying to download it", model, model_file(model))
    old_timeout = pooch.downloaders.DEFAULT_TIMEOUT
    pooch.downloaders.DEFAULT_TIMEOUT = DOWNLOAD_TIMEOUT_S
    try:
        return new_session(model, sess_opts=opts, providers=providers)
    except (requests.exceptions.RequestException, OSError) as exc:
        if local_model(model) is not None and not isinstance(exc, requests.exceptions.RequestException):
            raise
        raise StageError(missing_model_message(model, f"{type(exc).__name__}: {str(exc)[:120]}")) from None
    finally:
        pooch.downloaders.DEFAULT_TIMEOUT = old_timeout
        _remove_empty_model_dir(model)


def predict(session, image: np.ndarray) -> np.ndarray:
    """Boolean mask (H, W) of an RGB uint8 image, thresholded at 127 of rembg's 0..255 output."""
    from PIL import Image
    from rembg import remove

    out = remove(Image.fromarray(image), session=session, only_mask=True)
    return np.asarray(out) > 127
