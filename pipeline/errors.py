"""Errors a user can act on. Anything else is a bug and gets a traceback under --debug."""
from __future__ import annotations

import logging
import unicodedata


class PipelineError(Exception):
    """Base class: the message is printed as one line, without a traceback."""


class ConfigError(PipelineError):
    """A preset, a --set override or a config file is wrong."""


class InputError(PipelineError):
    """An input file or folder is missing, unreadable or unusable; the message names it."""


class StageError(PipelineError):
    """A stage could not produce its outputs; the message says why and what to try."""


def one_line(text: object) -> str:
    """``text`` with every control character (newline, carriage return, escape, ...) and line or
    paragraph separator written as its Python escape (``\\n``, ``\\x1b``, ``\\u2028``), so that a
    file name can never break a message into several lines or fake a line of its own."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text)


class OneLineFormatter(logging.Formatter):
    """A log formatter whose message part is always one line (``one_line``); a traceback that
    ``exc_info`` adds (under --debug) still follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))
