"""Camera refinement (train.refine_cameras, stages/train/cameras.py): the exp map against scipy
and gradcheck, zero corrections leave the rays bit-identical, perturbed poses are recovered on
the analytic scene with its exact SDF and colour held fixed, and a real training run with
refinement on reports its corrections, checkpoints them and resumes them exactly."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_inputs  # noqa: E402
from train_inputs import analytic_scene  # noqa: E402

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.dag import Context  # noqa: E402
from pipeline.errors import StageError  # noqa: E402
from stages import train  # noqa: E402
from stages.train import losses  # noqa: E402
from stages.train.cameras import (CameraCorrections, correct_c2w, correct_rays, perturb_c2w, pose_errors,  # noqa: E402
                                  so3_exp)
from stages.train.data import load_scene  # noqa: E402
from stages.train.rays import RaySampler, camera_rays  # noqa: E402
from stages.train.render import OccupancyGrid, RenderOptions, render_rays  # noqa: E402
from stages.train.stage import run_stage  # noqa: E402

TINY = dict(iterations=12, batch_rays=64, views_per_batch=2, samples_per_ray=8, ray_candidates=32, occ_resolution=16,
            occ_update_every=4, grid_levels=4, grid_features=2, grid_log2_table=10, grid_base_res=4, grid_max_res=32,
            sdf_hidden=16, feature_dim=8, color_layers=1, color_hidden=16, c2f_init_levels=2, c2f_step=4,
            warmup_steps=2, checkpoint_every=4, log_every=1, holdout_eval_views=1, holdout_every=4,
            sfm_points_per_view=8, bg_samples=8, eval_chunk=1024, cos_anneal_steps=6, sfm_loss_steps=8,
            occ_warmup_steps=4, curvature_weight=5e-4)  # tests/test_train.py's


def ctx() -> Context:
    return Context(scene="test", device="cpu", progress=False, log=logging.getLogger("test_refine_cameras"))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return analytic_scene(tmp_path_factory.mktemp("analytic"), views=12, width=48, height=36)[0]


def test_exp_map_matches_scipy_and_passes_gradcheck():
    from scipy.spatial.transform import Rotation

    torch.manual_seed(0)
    omega = torch.randn(64, 3, dtype=torch.float64) * torch.tensor([1e-9, 1e-4, 0.05, 0.5, 2.0, 3.0]).double().repeat(
        11)[:64, None]
    np.testing.assert_allclose(so3_exp(omega).numpy(), Rotation.from_rotvec(omega.numpy()).as_matrix(), atol=1e-14)
    assert torch.equal(so3_exp(torch.zeros(3, 3)), torch.eye(3).expand(3, 3, 3))
    # at 0 the derivative is the cross-product generator: d/d omega_a exp(omega) = skew(e_a)
    jac = torch.autograd.functional.jacobian(so3_exp, torch.zeros(1, 3, dtype=torch.float64)).reshape(3, 3, 3)
    for a in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[a] = 1.0
        torch.testing.assert_close(jac[..., a], torch.linalg.cross(e.expand(3, 3), torch.eye(3).double(), dim=-1).T)
    for scale in (1e-7, 0.03, 1.0):
        w = (torch.randn(5, 3, dtype=torch.float64) * scale).requires_grad_(True)
        assert torch.autograd.gradcheck(so3_exp, (w,))
    delta = (torch.randn(4, 6, dtype=torch.float64) * 0.1).requires_grad_(True)
    o = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    d = torch.nn.functional.normalize(torch.randn(20, 3, dtype=torch.float64), dim=-1).requires_grad_(True)
    views = torch.randint(0, 4, (20,))
    rot = torch.as_tensor(np.stack([Rotation.random(random_state=i).as_matrix() for i in range(4)]))
    assert torch.autograd.gradcheck(lambda a, b, c: correct_rays(a, rot, b, c, views), (delta, o, d))


def test_corrected_rays_are_the_rays_of_the_corrected_cameras():
    """Rays moved by the corrections equal the rays of ``correct_c2w``'s cameras (float64)."""
    rng = np.random.default_rng(1)
    from pipeline.cameras import intrinsics, look_at

    c2w = np.stack([look_at(rng.normal(size=3) * 3, np.zeros(3), np.array([0.0, 0.0, 1.0])) for _ in range(3)])
    delta = rng.normal(size=(3, 6)) * 0.05
    K = torch.as_tensor(intrinsics(50.0, 50.0, 32.0, 24.0)).expand(30, 3, 3).double()
    uv = torch.as_tensor(rng.random((30, 2)) * [64, 48])
    views = torch.as_tensor(rng.integers(0, 3, 30))
    o, d = camera_rays(K, torch.as_tensor(c2w)[views], uv)
    cams = CameraCorrections(torch.as_tensor(c2w))
    with torch.no_grad():
        cams.delta.copy_(torch.as_tensor(delta))
    o2, d2 = cams(o, d, views)
    ro, rd = camera_rays(K, torch.as_tensor(correct_c2w(delta, c2w))[views], uv)
    torch.testing.assert_close(o2, ro)
    torch.testing.assert_close(d2, rd)
    errors = pose_errors(perturb_c2w(c2w, 2.0, 0.03, seed=3), c2w)
    np.testing.assert_allclose(errors["rotation_deg"], 2.0, rtol=1e-9)
    np.testing.assert_allclose(errors["center"], 0.03, rtol=1e-9)


