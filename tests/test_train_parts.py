"""Unit tests of the train stage's parts: hash grid vs a reference twin, numerical gradients on
analytic SDFs, schedules, sample placement and NeuS rendering, checkpoints, camera transforms."""
from __future__ import annotations

import dataclasses
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from stages.train import checkpoint, schedule
from stages.train.data import c2w_to_unit, split_views
from stages.train.gradients import sdf_and_gradients
from stages.train.hashgrid import GridSpec, HashGrid, encode_reference
from stages.train.losses import curvature, eikonal
from stages.train.render import OccupancyGrid, RenderOptions, composite, neus_alpha, place_samples, sphere_hits

SPECS = [
    GridSpec(levels=6, features=2, log2_table=12, base_res=4, max_res=64),  # 3 dense + 3 hashed levels
    GridSpec(levels=4, features=8, log2_table=10, base_res=3, max_res=40),  # features like Neuralangelo
    GridSpec(levels=3, features=1, log2_table=16, base_res=8, max_res=32),  # all dense
]


@pytest.mark.parametrize("spec", SPECS, ids=["mixed", "f8", "dense"])
def test_hashgrid_matches_reference_values_and_gradients(spec):
    torch.manual_seed(0)
    grid = HashGrid(spec)
    with torch.no_grad():
        grid.table.uniform_(-1, 1)
    x = torch.rand(300, 3)
    x[:5] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5], [0.5, 1.0, 0.0], [0.999, 0.001, 1.0]])
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = grid(xa)
    ref = encode_reference(xb, grid.table, spec)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(out)
    g_table, g_x = torch.autograd.grad((out * weights).sum(), [grid.table, xa])
    r_table, r_x = torch.autograd.grad((ref * weights).sum(), [grid.table, xb])
    torch.testing.assert_close(g_table, r_table, rtol=1e-4, atol=1e-5)
    interior = (x > 0).all(1) & (x < 1).all(1)  # clamp kills the gradient on the boundary
    torch.testing.assert_close(g_x[interior], r_x[interior], rtol=1e-4, atol=1e-4)


def test_hashgrid_layout_is_tcnn_like():
    spec = GridSpec(levels=16, features=8, log2_table=22, base_res=32, max_res=2048)
    res, sizes, hashed = spec.resolutions(), spec.sizes(), spec.hashed()
    assert res[0] == 32 and res[-1] in (2048, 2049)
    assert all(s % 8 == 0 for s in sizes) and sizes.max() == 1 << 22
    assert not hashed[0] and hashed[-1]
    dense = ~hashed
    assert np.all(sizes[dense] == np.ceil(res[dense].astype(float) ** 3 / 8) * 8)
    grid = HashGrid(GridSpec(levels=6, features=2, log2_table=12, base_res=4, max_res=64))
    assert list(grid.state_dict()) == ["table"]  # one tensor: backend-independent checkpoints


def test_hashgrid_interpolates_a_linear_field_exactly_on_dense_levels():
    spec = GridSpec(levels=2, features=1, log2_table=16, base_res=5, max_res=9)
    grid = HashGrid(spec)
    with torch.no_grad():  # entry value = its x coordinate / scale, i.e. the input x itself
        for lv in range(spec.levels):
            r, off, sc = int(spec.resolutions()[lv]), int(spec.offsets()[lv]), float(spec.scales()[lv])
            idx = torch.arange(int(spec.sizes()[lv]))
            grid.table[off:off + len(idx), 0] = ((idx % r).float() - 0.5) / sc
    x = torch.rand(200, 3) * 0.75 + 0.1  # (x * scale + 0.5 + 1 < resolution: no wrap-around corner)
    torch.testing.assert_close(grid(x), x[:, :1].expand(-1, 2), rtol=0, atol=1e-5)


def sphere_field(r=0.5, scale=1.0):
    return lambda x, feature_rows=slice(None): (scale * (x.norm(dim=-1) - r), x[feature_rows, :1] * 0)


