"""Logging set-up and progress bars shared by the CLI, tasks and stages."""
from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, TypeVar

from pipeline.errors import OneLineFormatter

T = TypeVar("T")
LOGGER_NAME = "pipeline"
LOG_INTERVAL_S = 5.0  # a progress line this often when stderr is a file or a pipe
STAGE_LOG = "stage.log"  # in every stage folder: the stage process's records, INFO and above


def setup_logging(debug: bool = False) -> logging.Logger:
    log = logging.getLogger(LOGGER_NAME)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    return log


class _QuietFileHandler(logging.FileHandler):
    """A log file whose failed writes (a full disk) are dropped without a traceback on stderr:
    the stage's own error report says what went wrong."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def log_to_file(log: logging.Logger, path: Path) -> logging.Handler:
    """Also write ``log``'s records of INFO and above to ``path`` as they come (appended: a resumed
    stage adds to its log), dated, one line each; the file is 0644 like every output."""
    handler = _QuietFileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    os.chmod(path, 0o644)
    log.addHandler(handler)
    return handler


class _Lines(io.TextIOBase):
    """tqdm's output as whole lines, for a stderr that is not a terminal: the carriage-return
    redraws of a bar would pile up in a log file as one endless line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable[T] | None = None, enabled: bool = True, **kwargs) -> Any:
    """A tqdm bar on stderr: redrawn in place on a terminal; elsewhere (a log file, a pipe) one
    line every ``LOG_INTERVAL_S`` seconds. Disabled, it still counts but prints nothing."""
    from tqdm import tqdm

    stream = sys.stderr
    if stream is not None and stream.isatty():
        style = {"file": stream, "dynamic_ncols": True}
    else:
        style = {"file": _Lines(stream or sys.__stderr__), "mininterval": LOG_INTERVAL_S, "ncols": 100}
    return tqdm(iterable, disable=not enabled, leave=False, **{**style, **kwargs})


def progress(iterable: Iterable[T], enabled: bool = True, **kwargs) -> Iterable[T]:
    """A progress bar over ``iterable`` (see ``progress_bar``), or the plain iterable when off."""
    return progress_bar(iterable, **kwargs) if enabled else iterable
