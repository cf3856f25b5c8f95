"""rembg masks: one ONNX Runtime session for all frames, offline-safe model resolution.

``import rembg`` is done only when a session is opened or a model is downloaded (its first
import in a fresh environment takes ~50 s while numba compiles). Named models are looked up
where rembg looks (``<home>/models/<name>/<name>.onnx`` or the legacy ``<home>/<name>.onnx``).
A missing one is downloaded (``ensure_model``: pooch, checksum, progress bar, short timeout) to
``<home>/models/<name>/``, from rembg's own release URL with rembg's checksum or from
``masks.model_url`` with ``masks.model_sha256``; never when ``MESHPIPE_OFFLINE`` is set or
``masks.download`` is false. A custom ``model_path`` anywhere on disk is linked into a private,
temporary rembg home, because rembg refuses model paths outside its home.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, StageError

CUSTOM_SESSIONS = ("u2net_custom", "dis_custom", "ben_custom")
UNSUPPORTED = ("sam",)  # needs prompts
DOWNLOAD_TIMEOUT_S = 10  # per network read; only used when the model file is missing
OFFLINE_ENV = "MESHPIPE_OFFLINE"  # set to anything but "", "0", "false", "no": never download a model
_DOWNLOADED: dict[str, str] = {}  # model file -> URL, for the downloads of this process (pop_model_origin)


class DownloadError(Exception):
    """A missing model could not be fetched (downloads off, network or disk error); str says why."""


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


def download_blocked(allowed: bool = True) -> str | None:
    """Why no download may be tried (MESHPIPE_OFFLINE, masks.download=false), or None."""
    value = os.environ.get(OFFLINE_ENV, "").strip()
    if value and value.lower() not in ("0", "false", "no"):
        return f"downloads are off: {OFFLINE_ENV}={value}"
    return None if allowed else "downloads are off: masks.download=false"


def check_download_config(cfg: Any) -> None:
    """masks.model_url needs masks.model_sha256 (64 hex digits, or ``skip``) and no model_path."""
    url, sha = cfg.model_url.strip(), cfg.model_sha256.strip()
    if sha and not url:
        raise ConfigError("masks.model_sha256 is the checksum of the file at masks.model_url; set both "
                          "(rembg's own URL is checked against rembg's own checksum)")
    if not url:
        return
    if cfg.model_path:
        raise ConfigError("masks.model_url downloads masks.model into rembg's cache; it cannot be combined "
                          "with masks.model_path (a file already on disk)")
    if not re.match(r"https?://", url):
        raise ConfigError(f"masks.model_url {url!r} is not an http:// or https:// URL")
    sha256_hash(sha)


def sha256_hash(sha: str) -> str | None:
    """pooch's ``known_hash`` for masks.model_sha256: ``sha256:<hex>``, or None for ``skip``."""
    s = sha.strip().lower().removeprefix("sha256:")
    if s == "skip":
        return None
    if re.fullmatch(r"[0-9a-f]{64}", s):
        return f"sha256:{s}"
    if not s:
        raise ConfigError("masks.model_url needs masks.model_sha256: the file's sha256 (64 hex digits), "
                          "or 'skip' to use the download unverified")
    raise ConfigError(f"masks.model_sha256 {sha!r} is neither a sha256 (64 hex digits) nor 'skip'")


def session_class(model: str):
    """rembg's session class of a named model that runs here without prompts (imports rembg)."""
    from rembg.sessions import sessions

    if model not in sessions or model in UNSUPPORTED or model in CUSTOM_SESSIONS:
        usable = sorted(k for k in sessions if k not in UNSUPPORTED + CUSTOM_SESSIONS)
        raise StageError(f"masks.model '{model}' is not a usable rembg model; choose one of "
                         f"{', '.join(usable)} or set masks.model_path")
    cls = sessions[model]
    if not cls.is_local() or cls.requires_credentials():
        raise StageError(f"masks.model '{model}' runs remotely or needs credentials; choose a local model")
    return cls


class _Seen(Exception):
    pass


def rembg_source(model: str) -> tuple[str, str | None]:
    """rembg's own download URL and checksum of a named, missing model: its ``download_models``
    runs with ``pooch.retrieve`` replaced by a recorder, so nothing is fetched."""
    from unittest import mock

    import pooch

    cls = session_class(model)
    seen: list[tuple[str, str | None]] = []

    def record(url, known_hash=None, *args, **kwargs):
        seen.append((url, known_hash))
        raise _Seen

    with mock.patch.object(pooch, "retrieve", record), contextlib.suppress(_Seen):
        cls.download_models()
    if not seen:
        raise StageError(f"rembg did not say where to download '{model}' from; put {model}.onnx at "
                         f"{model_file(model)} or set masks.model_url")
    return seen[0]