def box_field(b=(0.4, 0.3, 0.2)):
    b = torch.tensor(b, dtype=torch.float64)

    def f(x, feature_rows=slice(None)):
        q = x.abs() - b
        return q.clamp_min(0).norm(dim=-1) + q.max(-1).values.clamp_max(0), x[feature_rows, :1] * 0
    return f


@pytest.mark.parametrize("mode", ["tetra4", "central6", "analytic"])
def test_numerical_gradients_match_normals_of_sphere_and_box(mode):
    torch.manual_seed(1)
    d = torch.nn.functional.normalize(torch.randn(500, 3, dtype=torch.float64), dim=-1)
    x = d * (0.5 + 0.2 * (torch.rand(500, 1, dtype=torch.float64) - 0.5))
    _, _, grad, _ = sdf_and_gradients(sphere_field(), x, 1e-3, mode)
    # the tetrahedral taps are first-order accurate (error ~ eps * off-diagonal Hessian)
    torch.testing.assert_close(grad, d, rtol=0, atol=4e-3 if mode == "tetra4" else 1e-5)
    if mode == "tetra4":
        _, _, fine, _ = sdf_and_gradients(sphere_field(), x, 1e-5, mode)
        torch.testing.assert_close(fine, d, rtol=0, atol=4e-5)
    # box: points near the +x face (away from edges) have normal +x; near -z face, -z
    pts = torch.tensor([[0.42, 0.05, -0.03], [0.38, -0.1, 0.05], [0.1, 0.0, -0.21]], dtype=torch.float64)
    _, _, grad, _ = sdf_and_gradients(box_field(), pts, 1e-3, mode)
    want = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["tetra4", "central6"])
def test_tap_layouts_give_the_same_values_and_gradients(mode, monkeypatch):
    """Point-major taps (the default, for cache locality) against tap-major ones, with the feature
    computed at the centres only (the default) or at every tap, through a real hash-grid SDF
    network: same SDF, feature, gradient, Laplacian and parameter gradients."""
    from stages.train import gradients
    from stages.train.fields import SDFNetwork

    cfg = TrainConfig(grid_levels=4, grid_features=2, grid_log2_table=10, grid_base_res=4, grid_max_res=32,
                      sdf_hidden=32, feature_dim=8)
    torch.manual_seed(3)
    net = SDFNetwork(cfg)
    with torch.no_grad():
        net.grid.table.normal_(0.0, 0.1)  # a bumpy field, so the taps differ
        net.layers[0].weight.normal_(0.0, 0.3)  # (geometric init zeroes the grid's inputs)
    x = torch.rand(300, 3) * 1.4 - 0.7
    results = []
    for interleave, centres in ((True, True), (False, True), (True, False), (False, False)):
        monkeypatch.setattr(gradients, "INTERLEAVE", interleave)
        monkeypatch.setattr(gradients, "FEATURE_AT_CENTRES", centres)
        net.zero_grad(set_to_none=True)
        out = sdf_and_gradients(net, x, 0.02, mode)
        (out[0].sum() + out[1].square().sum() + out[2].square().sum() + out[3].abs().sum()).backward()
        results.append([o.detach() for o in out] + [p.grad.clone() for p in net.parameters()])
    assert results[0][3].abs().max() > 1.0 and results[0][4].abs().max() > 0  # Laplacian and grid grads live
    for other in results[1:]:  # same values; gradients up to the order of their fp32 sums (1/eps^2 terms)
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=3e-4 * float(b.abs().max()))


