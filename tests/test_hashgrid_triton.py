"""Triton hash grid against its torch twin: values, table and x gradients, the double backward.

Runs on CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set here before triton is
imported), at tiny sizes with both dense and hashed levels; on a CUDA machine it runs for real.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from pipeline.errors import StageError  # noqa: E402
from stages.train import hashgrid_triton as ht  # noqa: E402
from stages.train.hashgrid import GridSpec, HashGrid, encode_torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not ht.interpreting() else "cpu"
if DEVICE == "cpu" and not ht.interpreting():
    pytest.skip("no CUDA and TRITON_INTERPRET is off", allow_module_level=True)

SPECS = {  # both have dense coarse levels and hashed fine levels
    2: GridSpec(levels=5, features=2, log2_table=9, base_res=4, max_res=32),
    8: GridSpec(levels=4, features=8, log2_table=10, base_res=6, max_res=40),
    3: GridSpec(levels=3, features=3, log2_table=8, base_res=4, max_res=16),  # not a power of two
}


def make_grid(features: int, seed: int = 0) -> HashGrid:
    torch.manual_seed(seed)
    grid = HashGrid(SPECS[features]).to(DEVICE)
    with torch.no_grad():
        grid.table.uniform_(-1.0, 1.0)
    return grid


def points(n: int = 160, seed: int = 1) -> torch.Tensor:
    """Random points plus the corners 0 and 1, points on the upper faces and a few outside."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g)
    x[:8] = torch.tensor([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=torch.float32)
    x[8:20, 0] = 1.0
    x[20:32, 1] = 0.0
    x[32:40, 2] = 1.0
    x[40:44] = torch.tensor([[1.2, 0.5, 0.5], [-0.1, 0.3, 0.9], [0.5, 1.5, -2.0], [0.25, 0.5, 0.75]])
    return x.to(DEVICE)


def test_spec_has_dense_and_hashed_levels():
    for spec in SPECS.values():
        assert spec.hashed().any() and not spec.hashed().all()


@pytest.mark.parametrize("features", [2, 8])
def test_values_and_gradients_match_torch(features):
    grid = make_grid(features)
    x = points()
    spec, bufs = grid.spec, grid._buffers_dict()
    gout = torch.randn(x.shape[0], spec.out_dim, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = []
    for fn in (ht.encode_triton, encode_torch):
        xr = x.clone().requires_grad_(True)
        y = fn(xr, grid.table, spec, bufs)
        results.append((y.detach(), *torch.autograd.grad(y, (xr, grid.table), gout)))
    (y1, gx1, gt1), (y0, gx0, gt0) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt1, gt0, rtol=1e-5, atol=1e-5)
    # x-gradients are scale (up to ~40) times a sum over levels: relative to their size
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5 * gx0.abs().max().item())
    # clamped coordinates get no gradient (as torch's clamp), in-range ones do
    assert gx1[40, 0] == 0 and gx1[41, 0] == 0 and gx1[42, 1] == 0 and gx1[42, 2] == 0
    assert (gx1[40:43].abs().sum(0) > 0).all() and (gx1[43].abs() > 0).all()