def test_zero_corrections_leave_the_rays_bit_identical(scene):
    data = load_scene(scene, logging.getLogger("t"))
    views = np.arange(len(data.names))
    sampler = RaySampler(data.images, data.masks, data.K, data.c2w, views, torch.device("cpu"))
    torch.manual_seed(0)
    batch = sampler.sample(512, 6, 0.5)
    o, d = CameraCorrections(sampler.c2w)(batch.origins, batch.dirs, batch.ray_views)
    assert torch.equal(o, batch.origins) and torch.equal(d, batch.dirs)
    assert o.requires_grad and d.requires_grad


class AnalyticModel(torch.nn.Module):
    """The analytic scene's exact SDF (sphere-box union) and colour (its texture, shaded by the
    normal) in unit coordinates, in the shape ``render_rays`` takes; nothing trainable."""

    background = None

    def __init__(self, unit_to_world: np.ndarray, inv_s: float = 400.0):
        super().__init__()
        self.scale = float(unit_to_world[0, 0])
        self.centre = torch.as_tensor(unit_to_world[:3, 3], dtype=torch.float32)
        self._inv_s = torch.tensor(inv_s)

    def world(self, x):
        return x * self.scale + self.centre

    def sdf(self, x, feature_rows=None):
        p = self.world(x.float())
        c, r = torch.as_tensor(train_inputs.SPHERE_C, dtype=p.dtype), train_inputs.SPHERE_R
        lo, hi = (torch.as_tensor(b, dtype=p.dtype) for b in (train_inputs.BOX_LO, train_inputs.BOX_HI))
        q = (p - 0.5 * (lo + hi)).abs() - 0.5 * (hi - lo)
        box = q.clamp_min(0).norm(dim=-1) + q.max(-1).values.clamp_max(0)
        sdf = torch.minimum((p - c).norm(dim=-1) - r, box)
        feat = x[feature_rows if feature_rows is not None else slice(None), :1]
        return sdf / self.scale, feat

    def codes(self, ray_views, rays):
        return None  # no appearance codes

    def color(self, x, normal, view_dir, feature, appearance=None):
        light = torch.as_tensor(train_inputs.LIGHT, dtype=x.dtype)
        tex = train_inputs._texture(self.world(x), 9.0, np.array([[0.9, 0.35, 0.2], [0.2, 0.5, 0.85]]))
        return tex * (0.4 + 0.6 * (normal * light).sum(-1).clamp_min(0))[:, None]

    def inv_s(self):
        return self._inv_s


def refine_frozen(data, c2w, steps: int, lr: float, seed: int = 0) -> np.ndarray:
    """Optimise only the corrections of cameras ``c2w`` against the fixed analytic model, with
    the object-mode losses (RGB L1 on a random background, mask BCE); returns the corrections."""
    torch.manual_seed(seed)
    model = AnalyticModel(data.unit_to_world)
    occ = OccupancyGrid(32, "cpu")
    occ.update(model.sdf, float(model.inv_s()), 1.5, 6.0)
    views = np.arange(len(data.names))
    sampler = RaySampler(data.images, data.masks, data.K, c2w, views, torch.device("cpu"))
    cams = CameraCorrections(sampler.c2w)
    opt = torch.optim.Adam(cams.parameters(), lr=lr)
    opts = RenderOptions(samples=16, candidates=64, eps=torch.tensor(2e-3))
    for step in range(steps):
        batch = sampler.sample(1536, len(views), 0.5)
        o, d = cams(batch.origins, batch.dirs, batch.ray_views)
        bg = torch.rand(batch.rgb.shape)
        out = render_rays(model, o, d, occ, opts, bg)
        target = torch.where(batch.mask[:, None], batch.rgb, bg)
        loss = losses.rgb_l1(out["rgb"], target) + 0.1 * losses.mask_bce(out["opacity"], batch.mask)
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 ** (step / steps))
        opt.step()
    return cams.delta.detach().double().numpy()