def test_feature_rows_give_the_full_networks_values_and_gradients():
    """SDFNetwork computes the feature only at ``feature_rows``: the SDF of every row, the feature
    of those rows and every parameter's gradient equal the full network's (weight norm on)."""
    from stages.train.fields import SDFNetwork

    cfg = TrainConfig(grid_levels=4, grid_features=2, grid_log2_table=10, grid_base_res=4, grid_max_res=32,
                      sdf_hidden=32, feature_dim=8, weight_norm=True)
    torch.manual_seed(4)
    net = SDFNetwork(cfg)
    with torch.no_grad():
        net.grid.table.normal_(0.0, 0.1)
        net.layers[0].weight.normal_(0.0, 0.3)
    x = torch.rand(250, 3) * 1.4 - 0.7
    w_sdf, w_feat = torch.randn(250), torch.randn(50, 8)
    results = []
    for rows in (slice(0, None, 5), None):
        net.zero_grad(set_to_none=True)
        sdf, feat = net(x, feature_rows=rows)
        feat = feat if rows is not None else feat[0::5]
        assert feat.shape == (50, 8) and sdf.shape == (250,)
        ((sdf * w_sdf).sum() + (feat * w_feat).sum()).backward()
        results.append([sdf.detach(), feat.detach()] + [p.grad.clone() for p in net.parameters()])
    assert all(g.abs().max() > 0 for g in results[0][2:])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["tetra4", "central6"])
def test_laplacian_eikonal_and_curvature_on_a_sphere(mode):
    torch.manual_seed(2)
    d = torch.nn.functional.normalize(torch.randn(400, 3, dtype=torch.float64), dim=-1)
    radius = 0.3 + 0.6 * torch.rand(400, 1, dtype=torch.float64)
    x = d * radius
    sdf, _, grad, lap = sdf_and_gradients(sphere_field(0.5), x, 1e-3, mode)
    tol = 5e-3 if mode == "tetra4" else 1e-4  # tetrahedral taps: first-order accurate
    torch.testing.assert_close(lap, 2.0 / radius[:, 0], rtol=tol, atol=0)
    valid = torch.ones(400, dtype=torch.bool)
    assert float(eikonal(grad, valid)) < 1e-5
    assert math.isclose(float(curvature(lap, valid)), float((2.0 / radius).mean()), rel_tol=tol)
    _, _, grad2, _ = sdf_and_gradients(sphere_field(0.5, scale=2.0), x, 1e-3, mode)
    assert math.isclose(float(eikonal(grad2, valid)), 1.0, rel_tol=1e-4)  # (|2| - 1)^2


def test_schedules():
    cfg = TrainConfig(iterations=1000, grid_levels=8, c2f_init_levels=2, c2f_step=100, warmup_steps=100,
                      lr_final_ratio=0.1, sfm_loss_steps=400, curvature_weight=5e-4, curvature_warmup_steps=50,
                      eps_start_cells=1.0,
                      eps_end_cells=0.25, grid_base_res=8, grid_max_res=128)
    spec = GridSpec(8, 2, 14, 8, 128)
    assert [schedule.active_levels(s, cfg, spec) for s in (0, 99, 100, 550, 10_000)] == [2, 2, 3, 7, 8]
    eps = [schedule.epsilon(s, cfg, spec) for s in range(0, 1000, 50)]
    assert all(a >= b for a, b in zip(eps, eps[1:]))
    assert math.isclose(eps[0], spec.cell_size(1)) and math.isclose(eps[-1], 0.25 * spec.cell_size(7))
    assert math.isclose(schedule.lr_factor(0, cfg), 0.01) and math.isclose(schedule.lr_factor(99, cfg), 1.0)
    assert math.isclose(schedule.lr_factor(1000, cfg), 0.1)
    assert math.isclose(schedule.sfm_weight(0, cfg), cfg.sfm_weight) and schedule.sfm_weight(400, cfg) == 0.0
    w = [schedule.curvature_weight(s, cfg, spec) for s in (0, 25, 50, 100)]
    assert w[0] == 0.0 and math.isclose(w[1], cfg.curvature_weight / 2) and math.isclose(w[2], cfg.curvature_weight)
    assert math.isclose(w[3], cfg.curvature_weight / spec.per_level_scale)
    faded = dataclasses.replace(cfg, curvature_fade_start=0.5)
    assert schedule.curvature_weight(500, faded, spec) == schedule.curvature_weight(500, cfg, spec)
    assert math.isclose(schedule.curvature_weight(750, faded, spec), schedule.curvature_weight(750, cfg, spec) / 2)
    assert schedule.curvature_weight(1000, faded, spec) == 0.0
    two = TrainConfig(iterations=1000, warmup_steps=0, lr_decay="two_steps", lr_gamma=10.0)
    assert [schedule.lr_factor(s, two) for s in (0, 599, 600, 800)] == [1.0, 1.0, 0.1, 0.01]


