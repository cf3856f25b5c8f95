"""The project's version, for ``meshpipe --version``.

Run from a checkout, the version is the one in the checkout's ``pyproject.toml`` (the code that
runs is the checkout's, whatever was installed last); installed, it is the distribution's
metadata (``importlib.metadata``).
"""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "meshpipe"
CHECKOUT_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _pyproject_version(path: Path) -> str | None:
    """``[project] version`` of ``path`` when it is this project's pyproject.toml, else None."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    table = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)  # tomllib is 3.11+
    if not table:
        return None
    fields = dict(re.findall(r'^(name|version)\s*=\s*"([^"]*)"', table.group(1), re.M))
    return fields.get("version") if fields.get("name") == DISTRIBUTION else None


def version() -> str:
    found = _pyproject_version(CHECKOUT_PYPROJECT)
    if found:
        return found
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
