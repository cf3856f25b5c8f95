"""Fused SDF MLP (stages/train/mlp_triton.py) against its torch twin: values and gradients.

Runs on CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set before triton is
imported), at tiny sizes; on a CUDA machine it runs for real (3xTF32 products: fp32-like).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.errors import StageError  # noqa: E402
from stages.train import mlp_triton as mt  # noqa: E402
from stages.train.fields import SDFNetwork  # noqa: E402
from stages.train.gradients import sdf_and_gradients  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not mt.interpreting() else "cpu"
if DEVICE == "cpu" and not mt.interpreting():
    pytest.skip("no CUDA and TRITON_INTERPRET is off", allow_module_level=True)
TOL = {"rtol": 1e-4, "atol": 1e-5} if DEVICE == "cuda" else {"rtol": 1e-5, "atol": 1e-6}


def twin(x, w1, b1, w2, rows):
    h = F.softplus(F.linear(x, w1, b1), beta=100.0)
    return h @ w2, h[rows]


@pytest.mark.parametrize("m,k,hidden,rows", [(203, 35, 64, slice(0, None, 5)), (150, 11, 32, slice(0, 30)),
                                             (70, 131, 16, slice(0, None, 7))])
def test_fused_head_matches_torch_values_and_gradients(m, k, hidden, rows):
    """Row counts that are not a multiple of the block, padded input widths (35 -> 64,
    131 -> 256), both feature-row layouts; pre-activations on both sides of softplus' linear
    threshold (beta z > 20) and deep in its flat part."""
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, k, generator=g) * 0.5).to(DEVICE)
    w1 = (torch.randn(hidden, k, generator=g) * 0.4).to(DEVICE)
    b1 = (torch.randn(hidden, generator=g) * 0.1).to(DEVICE)
    w2 = torch.randn(hidden, generator=g).to(DEVICE)
    z = F.linear(x, w1, b1) * 100
    assert (z > 20).any() and (z.abs() < 20).any() and (z < -20).any()
    count = len(range(*rows.indices(m)))
    ws, wh = torch.randn(m, generator=g).to(DEVICE), torch.randn(count, hidden, generator=g).to(DEVICE)
    grads = []
    for fn in (mt.sdf_head, twin):
        leaves = [t.clone().requires_grad_(True) for t in (x, w1, b1, w2)]
        s, h = fn(*leaves, rows)
        assert s.shape == (m,) and h.shape == (count, hidden)
        ((s * ws).sum() + (h * wh).sum()).backward()
        grads.append([s.detach(), h.detach()] + [t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=TOL["rtol"], atol=TOL["atol"] * float(want.abs().max()))


def test_sdf_network_fused_equals_torch_through_numerical_gradients():
    """The SDF network with the fused MLP: SDF, feature, gradient, Laplacian and every
    parameter's gradient equal the torch path's (weight norm on, tetrahedral taps)."""
    cfg = TrainConfig(grid_levels=4, grid_features=2, grid_log2_table=10, grid_base_res=4, grid_max_res=32,
                      sdf_hidden=32, feature_dim=8)
    torch.manual_seed(5)
    net = SDFNetwork(cfg).to(DEVICE)
    with torch.no_grad():
        net.grid.table.normal_(0.0, 0.1)
        net.layers[0].weight.normal_(0.0, 0.3)
    x = (torch.rand(120, 3) * 1.4 - 0.7).to(DEVICE)
    results = []
    for fused in (True, False):
        net.fused_mlp = fused
        net.zero_grad(set_to_none=True)
        out = sdf_and_gradients(net, x, 0.02, "tetra4")
        (out[0].sum() + out[1].square().sum() + out[2].square().sum() + 1e-2 * out[3].abs().sum()).backward()
        results.append([o.detach() for o in out] + [p.grad.clone() for p in net.parameters()])
    assert all(g.abs().max() > 0 for g in results[0][4:])
    for a, b in zip(*results):  # the Laplacian divides by eps^2: compare relative to each tensor's scale
        torch.testing.assert_close(a, b, rtol=0, atol=3e-4 * float(b.abs().max()))


def test_unsupported_shapes_and_rows_are_refused():
    x, w1 = torch.zeros(8, 5, device=DEVICE), torch.zeros(24, 5, device=DEVICE)
    with pytest.raises(StageError, match="power-of-two hidden width"):
        mt.sdf_head(x, w1, torch.zeros(24, device=DEVICE), torch.zeros(24, device=DEVICE), slice(0, None, 2))
    with pytest.raises(StageError, match="start at 0"):
        mt.feature_row_span(slice(1, None, 2), 8)
