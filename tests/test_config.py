"""Config: presets, base chains, unknown keys, --set type checking, docs on every field."""
import dataclasses

import pytest

from pipeline.config import SECTIONS, PipelineConfig, field_docs, load_config, load_preset, parse_set
from pipeline.errors import ConfigError


def test_every_field_has_a_doc():
    for name in SECTIONS:
        for field, doc in field_docs(name).items():
            assert doc.strip(), f"{name}.{field} has no doc"


def test_fast_cpu_overrides_default():
    cfg = load_config("fast_cpu")
    assert cfg.frames.target_count == 40
    assert cfg.frames.mixed_sizes == PipelineConfig().frames.mixed_sizes


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match=r"unknown key 'frames.target_cont'.*did you mean 'target_count'"):
        load_config("default", ["frames.target_cont=3"])


def test_unknown_section_names_nearest():
    with pytest.raises(ConfigError, match=r"unknown section 'frame'.*'frames'"):
        load_config("default", ["frame.target_count=3"])


def test_unknown_key_in_preset_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: fast_cpu\nsfm:\n  matchr: exhaustive\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'sfm.matchr'.*'matcher'"):
        load_preset(str(bad))


def test_base_chain_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("base: fast_cpu\nframes:\n  max_side: 320\n")
    cfg = load_preset(str(tmp_path / "a.yaml"))
    assert cfg.frames.max_side == 320 and cfg.frames.target_count == 40
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'c.yaml'}\n")
    (tmp_path / "c.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_preset(str(tmp_path / "b.yaml"))


def test_invalid_yaml(tmp_path):
    (tmp_path / "x.yaml").write_text("frames: [unclosed\n")
    with pytest.raises(ConfigError, match=r"x.yaml: not valid YAML"):
        load_preset(str(tmp_path / "x.yaml"))


@pytest.mark.parametrize("item, message", [
    ("frames.target_count=many", r"frames.target_count: expected an integer, got 'many'"),
    ("frames.target_count=2.5", r"expected an integer, got 2.5"),
    ("sfm.refine_principal_point=maybe", r"expected true or false"),
    ("sfm.matcher=fancy", r"sfm.matcher: 'fancy' is not one of auto, sequential, exhaustive"),
    ("frames.target_count", r"expected section.key=value"),
])
def test_set_type_errors(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", [item])


def test_set_values_are_typed(tmp_path):
    cfg = load_config("default", ["frames.target_count=12", "sfm_points.max_error_px=3",
                                  "masks.method=grabcut", "sfm.refine_principal_point=false"])
    assert cfg.frames.target_count == 12
    assert cfg.sfm_points.max_error_px == 3.0 and isinstance(cfg.sfm_points.max_error_px, float)
    assert cfg.masks.method == "grabcut" and cfg.sfm.refine_principal_point is False
    assert parse_set(["masks.model=u2net"]) == {"masks": {"model": "u2net"}}
    # YAML 1.1 reads on/off as booleans: choices spelled on/off still take them
    cfg = load_config("default", ["train.compile=off", "train.cuda_graphs=on"])
    assert cfg.train.compile == "off" and cfg.train.cuda_graphs == "on"
    (tmp_path / "p.yaml").write_text("base: default\ntrain:\n  compile: off\n")
    assert load_preset(str(tmp_path / "p.yaml")).train.compile == "off"


def test_config_is_frozen():
    cfg = load_config("default")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.frames.target_count = 3  # type: ignore[misc]


def test_unknown_preset():
    with pytest.raises(ConfigError, match=r"unknown preset 'fast_cup'.*'fast_cpu'"):
        load_config("fast_cup")
