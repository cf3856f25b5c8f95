"""Per-photo appearance codes (``train.appearance_dim``): a colour MLP with codes fits photos whose
exposure differs where one without cannot; a training run learns one code per training view,
resumes bit-identically, and renders held-out views and mesh colours with the mean code."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_inputs import analytic_scene, sigterm_at  # noqa: E402

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.dag import Context  # noqa: E402
from pipeline.errors import StageError  # noqa: E402
from stages import train  # noqa: E402
from stages.train.fields import NeuSModel  # noqa: E402
from stages.train.stage import run_stage  # noqa: E402
from test_train import TINY  # noqa: E402


def ctx() -> Context:
    return Context(scene="test", device="cpu", progress=False, log=logging.getLogger("test_appearance"))


def _fit(appearance_dim: int, steps: int = 300) -> float:
    """Fit the colour MLP to one grey surface seen in 4 photos with gains 0.5-1.25: final MSE."""
    torch.manual_seed(0)
    cfg = TrainConfig(feature_dim=8, color_layers=2, color_hidden=32, appearance_dim=appearance_dim)
    model = NeuSModel(cfg, scene_mode=False, num_views=4)
    views = torch.randint(0, 4, (2048,))
    x = torch.rand(2048, 3) * 2 - 1
    normal = torch.nn.functional.normalize(x, dim=-1)
    target = (0.5 * torch.tensor([0.5, 0.75, 1.0, 1.25])[views])[:, None].expand(-1, 3)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if n.startswith(("color", "appearance"))], 1e-2)
    for _ in range(steps):
        rgb = model.color(x, normal, -normal, torch.zeros(2048, 8), model.codes(views, len(views)))
        loss = ((rgb - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def test_codes_absorb_exposure_changes_between_photos():
    without, with_codes = _fit(0), _fit(4)
    assert without > 0.008  # the gains' spread: one colour cannot match 0.25..0.625
    assert with_codes < 0.05 * without


def test_codes_start_at_zero_and_the_mean_code_stands_in_for_unknown_views():
    cfg = TrainConfig(feature_dim=8, color_layers=1, color_hidden=16, appearance_dim=3)
    model = NeuSModel(cfg, scene_mode=False, num_views=5)
    assert model.appearance.weight.shape == (5, 3) and not model.appearance.weight.any()
    with torch.no_grad():
        model.appearance.weight.copy_(torch.arange(15.0).view(5, 3))
    torch.testing.assert_close(model.codes(None, 2), torch.tensor([[6.0, 7.0, 8.0]] * 2))
    torch.testing.assert_close(model.codes(torch.tensor([4, 0]), 2), torch.tensor([[12.0, 13.0, 14.0], [0, 1, 2]]))
    assert NeuSModel(dataclasses.replace(cfg, appearance_dim=0), scene_mode=False).codes(None, 2) is None


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    inputs, _ = analytic_scene(tmp_path_factory.mktemp("analytic"), views=12, width=48, height=36)
    return inputs


def test_a_run_learns_a_code_per_training_view_and_resumes_bit_identically(scene, tmp_path, deterministic):
    cfg = TrainConfig(**{**TINY, "appearance_dim": 4})
    run_stage(scene, cfg, tmp_path / "a", ctx())
    full = json.loads((tmp_path / "a" / "train.json").read_text())
    codes = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["model"]["appearance.weight"]
    assert codes.shape == (12 - len(full["holdout_views"]), 4) and codes.abs().sum() > 0
    assert full["holdout_psnr"] is not None and full["holdout_psnr"] > 5  # held-out views: the mean code
    rgb = train.load_color(tmp_path / "a")(torch.zeros(4, 3))
    assert rgb.shape == (4, 3) and torch.isfinite(rgb).all()
    with pytest.raises(StageError, match="SIGTERM at step 6"):
        run_stage(scene, cfg, tmp_path / "b", ctx(), hook=sigterm_at(5))
    train.run(scene, cfg, tmp_path / "b", ctx())
    assert json.loads((tmp_path / "b" / "train.json").read_text())["history"] == full["history"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled step and CUDA graphs are tested on CUDA")
def test_compiled_and_graph_steps_learn_the_codes_of_the_eager_step(scene, tmp_path):
    """On CUDA the codes of a step's rays are looked up eagerly and enter the compiled step (and
    its CUDA-graph replay) as inputs: the same loss curve and the same codes as eager steps."""
    import numpy as np
    from train_inputs import eager_compiled_graph_runs

    runs = eager_compiled_graph_runs(scene, {**TINY, "holdout_eval_views": 0, "appearance_dim": 4}, tmp_path)
    codes = {name: torch.load(tmp_path / name / "model.pt", weights_only=True)["model"]["appearance.weight"]
             for name in runs}
    assert codes["eager"].abs().sum() > 0
    for name in ("compiled", "graphs"):
        np.testing.assert_allclose([h["loss"] for h in runs[name]["history"]],
                                   [h["loss"] for h in runs["eager"]["history"]], rtol=1e-3)
        torch.testing.assert_close(codes[name], codes["eager"], rtol=0, atol=1e-4)