def fetch(url: str, known_hash: str | None, target: Path, log: logging.Logger) -> None:
    """Download ``url`` to ``target`` with pooch (temporary file, checksum, progress bar on stderr).
    A checksum mismatch is a StageError (pooch deletes the download); a network or disk error is
    a DownloadError."""
    import pooch
    import requests

    log.info("masks: downloading the rembg model %s to %s", url, target)
    if known_hash is None:
        log.warning("masks: nothing verifies the download of %s (no checksum)", url)
    downloader = pooch.HTTPDownloader(progressbar=True, timeout=DOWNLOAD_TIMEOUT_S)
    new_dirs = [d for d in (target.parent, *target.parent.parents) if not d.exists()]  # deepest first
    pooch_log = pooch.get_logger()
    level = pooch_log.level
    pooch_log.setLevel(logging.WARNING)  # its own "Downloading ..." line repeats ours
    done = False
    try:
        pooch.retrieve(url, known_hash, fname=target.name, path=target.parent, downloader=downloader)
        done = True
    except ValueError as exc:
        m = re.search(r"expected (\S+) but got ([0-9a-fA-F]+)", str(exc))
        if m is None:
            raise
        algo = m.group(1).split(":")[0] if ":" in m.group(1) else "sha256"
        raise StageError(f"masks: the file downloaded from {url} does not match its checksum (expected "
                         f"{m.group(1)}, got {algo}:{m.group(2)}) and was not kept; fix masks.model_url or "
                         f"masks.model_sha256, or use --set masks.method=grabcut") from None
    except (requests.exceptions.RequestException, OSError) as exc:
        raise DownloadError(_reason(exc)) from None
    finally:
        pooch_log.setLevel(level)
        for d in [] if done else new_dirs:  # the folders this attempt made, when left empty
            with contextlib.suppress(OSError):
                d.rmdir()
    _DOWNLOADED[str(target)] = url


def _reason(exc: Exception) -> str:
    """A network or disk error in a few words: requests' innermost cause, without the pool's repr."""
    text = str(exc)
    if "Caused by " in text:
        text = re.sub(r"[\"']\)+$", "", text.split("Caused by ", 1)[1])
    return f"{type(exc).__name__}: {text.rsplit('): ', 1)[-1][:160]}"


def ensure_model(model: str, url: str = "", sha256: str = "", download: bool = True,
                 log: logging.Logger | None = None) -> Path:
    """The file of a named model: found on disk, else downloaded now to ``model_file(model)``
    from ``url`` (checked against ``sha256``) or rembg's own URL and checksum. Raises
    DownloadError when downloads are off or fail, StageError on a checksum mismatch."""
    log, url = log or logging.getLogger("pipeline"), url.strip()
    found = local_model(model)
    if found is not None:
        return found
    blocked = download_blocked(download)
    if blocked:
        raise DownloadError(blocked)
    if url:
        session_class(model)  # a typo fails before a long download
        known = sha256_hash(sha256)
    else:
        url, known = rembg_source(model)
    fetch(url, known, model_file(model), log)
    return model_file(model)


def pop_model_origin(model: str, model_path: str = "") -> dict:
    """For masks.json: ``{"model_source": "downloaded", "model_url": URL}`` when this process
    downloaded the model (once; a later call says disk), else ``{"model_source": "disk"}``."""
    url = None if model_path else _DOWNLOADED.pop(str(model_file(model)), None)
    return {"model_source": "downloaded", "model_url": url} if url else {"model_source": "disk"}


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
        session_class(model)
        with _onnx_errors(model_file(model)):
            session = _named_session(model, opts, providers, log)
        label = model
    active = session.inner_session.get_providers()
    log.info("masks: rembg model %s on ONNX Runtime provider %s (asked for %s)", label, active[0],
             ", ".join(providers))
    return session, active[0]


def _named_session(model: str, opts, providers: list[str], log: logging.Logger):
    """The session of a named model: its file on disk, or downloaded now (``ensure_model``)."""
    from rembg import new_session

    try:
        ensure_model(model, log=log)
    except DownloadError as exc:
        raise StageError(missing_model_message(model, str(exc))) from None
    return new_session(model, sess_opts=opts, providers=providers)


def predict(session, image: np.ndarray) -> np.ndarray:
    """Boolean mask (H, W) of an RGB uint8 image, thresholded at 127 of rembg's 0..255 output."""
    from PIL import Image
    from rembg import remove

    out = remove(Image.fromarray(image), session=session, only_mask=True)
    return np.asarray(out) > 127
