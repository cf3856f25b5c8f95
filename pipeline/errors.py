"""Errors a user can act on. Anything else is a bug and gets a traceback under --debug."""


class PipelineError(Exception):
    """Base class: the message is printed as one line, without a traceback."""


class ConfigError(PipelineError):
    """A preset, a --set override or a config file is wrong."""


class InputError(PipelineError):
    """An input file or folder is missing, unreadable or unusable; the message names it."""


class StageError(PipelineError):
    """A stage could not produce its outputs; the message says why and what to try."""
