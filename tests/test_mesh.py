"""Block-wise marching cubes (stages.mesh.blocks) and the mesh stage, on analytic SDFs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from pipeline.config import MeshConfig
from pipeline.dag import Context
from pipeline.errors import ConfigError, StageError
from stages import mesh as mesh_stage
from stages.mesh.blocks import compute_mesh

CHUNK = 1 << 14


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sphere_sdf(p, r=0.7):
    return p.norm(dim=1) - r


def torus_sdf(p, big=0.55, small=0.25):
    q = torch.stack([torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2) - big, p[:, 2]], 1)
    return q.norm(dim=1) - small


def _check_closed(vertices, faces, volume, genus):
    m = trimesh.Trimesh(vertices, faces, process=False)
    assert m.is_watertight and m.is_winding_consistent
    assert len(m.split(only_watertight=False)) == 1
    assert abs(m.volume / volume - 1) < 0.01, m.volume / volume
    assert (2 - m.euler_number) // 2 == genus
    return m


@pytest.mark.parametrize("sdf,volume,genus", [
    (sphere_sdf, 4 / 3 * math.pi * 0.7 ** 3, 0),
    (torus_sdf, 2 * math.pi ** 2 * 0.55 * 0.25 ** 2, 1),
])
def test_closed_mesh_across_blocks(sdf, volume, genus):
    stats = {}
    v, f = compute_mesh(sdf, 96, 32, "cpu", chunk=CHUNK, stats=stats)
    _check_closed(v, f, volume, genus)
    assert stats["blocks_total"] == 27 and stats["degenerate_faces_dropped"] == 0
    # Skipping far cells is exact: the same mesh as evaluating every sample.
    v0, f0 = compute_mesh(sdf, 96, 32, "cpu", chunk=CHUNK, skip_margin=0.0)
    assert np.array_equal(f, f0) and np.allclose(v, v0, atol=1e-12)


def test_skipping_saves_samples_and_outside_blocks():
    stats = {}
    v, f = compute_mesh(lambda p: sphere_sdf(p, 0.3), 128, 16, "cpu", chunk=CHUNK, stats=stats)
    _check_closed(v, f, 4 / 3 * math.pi * 0.3 ** 3, 0)
    assert stats["blocks_outside_sphere"] > 0 and stats["blocks_far"] > 0
    assert stats["samples_evaluated"] < 0.2 * stats["samples_dense"], stats


def test_closed_even_when_the_sdf_breaks_the_skip_bound():
    """A rough field (|grad| up to ~25, far above skip_margin=2) with many ambiguous cells
    across block seams: the mesh stays closed and consistently oriented."""
    g = torch.Generator().manual_seed(0)
    dirs, phase = torch.randn(24, 3, generator=g) * 12, torch.rand(24, generator=g) * 6.28

    def rough(p):
        return torch.sin(p @ dirs.T + phase).sum(1) / 4.0 + (p.norm(dim=1) - 0.8) * 3

    v, f = compute_mesh(rough, 96, 32, "cpu", chunk=CHUNK, skip_margin=2.0)
    m = trimesh.Trimesh(v, f, process=False)
    assert len(f) > 100000 and m.is_watertight and m.is_winding_consistent


def test_thin_features_on_block_seams_stay_closed():
    """Many thin fins cut by small blocks: some blocks hold their only crossings on their lower
    face layer (which no mask entry names). A regression: those blocks were dropped as empty and
    left 115 boundary edges here; the mesh must equal the one-block mesh."""
    def fins(p):
        s = torch.sin(60 * p + torch.tensor([0.3, 1.1, 2.0]))
        return p.norm(dim=1) - 0.6 - 0.05 * s[:, 0] * s[:, 1] * s[:, 2]

    v, f = compute_mesh(fins, 128, 16, "cpu", chunk=CHUNK)
    m = trimesh.Trimesh(v, f, process=False)
    assert m.is_watertight and m.is_winding_consistent
    v1, f1 = compute_mesh(fins, 128, 128, "cpu", chunk=CHUNK)
    assert len(f) == len(f1) and abs(m.volume / trimesh.Trimesh(v1, f1, process=False).volume - 1) < 1e-9


def test_surface_closes_at_the_unit_sphere():
    """A half-space z < 0 is cut by the bounding sphere into a closed half ball."""
    v, f = compute_mesh(lambda p: p[:, 2] + 0.0123, 64, 32, "cpu", chunk=CHUNK)
    m = _check_closed(v, f, 2 / 3 * math.pi * (1 - 0.0123 * 3 / 2 + 0.0123 ** 3 / 2), 0)
    assert np.linalg.norm(m.vertices, axis=1).max() <= 1.0 + 1e-6


class Exploding:
    """An SDF that raises after ``limit`` calls (a killed run); counts its calls."""

    def __init__(self, limit=None):
        self.calls, self.limit = 0, limit

    def __call__(self, p):
        self.calls += 1
        if self.limit is not None and self.calls > self.limit:
            raise KeyboardInterrupt("killed")
        return torus_sdf(p)


def test_resume_per_block(tmp_path):
    ref_v, ref_f = compute_mesh(torus_sdf, 96, 32, "cpu", chunk=CHUNK)
    blocks = tmp_path / "blocks"
    with pytest.raises(KeyboardInterrupt):
        compute_mesh(Exploding(limit=20), 96, 32, "cpu", chunk=CHUNK, blocks_dir=blocks)
    done = len(list(blocks.glob("b*.npz")))
    assert 5 <= done < 27
    full, again, stats = Exploding(), Exploding(), {}
    compute_mesh(full, 96, 32, "cpu", chunk=CHUNK, blocks_dir=tmp_path / "other")
    v, f = compute_mesh(again, 96, 32, "cpu", chunk=CHUNK, blocks_dir=blocks, stats=stats)
    assert stats["blocks_resumed"] == done and again.calls <= full.calls - done
    assert np.array_equal(f, ref_f) and np.array_equal(v, ref_v)
    # Blocks made with another grid are never reused.
    stats = {}
    compute_mesh(torus_sdf, 96, 48, "cpu", chunk=CHUNK, blocks_dir=blocks, stats=stats)
    assert stats["blocks_resumed"] == 0


def test_bad_grid_sizes():
    with pytest.raises(ValueError, match="multiples of coarse_factor"):
        compute_mesh(sphere_sdf, 100, 32, "cpu")


def _scene(tmp_path: Path) -> dict[str, Path]:
    sp = tmp_path / "sfm_points"
    sp.mkdir()
    u2w = np.diag([2.0, 2.0, 2.0, 1.0])
    u2w[:3, 3] = [1.0, -2.0, 0.5]
    json.dump({"unit_to_world": u2w.tolist(), "world_to_unit": np.linalg.inv(u2w).tolist(),
               "sphere_center": [1.0, -2.0, 0.5], "sphere_radius": 2.0}, (sp / "scene.json").open("w"))
    (tmp_path / "train").mkdir()
    return {"train": tmp_path / "train", "sfm_points": sp}


def test_stage_writes_world_mesh_with_colours(tmp_path, monkeypatch):
    colour = lambda p: (p / p.norm(dim=1, keepdim=True)) * 0.5 + 0.5  # noqa: E731 - a normal map
    monkeypatch.setattr(mesh_stage, "load_model", lambda d, dev: mesh_stage.SdfModel(sphere_sdf, lambda: colour))
    out = tmp_path / "out"
    out.mkdir()
    cfg = MeshConfig(resolution=64, block_res=32, eval_chunk=CHUNK)
    summary = mesh_stage.run(_scene(tmp_path), cfg, out, Context(scene="t", progress=False))
    m = trimesh.load(out / "mesh_raw.ply", process=False)
    radius = np.linalg.norm(m.vertices - [1.0, -2.0, 0.5], axis=1)
    assert abs(radius.mean() - 1.4) < 0.01 and m.is_watertight
    rgb = np.asarray(m.visual.vertex_colors)[:, :3] / 255.0
    expected = ((m.vertices - [1.0, -2.0, 0.5]) / radius[:, None]) * 0.5 + 0.5
    assert np.abs(rgb - expected).max() < 0.03
    info = json.loads((out / "mesh.json").read_text())
    assert info["faces"] == len(m.faces) == summary["faces"] and info["vertex_colours"]
    assert not (out / "blocks").exists()


def test_stage_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(mesh_stage, "load_model", lambda d, dev: mesh_stage.SdfModel(lambda p: p[:, 0] * 0 + 1))
    out = tmp_path / "out"
    out.mkdir()
    inputs = _scene(tmp_path)
    with pytest.raises(StageError, match="no surface inside the bounding sphere"):
        mesh_stage.run(inputs, MeshConfig(resolution=32, block_res=16, eval_chunk=CHUNK), out,
                       Context(scene="t", progress=False))
    with pytest.raises(ConfigError, match="multiples of coarse_factor"):
        mesh_stage.run(inputs, MeshConfig(resolution=100), out, Context(scene="t"))
