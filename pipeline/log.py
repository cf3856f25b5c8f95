"""Logging set-up and progress bars shared by the CLI, tasks and stages."""
from __future__ import annotations

import logging
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")
LOGGER_NAME = "pipeline"


def setup_logging(debug: bool = False) -> logging.Logger:
    log = logging.getLogger(LOGGER_NAME)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    return log


def progress(iterable: Iterable[T], enabled: bool = True, **kwargs) -> Iterable[T]:
    """A tqdm bar on stderr, or the plain iterable when progress is off."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)
