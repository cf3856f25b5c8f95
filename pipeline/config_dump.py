"""The resolved configuration as YAML, each key under its one-line doc (``meshpipe config``).

The text is a valid preset: saved to a file it loads back (``--preset FILE.yaml``) to the same
configuration.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import yaml

from pipeline.config import SECTIONS, PipelineConfig


def _yaml_value(value: Any) -> str:
    """One value as inline YAML that reads back to the same value (tuples as flow lists)."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).removesuffix("...\n").strip()


def _comment(field: dataclasses.Field, tp: Any, value: Any, default: Any) -> str:
    """The field's doc, what it allows, and its default when the value differs from it."""
    notes = []
    if typing.get_origin(tp) is Literal:
        notes.append("allowed: " + ", ".join(map(str, typing.get_args(tp))))
    if field.metadata.get("bounds") is not None:
        notes.append("allowed: " + field.metadata["bounds"].describe())
    if value != default:
        notes.append(f"default: {_yaml_value(default)}")
    doc = " ".join(field.metadata.get("doc", "").split())
    return doc + (f" ({'; '.join(notes)})" if notes else "")


def config_yaml(cfg: PipelineConfig, header: list[str] = ()) -> str:
    """``cfg`` section by section as YAML; ``header`` lines go first, as comments."""
    lines = [f"# {line}" for line in header]
    for section, cls in SECTIONS.items():
        hints, defaults, current = typing.get_type_hints(cls), cls(), cfg.section(section)
        lines.append(f"{section}:")
        for field in dataclasses.fields(cls):
            value = getattr(current, field.name)
            lines.append(f"  # {_comment(field, hints[field.name], value, getattr(defaults, field.name))}")
            lines.append(f"  {field.name}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"