def reprojection_px(data, c2w) -> float:
    """Mean image distance (pixels) between the scene's surface points projected by ``c2w`` and
    by the true cameras: the misalignment the images see."""
    from pipeline.cameras import project

    pts = data.points.astype(np.float64)
    return float(np.mean([np.linalg.norm(project(pts, data.K[i], np.linalg.inv(c2w[i]))[0]
                                         - project(pts, data.K[i], np.linalg.inv(data.c2w[i]))[0], axis=1).mean()
                          for i in range(len(c2w))]))


def test_refinement_recovers_perturbed_poses_on_a_fixed_scene(tmp_path):
    """24 views of 96x72 px, each turned by 2 degrees about its centre and moved by 0.04 (unit
    sphere: 1 % of the camera distance); the SDF and colour are the exact ones, only the
    corrections are optimised. The rotation error must drop by at least half and the image
    misalignment by 80 %. (The centres move along the optical axes by a few hundredths: NeuS
    renders the exact SDF's silhouette a little thin, grazing rays being nearly transparent, and
    the loss is lowest a little closer; a trained SDF takes that up. Motion along the axis
    changes the image least of all, so it does not show in the misalignment.)"""
    inputs, _ = analytic_scene(tmp_path, views=24, width=96, height=72)
    data = load_scene(inputs, logging.getLogger("t"))
    start = perturb_c2w(data.c2w, 2.0, 0.04, seed=0)
    before, px_before = pose_errors(start, data.c2w), reprojection_px(data, start)
    refined = correct_c2w(refine_frozen(data, start, steps=150, lr=2e-3), start)
    after, px_after = pose_errors(refined, data.c2w), reprojection_px(data, refined)
    print(f"frozen-scene refinement: rotation {before['rotation_deg_mean']:.3f} -> {after['rotation_deg_mean']:.3f} "
          f"deg (max {after['rotation_deg_max']:.3f}), centre {before['center_mean']:.4f} -> "
          f"{after['center_mean']:.4f}, misalignment {px_before:.2f} -> {px_after:.2f} px")
    assert after["rotation_deg_mean"] <= 0.5 * before["rotation_deg_mean"]  # 0.34-0.40 over 4 seeds
    assert px_after <= 0.2 * px_before  # 0.08-0.10
    assert after["center_mean"] < 0.1


def test_training_with_refinement_reports_and_checkpoints_the_corrections(scene, tmp_path):
    """Through the stage entry point: the first step's loss is the one without refinement (zero
    corrections), later ones differ; train.json, the loss curve, the checkpoints and model.pt
    hold the corrections of the training views (held-out views have none); a run without
    refinement writes checkpoints without them, as before, and neither resumes the other."""
    run_stage(scene, TrainConfig(**TINY), tmp_path / "off", ctx())
    train.run(scene, TrainConfig(**TINY, refine_cameras=True), tmp_path / "on", ctx())
    off, on = (json.loads((tmp_path / n / "train.json").read_text()) for n in ("off", "on"))
    assert on["iterations"] == 12 and off["camera_refinement"] is None
    assert on["history"][0]["loss"] == off["history"][0]["loss"] and on["history"][-1]["loss"] != off["history"][-1][
        "loss"]
    cams = on["camera_refinement"]
    held = [f"images/{i:06d}.png" for i in (0, 4, 8)]
    assert on["holdout_views"] == held and len(cams["views"]) == 9 and not set(held) & set(cams["views"])
    assert 0 < cams["rotation_deg_mean"] <= cams["rotation_deg_max"] < 5 and 0 < cams["translation_mean"] < 0.1
    assert "held-out views" in cams["note"].lower() and "cam_rot_deg" in on["history"][-1]
    state = torch.load(tmp_path / "on" / "checkpoints" / "step_00000012.pt", weights_only=True)
    model = torch.load(tmp_path / "on" / "model.pt", weights_only=True)
    np.testing.assert_allclose(state["cameras"]["delta"].numpy(), np.asarray(cams["delta"]), atol=1e-7)
    assert torch.equal(model["cameras"]["delta"], state["cameras"]["delta"]) and len(model["cameras"]["views"]) == 9
    assert "cameras" not in torch.load(tmp_path / "off" / "checkpoints" / "step_00000012.pt", weights_only=True)
    for name, refine in (("off", True), ("on", False)):
        with pytest.raises(StageError, match="refine_cameras; delete the checkpoints"):
            run_stage(scene, TrainConfig(**TINY, refine_cameras=refine), tmp_path / name, ctx())


