"""Typed pipeline configuration: one frozen dataclass per stage, YAML presets, --set overrides.

Each field carries a one-line doc in its metadata (``opt(default, doc)``). Presets in
``configs/<name>.yaml`` only override defaults and may name a ``base:`` preset. Unknown keys
and badly typed values raise ``ConfigError`` naming the key and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def opt(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a one-line doc (shown by ``config --help``)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class FramesConfig:
    target_count: int = opt(150, "number of frames to keep from a video, spread over its length")
    max_side: int = opt(1600, "downscale so the long image side is at most this many pixels")
    min_side: int = opt(32, "reject images whose short side is smaller than this")
    dedup_threshold: float = opt(0.01, "drop a frame whose mean abs difference to the last kept one is below this (0..1)")
    mixed_sizes: Literal["resize", "reject"] = opt("resize", "photos of different sizes: resize to the most common size, or fail")
    jpeg_quality: int = opt(95, "JPEG quality of the extracted frames")


@dataclass(frozen=True)
class SfmConfig:
    camera_model: Literal["SIMPLE_RADIAL", "OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "RADIAL"] = opt(
        "SIMPLE_RADIAL", "COLMAP camera model shared by all frames")
    matcher: Literal["auto", "sequential", "exhaustive"] = opt(
        "auto", "feature matching: auto = sequential for video, exhaustive for photo sets")
    mapper: Literal["incremental", "global"] = opt("incremental", "pycolmap mapper")
    min_registered_ratio: float = opt(0.6, "fail when fewer than this share of frames register")
    max_image_size: int = opt(1600, "SIFT extraction downscales images to this long side")
    max_num_features: int = opt(8192, "SIFT features per image")
    sequential_overlap: int = opt(10, "sequential matcher: match each frame with this many neighbours")
    loop_closure_stride: int = opt(10, "sequential matcher: exhaustive matching among every Nth frame")
    refine_principal_point: bool = opt(True, "refine the principal point in a final bundle adjustment")


@dataclass(frozen=True)
class MaskConfig:
    method: Literal["auto", "rembg", "grabcut", "provided", "none"] = opt("auto", "how object masks are made")
    model: str = opt("isnet-general-use", "rembg model name")
    model_path: str = opt("", "path of a custom ONNX segmentation model (u2net signature)")
    dilate_px: int = opt(0, "dilate masks by this many pixels after clean-up")
    keep_components: int = opt(1, "keep this many largest connected components")
    fill_holes: bool = opt(True, "fill holes inside the mask")


@dataclass(frozen=True)
class SfmPointsConfig:
    min_track_length: int = opt(3, "keep SfM points seen by at least this many images")
    max_error_px: float = opt(2.0, "keep SfM points with reprojection error at most this")
    carve_resolution: int = opt(64, "voxel grid resolution of the visual-hull carving for the bounds")
    sphere_margin: float = opt(1.1, "bounding sphere radius = this x the carved object's radius")
    export_legacy: bool = opt(False, "also write the Geo-NeuS-style object-array view_id.npy (never read back)")


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = opt(20000, "optimisation steps")
    seed: int = opt(0, "random seed")


@dataclass(frozen=True)
class MeshConfig:
    resolution: int = opt(512, "marching-cubes grid resolution over the bounding cube")
    block_res: int = opt(128, "grid block size evaluated at once; bounds memory")


@dataclass(frozen=True)
class CleanupConfig:
    min_component_ratio: float = opt(0.1, "drop components whose diagonal is below this share of the largest")
    max_hole_edges: int = opt(100, "close holes with at most this many boundary edges")
    target_faces: int = opt(0, "decimate to this many faces (0 = keep)")


@dataclass(frozen=True)
class EvaluateConfig:
    holdout: bool = opt(True, "hold out every 8th frame from training and report its PSNR")
    num_samples: int = opt(200000, "surface samples for Chamfer and F-score")


SECTIONS: dict[str, type] = {
    "frames": FramesConfig,
    "sfm": SfmConfig,
    "masks": MaskConfig,
    "sfm_points": SfmPointsConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
    "cleanup": CleanupConfig,
    "evaluate": EvaluateConfig,
}


@dataclass(frozen=True)
class PipelineConfig:
    frames: FramesConfig = field(default_factory=FramesConfig)
    sfm: SfmConfig = field(default_factory=SfmConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    sfm_points: SfmPointsConfig = field(default_factory=SfmPointsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def section(self, name: str) -> Any:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        return apply_overrides(cls(), data, source="config")


def canonical_json(obj: Any) -> str:
    """Stable JSON used for hashing: sorted keys, no whitespace."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def field_docs(section: str) -> dict[str, str]:
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(SECTIONS[section])}


def _nearest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` when that is lossless, else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _replace_section(section_obj: Any, section: str, values: dict, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(section_obj))
    names = [f.name for f in dataclasses.fields(section_obj)]
    changes = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{section}.{key}'{_nearest(str(key), names)}")
        changes[key] = _check_type(value, hints[key], f"{source}: {section}.{key}")
    return dataclasses.replace(section_obj, **changes)


def section_from_dict(section: str, values: dict) -> Any:
    """Rebuild a config section (type-checked) from its dict form, e.g. in a stage subprocess."""
    return _replace_section(SECTIONS[section](), section, values, source=f"section {section}")


def apply_overrides(cfg: PipelineConfig, data: dict, source: str) -> PipelineConfig:
    """Return a new config with the nested mapping ``data`` ({section: {key: value}}) applied."""
    changes = {}
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}'{_nearest(str(section), list(SECTIONS))}")
        changes[section] = _replace_section(cfg.section(section), section, values, source)
    return dataclasses.replace(cfg, **changes)


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_preset(name_or_path: str, _seen: tuple = ()) -> PipelineConfig:
    """Resolve a preset by name (``configs/<name>.yaml``) or by path, following ``base:``."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = preset_names()
        raise ConfigError(f"unknown preset '{name_or_path}'{_nearest(name_or_path, names)} "
                          f"(available: {', '.join(names)})")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base:' presets form a cycle")
    data = _read_yaml(path)
    base = data.pop("base", None)
    cfg = load_preset(str(base), _seen + (path.resolve(),)) if base else PipelineConfig()
    return apply_overrides(cfg, data, source=str(path))


def parse_set(items: list[str]) -> dict:
    """Turn ['train.iterations=20000', ...] into {'train': {'iterations': 20000}}; values are YAML."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        section, _, name = key.strip().partition(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def load_config(preset: str = "default", overrides: list[str] | None = None) -> PipelineConfig:
    cfg = load_preset(preset)
    return apply_overrides(cfg, parse_set(overrides or []), source="--set")