def test_place_samples_partitions_the_segment_and_follows_occupancy():
    o = torch.tensor([[-3.0, 0.0, 0.0], [-3.0, 0.5, 0.0], [0.0, 5.0, 0.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    near, far, hit = sphere_hits(o, d)
    assert hit.tolist() == [True, True, False] and math.isclose(float(near[0]), 2.0, abs_tol=1e-6)
    opts = RenderOptions(samples=16, candidates=200, empty_weight=0.01, perturb=True)
    mids, dists = place_samples(o, d, near, far, None, opts)
    torch.testing.assert_close(dists[:2].sum(1), far[:2] - near[:2])
    assert float(dists[2].abs().max()) == 0.0
    grid = OccupancyGrid(32, "cpu")
    grid.occ = (grid.centres[:, 0] - 0.5).abs() < 0.1  # cells covering 0.375 < x < 0.625
    mids, dists = place_samples(o, d, near, far, grid, opts)
    x = o[0, 0] + mids[0]
    # occupied length 0.25 vs 1.75 * 0.01 empty-weighted: ~93% of the mass is in the slab
    assert ((x - 0.5).abs() < 0.125).float().mean() >= 0.8
    torch.testing.assert_close(dists[0].sum(), far[0] - near[0])


def test_neus_rendering_of_a_sphere_sdf():
    """Rays at a sphere of radius 0.5: opacity ~1 and depth at the surface; misses stay empty."""
    o = torch.tensor([[-3.0, 0.0, 0.0], [-3.0, 0.2, 0.1], [-3.0, 0.9, 0.0]])
    d = torch.tensor([[1.0, 0.0, 0.0]]).expand(3, 3)
    near, far, _ = sphere_hits(o, d)
    mids, dists = place_samples(o, d, near, far, None, RenderOptions(samples=256, candidates=256, perturb=False))
    pts = o[:, None] + mids[..., None] * d[:, None]
    sdf = pts.norm(dim=-1) - 0.5
    grad = torch.nn.functional.normalize(pts, dim=-1)
    alpha = neus_alpha(sdf, grad, d[:, None].expand_as(pts), dists, torch.tensor(500.0), 1.0)
    w = composite(alpha)
    opacity, depth = w.sum(1), (w * mids).sum(1) / w.sum(1).clamp_min(1e-9)
    true_depth = 3.0 - torch.sqrt(0.25 - (o[:2, 1:] ** 2).sum(1))
    assert float(opacity[:2].min()) > 0.99 and float(opacity[2]) < 5e-3  # NeuS's 1e-5 per sample
    torch.testing.assert_close(depth[:2], true_depth, rtol=0, atol=5e-3)


def test_background_samples_lie_behind_the_sphere():
    from stages.train.render import background_samples

    o = torch.tensor([[-3.0, 0.0, 0.0], [-3.0, 0.0, 2.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    near, far, hit = sphere_hits(o, d)
    start = torch.where(hit, far, torch.full_like(far, 0.05))
    mids, dists = background_samples(o, d, start, 16, perturb=True)
    assert hit.tolist() == [True, False] and float(mids[0].min()) > 4.0 and float(mids[1].min()) >= 0.05
    assert bool((mids[:, 1:] > mids[:, :-1]).all()) and bool((dists > 0).all()) and float(mids[:, -1].min()) > 50


def test_occupancy_update_marks_the_shell():
    grid = OccupancyGrid(32, "cpu")
    frac = grid.update(lambda x: (x.norm(dim=-1) - 0.5, None), inv_s=1e4, margin_cells=1.0, margin_s=0.0)
    r = grid.centres[grid.occ].norm(dim=-1)
    assert 0.0 < frac < 0.2 and float((r - 0.5).abs().max()) <= grid.half_diag + 1e-6
    assert bool(grid.lookup(torch.tensor([[0.5, 0.0, 0.0]]))[0]) and not bool(grid.lookup(torch.zeros(1, 3))[0])


def test_checkpoints_rotate_and_restore_rng(tmp_path):
    for step in (0, 10, 20, 30):
        checkpoint.save(tmp_path, step, {"step": step, "rng": checkpoint.rng_state(torch.device("cpu"))})
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [20, 30]
    assert not list(tmp_path.glob(".*tmp"))
    (tmp_path / ".step_00000040.pt.abc.tmp").write_bytes(b"half a checkpoint")  # a killed write
    assert checkpoint.latest(tmp_path).name == "step_00000030.pt" and not list(tmp_path.glob(".*tmp"))
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = checkpoint.rng_state(torch.device("cpu"))
    checkpoint.save(tmp_path, 40, {"rng": state})
    expect = (torch.rand(3), np.random.rand(3), random.random())
    loaded = checkpoint.load(checkpoint.latest(tmp_path))  # weights_only=True
    checkpoint.set_rng_state(loaded["rng"], torch.device("cpu"))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]


def test_camera_similarity_and_view_split():
    from pipeline.cameras import look_at

    c2w = np.stack([look_at(np.array([2.0, 0.0, 1.0]), np.zeros(3), np.array([0.0, 0.0, 1.0]))])
    w2u = np.diag([0.5, 0.5, 0.5, 1.0])
    w2u[:3, 3] = [0.1, -0.2, 0.3]
    out = c2w_to_unit(c2w, w2u)
    np.testing.assert_allclose(out[0, :3, :3] @ out[0, :3, :3].T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(out[0, :3, 3], 0.5 * c2w[0, :3, 3] + w2u[:3, 3])
    train, held = split_views(24, 8)
    assert held.tolist() == [0, 8, 16] and len(train) == 21
    assert len(split_views(10, 8)[1]) == 0 and len(split_views(24, 0)[1]) == 0


def test_config_presets_have_docs():
    from pipeline.config import field_docs

    docs = field_docs("train")
    assert all(docs.values()) and len(docs) > 40
    assert SimpleNamespace(**TrainConfig().__dict__).gradient_mode == "tetra4"


def test_views_whose_computed_masks_are_flagged_are_not_trained_on(tmp_path, caplog):
    """masks.json flags (a computed mask that disagrees with the others) keep that view out of
    object-mode training; the same flags on provided masks are only reported by the masks stage."""
    import json
    import logging

    from stages.train.data import load_scene
    from train_inputs import analytic_scene

    inputs, _ = analytic_scene(tmp_path / "s", views=6, width=32, height=24, n_points=50)
    info_path = inputs["masks"] / "masks.json"
    flags = {2: ["outside_consensus"], 4: ["coverage_outlier"]}  # a small mask alone is no evidence
    frames = [{"name": f"{i:06d}", "flags": flags.get(i, [])} for i in range(6)]
    info_path.write_text(json.dumps({"method": "grabcut", "frames": frames}))
    with caplog.at_level(logging.WARNING):
        scene = load_scene(inputs, logging.getLogger("t"))
    assert scene.views_with_masks.tolist() == [True, True, False, True, True, True]
    assert "1 views whose masks disagree" in caplog.text and "000002" in caplog.text
    info_path.write_text(json.dumps({"method": "provided", "frames": frames}))
    assert load_scene(inputs, logging.getLogger("t")).views_with_masks.all()