def test_resume_after_sigterm_restores_the_corrections(scene, tmp_path, deterministic):
    """Stopped at step 6 and resumed: the same loss curve and the same corrections, bit for bit,
    as an uninterrupted run (the corrections start moving at train.camera_start_step = 3)."""
    cfg = TrainConfig(**TINY, refine_cameras=True, camera_start_step=3)
    run_stage(scene, cfg, tmp_path / "a", ctx())
    with pytest.raises(StageError, match="SIGTERM at step 6"):
        run_stage(scene, cfg, tmp_path / "b", ctx(), hook=train_inputs.sigterm_at(5))
    stopped = torch.load(tmp_path / "b" / "checkpoints" / "step_00000006.pt", weights_only=True)
    assert stopped["cameras"]["delta"].abs().max() > 0
    run_stage(scene, cfg, tmp_path / "b", ctx())
    full, resumed = (json.loads((tmp_path / n / "train.json").read_text()) for n in ("a", "b"))
    # a step records the corrections its loss saw: steps 1-4 (indices 0-3) those before step 3 moved them
    assert [h["cam_rot_deg"] for h in full["history"][:4]] == [0.0] * 4 and full["history"][4]["cam_rot_deg"] > 0
    assert resumed["history"] == full["history"] and resumed["camera_refinement"] == full["camera_refinement"]


def test_two_ranks_keep_the_corrections_equal(scene, tmp_path):
    """DDP: two ranks drawing different rays step the corrections with the averaged gradients
    (they are in the all-reduce), so the ranks end with the same corrections, bit for bit."""
    cfg = TrainConfig(**{**TINY, "iterations": 6, "batch_rays": 128, "views_per_batch": 4, "holdout_eval_views": 0,
                         "refine_cameras": True, "gpus": 2})
    two_ctx = Context(scene="test", device="cpu", progress=False, threads=1, log=logging.getLogger("t"))
    try:
        train.run(scene, cfg, tmp_path, two_ctx)
    except StageError as exc:  # a gloo rank's rare abort at exit (tests/test_ddp.py): resume once
        if "torchrun exited" not in str(exc):
            raise
        train.run(scene, cfg, tmp_path, two_ctx)
    info = json.loads((tmp_path / "train.json").read_text())
    assert info["ddp"]["ranks"] == 2 and info["ddp"]["max_param_diff_across_ranks"] == 0.0
    assert info["camera_refinement"]["rotation_deg_max"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled step and CUDA graphs are tested on CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_and_graph_steps_refine_as_the_eager_step(scene, tmp_path, backend):
    """On CUDA the corrected rays enter the compiled step (and its CUDA-graph replay) as inputs
    with gradients: the same loss curve and corrections as eager steps (eager random numbers),
    one graph, no fallback, no graph skipped."""
    from stages.train.external import triton_available

    if backend == "triton" and not triton_available():
        pytest.skip("no triton")
    base = {**TINY, "holdout_eval_views": 0, "grid_backend": backend, "refine_cameras": True}
    runs = train_inputs.eager_compiled_graph_runs(scene, base, tmp_path)
    for name in ("compiled", "graphs"):
        np.testing.assert_allclose([h["loss"] for h in runs[name]["history"]],
                                   [h["loss"] for h in runs["eager"]["history"]], rtol=1e-3)
        np.testing.assert_allclose(runs[name]["camera_refinement"]["delta"],
                                   runs["eager"]["camera_refinement"]["delta"],
                                   rtol=0, atol=1e-4)
    assert runs["eager"]["camera_refinement"]["rotation_deg_max"] > 0
