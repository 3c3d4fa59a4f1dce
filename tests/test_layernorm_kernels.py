"""The residual add + LayerNorm kernels (megaq.kernels.layernorm / triton_layernorm) and the op built on
them (megaq.ops.add_layernorm) against an FP64 reference of the same math.

Reference: s = x + r in the activations' dtype (the eager add), then FP64 `F.layer_norm(s)` and its
autograd gradients, with the residual stream's incoming gradient added to ∇s.

Bounds (random rows of N(1, 3) with a per-row offset, widths 100 / 384 / 1600 / 2048 and, on the GPU,
up to 8192; rows not a multiple of the backward's rows per program):
  * s: bit for bit on the GPU; within one unit in the last place under the interpreter (it truncates
    FP32 -> BF16 where the GPU rounds);
  * y, ∇s: |got - ref| <= u |ref| + 1e-5 max|ref|, u = 1e-6 for FP32, 2^-7 for BF16 (one unit in the
    last place, rounding or truncating);
  * ∇w, ∇b (sums over all rows, FP32 partials per program): the same, with 1e-4 max|ref| for the
    summation order;
  * NaN in a row: that row's y and ∇s are NaN and ∇w is NaN (as torch gives); ∇b (a sum of ∇y) and the
    other rows as above.
Runs: the `test_interp_*` tests in an interpreter child (TRITON_INTERPRET=1, MEGAQ_KERNELS=triton),
the `gpu` tests on CUDA (`-m gpu`).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from interpreter_utils import run_interpreter_child
from megaq.kernels import dispatch
from megaq.kernels import layernorm as ln_kernels
from megaq.ops import add_layernorm, layer_norm

IN_CHILD = os.environ.get("MEGAQ_LN_INTERP_CHILD") == "1"
interp_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter subprocess")
gpu = pytest.mark.gpu

ULP = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -7}


def _inputs(rows, n, dtype, device, residual=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * 3 + 1 + torch.randn(rows, 1, generator=g) * 5).to(dtype)
    r = torch.randn(rows, n, generator=g).to(dtype) if residual else None
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(dtype) if bias else None
    dy = torch.randn(rows, n, generator=g).to(dtype)
    ds_in = torch.randn(rows, n, generator=g).to(dtype) if residual else None
    move = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return tuple(move(t) for t in (x, r, w, b, dy, ds_in))


def _reference(x, r, w, b, dy, ds_in, eps):
    s = x + r if r is not None else x
    s64 = s.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True) if b is not None else None
    y = F.layer_norm(s64, (s.shape[-1],), w64, b64, eps)
    y.backward(dy.double())
    ds = s64.grad + (ds_in.double() if ds_in is not None else 0.0)
    return s, y.detach(), ds, w64.grad, b64.grad if b is not None else None


def _assert_close(got, ref, dtype, what, spread=1e-5):
    got, ref = got.double(), ref.double()
    bound = ULP[dtype] * ref.abs() + spread * ref.abs().max()
    diff = (got - ref).abs()
    ok = diff <= bound
    assert bool(ok.all()), f"{what}: {int((~ok).sum())} of {ok.numel()} outside the bound; worst " \
                           f"{float((diff - bound).nan_to_num(float('inf')).max()):.3g} over it"


def check_kernels(rows, n, dtype, device, residual=True, bias=True, exact_s=True):
    x, r, w, b, dy, ds_in = _inputs(rows, n, dtype, device, residual, bias)
    eps = 1e-5
    s, y, mean, rstd = ln_kernels.add_layernorm_forward(x, r, w, b, eps)
    ds, dw, db = ln_kernels.add_layernorm_backward(dy, s, w, mean, rstd, ds_in, bias)
    ref_s = _reference(x, r, w, b, dy, ds_in, eps)[0]
    if exact_s:
        assert torch.equal(s, ref_s)
    else:   # the interpreter truncated s: the rest is checked against the LayerNorm of the s it wrote
        _assert_close(s, ref_s, dtype, "s", spread=0.0)
    _, ref_y, ref_ds, ref_dw, ref_db = _reference(s, None, w, b, dy, ds_in, eps)
    _assert_close(y, ref_y, dtype, "y")
    _assert_close(ds, ref_ds, dtype, "ds")
    _assert_close(dw, ref_dw, dtype, "dw", spread=1e-4)
    assert dw.dtype == w.dtype
    if bias:
        _assert_close(db, ref_db, dtype, "db", spread=1e-4)
    else:
        assert db is None


def check_nan_row(device, dtype):
    x, r, w, b, dy, ds_in = _inputs(9, 384, dtype, device)
    x[4, 17] = float("nan")
    s, y, mean, rstd = ln_kernels.add_layernorm_forward(x, r, w, b, 1e-5)
    ds, dw, db = ln_kernels.add_layernorm_backward(dy, s, w, mean, rstd, ds_in, True)
    assert bool(y[4].isnan().all()) and bool(ds[4].isnan().all())
    assert bool(dw.isnan().all())                        # ∇w sums ∇y·ŝ over the rows: NaN everywhere
    _assert_close(db, dy.double().sum(0), dtype, "db (∇y only: finite)", spread=1e-4)
    keep = [i for i in range(9) if i != 4]
    ref_s, ref_y, ref_ds, _, _ = _reference(x[keep], r[keep], w, b, dy[keep], ds_in[keep], 1e-5)
    _assert_close(y[keep], ref_y, dtype, "y of the finite rows")
    _assert_close(ds[keep], ref_ds, dtype, "ds of the finite rows")


def check_op_matches_torch_composition(monkeypatch, dtype, device):
    """add_layernorm / layer_norm through the kernels against the same ops on their torch path, shapes
    [T, B, C] as the block has them, gradients through autograd (x and the residual get the same ∇s)."""
    x, r, w, b, dy, ds_in = _inputs(5 * 3, 1600, dtype, device)
    shape = (5, 3, 1600)
    results = []
    for use_kernels in (True, False):
        monkeypatch.setattr(ln_kernels, "kernels_supported", lambda t, k=use_kernels: k)
        leaves = [t.detach().clone().requires_grad_(True) for t in (x.view(shape), r.view(shape), w, b)]
        s, y = add_layernorm(*leaves, 1e-5)
        z = layer_norm(s, leaves[2], leaves[3], 1e-5)       # the no-residual form, on s
        c, u = add_layernorm(s, None, leaves[2], leaves[3], 1e-5)   # carrying s on: its gradient fused
        loss = (y * dy.view(shape)).sum() + (s * ds_in.view(shape)).sum() + z.square().sum()
        (loss + (c * y).sum() + u.sum()).backward()
        results.append([s, y, z, c, u] + [t.grad for t in leaves])
    names = ["s", "y", "layer_norm(s)", "carried s", "layer_norm(s) 2", "dx", "dresidual", "dw", "db"]
    for name, got, ref in zip(names, *results):
        assert got.shape == ref.shape, name
        _assert_close(got, ref, dtype, name, spread=1e-2 if dtype == torch.bfloat16 else 1e-4)
    assert torch.equal(results[0][5], results[0][6])     # s = x + r: one gradient for both
    assert torch.equal(results[0][3], results[0][0])     # the carried s is s


# --------------------------------------------------------------------------------------------------
# CPU: the interpreter subprocess, the path choice, argument checks
def test_kernels_under_interpreter():
    if IN_CHILD:
        pytest.skip("already the interpreter child")
    run_interpreter_child(__file__, "MEGAQ_LN_INTERP_CHILD", timeout=600)


@pytest.mark.skipif(IN_CHILD, reason="parent-process test")
def test_path_choice_and_bad_input(monkeypatch):
    monkeypatch.setenv("MEGAQ_KERNELS", "auto")
    x = torch.zeros(4, 8)
    assert not ln_kernels.kernels_supported(x)           # CPU: the torch composition
    s, y = add_layernorm(x, x + 1, torch.ones(8), None, 1e-5)
    assert torch.equal(s, x + 1) and torch.equal(y, torch.zeros(4, 8))
    monkeypatch.setattr(dispatch, "_use_triton", lambda *t: True)
    assert ln_kernels.kernels_supported(x) and ln_kernels.kernels_supported(x.bfloat16())
    from megaq.ops import layernorm as ln_ops
    assert ln_ops._use_kernels(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):      # autocast's LayerNorm is FP32: its own path
        assert not ln_ops._use_kernels(x)
    assert not ln_kernels.kernels_supported(torch.zeros(2, ln_kernels.MAX_WIDTH + 1))
    assert not ln_kernels.kernels_supported(x.double())
    with pytest.raises(ValueError, match="x and residual must match"):
        add_layernorm(x, torch.zeros(4, 9), torch.ones(8), None, 1e-5)
    with pytest.raises(ValueError, match=r"residual must be a contiguous \(4, 8\) tensor of torch.float32"):
        ln_kernels.add_layernorm_forward(x, torch.zeros(8, 4).t(), torch.ones(8), None, 1e-5)
    with pytest.raises(ValueError, match=r"weight must be a contiguous \(8,\)"):
        ln_kernels.add_layernorm_forward(x, None, torch.ones(7), None, 1e-5)
    with pytest.raises(ValueError, match="2-D float tensor"):
        ln_kernels.add_layernorm_forward(x.view(2, 2, 8), None, torch.ones(8), None, 1e-5)
    with pytest.raises(ValueError, match=r"rstd must be a contiguous \(4,\) tensor of torch.float32"):
        ln_kernels.add_layernorm_backward(x, x, torch.ones(8), torch.zeros(4), torch.zeros(4).double(), None, False)


# --------------------------------------------------------------------------------------------------
# interpreter (run by the subprocess above)
@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,n,residual,bias", [(37, 100, True, True), (9, 384, False, True),
                                                  (7, 1600, True, False), (3, 2048, False, False)])
def test_interp_kernels(rows, n, residual, bias, dtype):
    with dispatch.config_override(LN_BWD_PER_SM=3):      # 6 programs: several rows each, a short last one
        check_kernels(rows, n, dtype, "cpu", residual, bias, exact_s=dtype == torch.float32)


@interp_only
def test_interp_nan_row():
    check_nan_row("cpu", torch.float32)


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_interp_op_matches_its_torch_path(monkeypatch, dtype):
    check_op_matches_torch_composition(monkeypatch, dtype, "cpu")


@interp_only
def test_interp_block_through_the_kernels_matches_the_torch_path(monkeypatch):
    """A BF16-recipe transformer block (FP32 here) with the fused LayerNorms gives the output and
    gradients of the same block on the torch composition."""
    from megaq.models.gpt import GPTConfig
    from megaq.models.transformer import TransformerBlock

    torch.manual_seed(0)
    blk = TransformerBlock(GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=4, n_embd=64))
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(16, 2, 64)
    runs = []
    for use_kernels in (True, False):
        monkeypatch.setattr(ln_kernels, "kernels_supported", lambda t, k=use_kernels: k)
        blk.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = blk(xi)
        y.square().sum().backward()
        runs.append([y.detach(), xi.grad] + [p.grad.clone() for p in blk.parameters()])
    for got, ref in zip(*runs):
        _assert_close(got, ref, torch.float32, "block", spread=1e-4)


# --------------------------------------------------------------------------------------------------
# GPU
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,n,residual,bias", [(16384, 2048, True, True), (4099, 1600, True, True),
                                                  (1000, 384, False, True), (777, 8192, True, False),
                                                  (513, 2560, False, False)])
def test_gpu_kernels(rows, n, residual, bias, dtype):
    check_kernels(rows, n, dtype, "cuda", residual, bias)


@gpu
def test_gpu_nan_row():
    check_nan_row("cuda", torch.bfloat16)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_op_matches_its_torch_path(monkeypatch, dtype):
    check_op_matches_torch_composition(monkeypatch, dtype, "cuda")