@pytest.mark.parametrize("features", [2, 8])
def test_runs_of_rows_in_one_cell_give_torchs_table_gradient(features, monkeypatch):
    """The backward adds up consecutive rows in one cell before its atomics (MERGE_RUNS): points
    with their finite-difference taps next to them, a long run of one repeated point that crosses
    a block boundary (rows 120-139, blocks of 128), runs at the batch's end, lone points. The
    table gradient equals torch's with and without merging, and merging leaves the values alone."""
    grid = make_grid(features)
    spec, bufs = grid.spec, grid._buffers_dict()
    g = torch.Generator().manual_seed(7)
    centres = torch.rand(60, 3, generator=g) * 0.9 + 0.05
    taps = torch.tensor([[0, 0, 0], [1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=torch.float32)
    x = (centres[:, None] + 2e-3 * taps[None]).reshape(-1, 3)  # 300 rows, point-major
    x[120:140] = x[120]
    x = torch.cat([x, torch.rand(37, 3, generator=g), x[-1:].expand(6, 3)]).to(DEVICE)
    gout = torch.randn(x.shape[0], spec.out_dim, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    y_want = encode_torch(x, grid.table, spec, bufs)
    want = torch.autograd.grad(y_want, grid.table, gout)[0]
    for merge in (True, False):
        monkeypatch.setattr(ht, "MERGE_RUNS", merge)
        y = ht.encode_triton(x, grid.table, spec, bufs)
        got = torch.autograd.grad(y, grid.table, gout)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        torch.testing.assert_close(y.detach(), y_want.detach(), rtol=1e-5, atol=1e-6)


def test_double_backward_matches_torch():
    """Eikonal through analytic gradients: d/d(x, table, gout) of a loss on dL/dx."""
    grid = make_grid(2)
    spec, bufs = grid.spec, grid._buffers_dict()
    x = points(100)
    results = []
    for fn in (ht.encode_triton, encode_torch):
        xr = x.clone().requires_grad_(True)
        gout = torch.linspace(-1.0, 1.0, x.shape[0] * spec.out_dim, device=DEVICE).view(x.shape[0], -1)
        gout.requires_grad_(True)
        y = fn(xr, grid.table, spec, bufs)
        gx, = torch.autograd.grad(y, xr, gout, create_graph=True)
        loss = ((gx.norm(dim=-1) - 1.0) ** 2).mean() + gx[:, 0].sum()
        results.append(torch.autograd.grad(loss, (xr, grid.table, gout)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    assert results[0][1].abs().max() > 0  # the table gets a gradient from the eikonal term


def test_double_backward_through_table_gradient():
    """A loss on dL/dtable (create_graph): its gradients w.r.t. x and the upstream gradient."""
    grid = make_grid(2)
    spec, bufs = grid.spec, grid._buffers_dict()
    x = points(60)
    results = []
    for fn in (ht.encode_triton, encode_torch):
        xr = x.clone().requires_grad_(True)
        gout = torch.linspace(-1.0, 1.0, x.shape[0] * spec.out_dim, device=DEVICE).view(x.shape[0], -1)
        gout.requires_grad_(True)
        gt, = torch.autograd.grad(fn(xr, grid.table, spec, bufs), grid.table, gout, create_graph=True)
        results.append(torch.autograd.grad((gt ** 2).sum(), (xr, gout)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("features", [2, 8])
def test_level_mask_matches_torch_and_skips_levels(features):
    """Coarse-to-fine: a per-level mask (here 1, 1, 0.5, then 0) equals torch's ``enc * mask`` in
    values, first and second derivatives; masked-off levels get exactly zero table gradient."""
    grid = make_grid(features)
    spec, bufs = grid.spec, grid._buffers_dict()
    weights = torch.zeros(spec.levels)
    weights[:3] = torch.tensor([1.0, 1.0, 0.5])
    mask = weights.repeat_interleave(spec.features).to(DEVICE)
    x = points(90)
    gout = torch.linspace(-1.0, 1.0, x.shape[0] * spec.out_dim, device=DEVICE).view(x.shape[0], -1)
    results = []
    for fn in (lambda p: ht.encode_triton(p, grid.table, spec, bufs, level_mask=mask),
               lambda p: encode_torch(p, grid.table, spec, bufs) * mask):
        xr = x.clone().requires_grad_(True)
        y = fn(xr)
        gx, gt = torch.autograd.grad(y, (xr, grid.table), gout, create_graph=True)
        eik = torch.autograd.grad(((gx.norm(dim=-1) - 1.0) ** 2).mean(), (xr, grid.table))
        results.append((y.detach(), gx.detach(), gt.detach(), *eik))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(want.abs().max().item(), 1.0))
    off = int(spec.offsets()[3])
    assert results[0][2][off:].abs().max() == 0 and results[0][2][:off].abs().max() > 0
    assert results[0][0][:, 3 * spec.features:].abs().max() == 0

def test_hashgrid_module_backend_and_bf16_output():
    grid = make_grid(8)
    x = points(100)
    want = grid(x)
    grid.set_backend("triton")
    torch.testing.assert_close(grid(x), want, rtol=1e-5, atol=1e-6)
    low = ht.encode_triton(x, grid.table, grid.spec, None, out_dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), want, rtol=1e-2, atol=1e-2)
    assert ht.encode_triton(x[:0], grid.table, grid.spec).shape == (0, grid.spec.out_dim)


def test_odd_features_and_level_major_order(monkeypatch):
    monkeypatch.setattr(ht, "LEVEL_FAST", False)  # the other program order
    grid = make_grid(3)
    x = points(70)
    grads = []
    for fn in (ht.encode_triton, encode_torch):
        y = fn(x, grid.table, grid.spec, grid._buffers_dict())
        grads.append((y, *torch.autograd.grad((y * y).sum(), grid.table)))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)


def test_int64_offsets_path(monkeypatch):
    monkeypatch.setattr(ht, "INT32_LIMIT", 0)  # force the int64 branch of every kernel
    grid = make_grid(2)
    x = points(60).requires_grad_(True)
    y = ht.encode_triton(x, grid.table, grid.spec)
    torch.testing.assert_close(y, encode_torch(x, grid.table, grid.spec, grid._buffers_dict()), rtol=1e-5, atol=1e-6)
    gt, = torch.autograd.grad(y.sum(), grid.table)
    assert abs(gt.sum().item() - 60 * grid.spec.features * grid.spec.levels) < 1e-3  # weights sum to 1


def test_errors_are_clear(monkeypatch):
    grid = make_grid(2)
    monkeypatch.setattr(ht, "interpreting", lambda: False)
    with pytest.raises(StageError, match="CUDA tensors"):
        ht.encode_triton(torch.rand(4, 3), grid.table.cpu(), grid.spec)
    monkeypatch.setitem(__import__("sys").modules, "stages.train.hashgrid_triton", None)
    with pytest.raises(StageError, match="needs the triton package"):
        HashGrid(grid.spec, backend="triton")


def test_traces_under_torch_compile():
    """The ops are opaque custom ops: dynamo traces HashGrid(backend="triton") in one graph."""
    grid = make_grid(2)
    grid.set_backend("triton")
    x = points(50).requires_grad_(True)
    compiled = torch.compile(lambda p: (grid(p) ** 2).sum(), backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x), (x, grid.table))
    grid.set_backend("torch")
    want = torch.autograd.grad((grid(x) ** 2).sum(), (x, grid.table))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
