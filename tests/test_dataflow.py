"""INT8 data flow (megaq.ops.dataflow): LayerNorm and GELU that write INT8 and save only INT8 for backward,
against fp64 torch, on the CPU reference path."""

import math

import pytest
import torch
import torch.nn.functional as F

from megaq.ops import Int8Activation, int8_gelu, int8_layernorm
from megaq.ops.dataflow import gelu_tanh, gelu_tanh_grad, layernorm_backward
from megaq.quant import NonFiniteError, quantize_blockwise


def _rel(a, ref):
    return float((a.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm())


def _act(rows, cols, dtype, seed, outliers=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * 2 + 0.5
    if outliers:
        x[:, ::97] *= 10                                   # outlier channels, as tests/test_ops_linear.py
    g = torch.randn(rows, cols, generator=gen)
    return x.to(dtype), g.to(dtype), gen


def _ln_params(cols, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return 1 + 0.1 * torch.randn(cols, generator=gen), 0.1 * torch.randn(cols, generator=gen)


def _run_ln(x, w, b, g, block=(1, 128), quantize_grad_input=False, seed=7):
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    out = int8_layernorm(xs, ws, bs, 1e-5, block=block, quantize_grad_input=quantize_grad_input,
                         generator=torch.Generator().manual_seed(seed))
    out.value.backward(g)
    return out, xs.grad, ws.grad, bs.grad


def _ref_ln(x, w, b, g):
    xd, wd, bd = (t.double().requires_grad_(True) for t in (x, w, b))
    yd = F.layer_norm(xd, (x.shape[-1],), wd, bd, 1e-5)
    yd.backward(g.double())
    return yd.detach(), xd.grad, wd.grad, bd.grad


SHAPES = [(300, 384), (77, 1600)]        # hidden 1600 = 12.5 blocks of 128; rows not multiples of 128
DTYPES = [torch.float32, torch.bfloat16]

# Measured relative Frobenius errors against fp64 (Gaussian 2·N(0,1)+0.5, ×10 outlier channel every 97,
# the shapes above, 1×128 blocks, fp32 and bf16 alike), max over the four cases; bounds ≈ 1.5× of them.
#   LayerNorm: output 0.0174, ∇x 0.0094, ∇w 0.0208, ∇b 0.0094      GELU: output 0.0238, ∇x 0.0263
LN_BOUNDS = {"y": 0.026, "dx": 0.014, "dw": 0.031, "db": 0.014}
GELU_BOUNDS = {"y": 0.036, "dx": 0.040}


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_forward_and_gradients_against_fp64(rows, cols, dtype):
    x, g, _ = _act(rows, cols, dtype, seed=rows + cols)
    w, b = _ln_params(cols)
    out, gx, gw, gb = _run_ln(x, w, b, g)
    yd, gxd, gwd, gbd = _ref_ln(x, w, b, g)
    assert isinstance(out, Int8Activation)
    assert out.value.dtype == dtype and out.value.shape == x.shape
    assert out.q.data.dtype == torch.int8 and out.q.shape == (rows, cols)
    assert out.q.scale.shape == (rows, math.ceil(cols / 128))
    # value is the payload dequantized (exactly in fp32, up to bf16 rounding in bf16)
    torch.testing.assert_close(out.value.float(), out.q.dequantize().to(dtype).float(), rtol=0, atol=0)
    errs = {"y": _rel(out.q.dequantize(), yd), "dx": _rel(gx, gxd), "dw": _rel(gw, gwd),
            "db": _rel(gb, gbd)}
    for key, bound in LN_BOUNDS.items():
        assert errs[key] < bound, (key, errs)
    assert gx.dtype == dtype and gw.dtype == w.dtype


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_forward_and_gradient_against_fp64(rows, cols, dtype):
    x, g, _ = _act(rows, cols, dtype, seed=3 * rows + cols)
    xs = x.clone().requires_grad_(True)
    out = int8_gelu(xs, generator=torch.Generator().manual_seed(5))
    out.value.backward(g)
    xd = x.double().requires_grad_(True)
    yd = F.gelu(xd, approximate="tanh")
    yd.backward(g.double())
    assert out.q.data.dtype == torch.int8 and out.value.shape == x.shape
    errs = {"y": _rel(out.q.dequantize(), yd), "dx": _rel(xs.grad, xd.grad)}
    for key, bound in GELU_BOUNDS.items():
        assert errs[key] < bound, (key, errs)


def test_gelu_formulas_match_torch():
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64, requires_grad=True)
    y = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(gelu_tanh(x.detach()), y.detach(), rtol=1e-12, atol=1e-12)
    y.sum().backward()
    torch.testing.assert_close(gelu_tanh_grad(x.detach()), x.grad, rtol=1e-12, atol=1e-12)


def test_layernorm_output_feeds_gelu_without_requantizing():
    """A consumer reads the Int8Activation's payload as is; gradients reach the LayerNorm's input."""
    x, _, _ = _act(50, 384, torch.bfloat16, seed=11)
    w, b = _ln_params(384)
    xs = x.clone().requires_grad_(True)
    ln = int8_layernorm(xs.view(5, 10, 384), w, b)        # [T, B, C] in, any leading dims
    out = int8_gelu(ln)
    # the GELU saw exactly the LN's INT8 values: its output equals GELU of the dequantized payload,
    # requantized (a plain-tensor input would have been requantized from the bf16 value instead)
    expect = quantize_blockwise(gelu_tanh(ln.q.dequantize()), (1, 128))
    assert torch.equal(out.q.data, expect.data) and torch.equal(out.q.scale, expect.scale)
    out.value.float().square().sum().backward()
    assert xs.grad is not None and xs.grad.shape == x.shape and torch.isfinite(xs.grad).all()


@pytest.mark.parametrize("block", [(1, 128), (32, 32), (1, -1)])
def test_other_blocks_and_no_affine(block):
    x, g, _ = _act(77, 384, torch.float32, seed=2)
    xs = x.clone().requires_grad_(True)
    out = int8_layernorm(xs, None, None, block=block)
    out.value.backward(g)
    xd = x.double().requires_grad_(True)
    F.layer_norm(xd, (384,)).backward(g.double())
    assert _rel(xs.grad, xd.grad) < LN_BOUNDS["dx"] * 1.5
    assert _rel(out.q.dequantize(), F.layer_norm(x.double(), (384,))) < LN_BOUNDS["y"]
    og = int8_gelu(x, block=block)
    assert _rel(og.q.dequantize(), F.gelu(x.double(), approximate="tanh")) < GELU_BOUNDS["y"]


def test_quantized_input_gradient_option():
    x, g, _ = _act(300, 384, torch.float32, seed=4)
    w, b = _ln_params(384)
    _, gx, _, _ = _run_ln(x, w, b, g, quantize_grad_input=True)
    _, gxd, _, _ = _ref_ln(x, w, b, g)
    assert _rel(gx, gxd) < 0.020                  # measured 0.0131 (one more SR pass)
    xs = x.clone().requires_grad_(True)
    int8_gelu(xs, quantize_grad_input=True).value.backward(g)
    xd = x.double().requires_grad_(True)
    F.gelu(xd, approximate="tanh").backward(g.double())
    assert _rel(xs.grad, xd.grad) < 0.043        # measured 0.0284


def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return saved, result


@pytest.mark.parametrize("dtype", DTYPES)
def test_only_int8_activations_are_saved(dtype):
    rows, cols = 77, 1600
    x, _, _ = _act(rows, cols, dtype, seed=9)
    w, b = _ln_params(cols)
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    saved, ln = _saved_tensors(lambda: int8_layernorm(xs, ws, bs))
    big = [t for t in saved if t.numel() >= rows * cols]
    assert big and all(t.dtype == torch.int8 for t in big), [(t.dtype, t.shape) for t in saved]
    # besides the payload: scales [rows, 13], mean/rstd [rows], the weight [cols]
    assert sum(t.numel() * t.element_size() for t in saved if t.is_floating_point()) < \
        0.1 * x.numel() * x.element_size()

    saved, _ = _saved_tensors(lambda: int8_gelu(ln))
    big = [t for t in saved if t.numel() >= rows * cols]
    assert big and all(t.dtype == torch.int8 for t in big), [(t.dtype, t.shape) for t in saved]
    assert all(t.numel() < rows * cols for t in saved if t.is_floating_point())


def test_nonfinite_inputs_raise():
    x, g, _ = _act(77, 384, torch.float32, seed=1)
    w, b = _ln_params(384)
    bad = x.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="int8_layernorm input"):
        int8_layernorm(bad, w, b)
    with pytest.raises(NonFiniteError, match="int8_gelu input"):
        int8_gelu(bad)
    bad[3, 5] = float("inf")
    with pytest.raises(NonFiniteError):
        int8_layernorm(bad.requires_grad_(True), w, b)
    # a NaN in the incoming gradient is caught in backward
    g_bad = g.clone()
    g_bad[0, 0] = float("nan")
    xs = x.clone().requires_grad_(True)
    with pytest.raises(NonFiniteError, match="output gradient of int8_layernorm"):
        int8_layernorm(xs, w, b).value.backward(g_bad)
    with pytest.raises(NonFiniteError, match="output gradient of int8_gelu"):
        int8_gelu(xs).value.backward(g_bad)


# Unbiasedness of the SR backward: the exact expectation (the same saved INT8 input, the unquantized
# incoming gradient) is computed in fp64; the mean of N independent draws has error ≈ single/√N
# (0.071× for N = 200); we assert < 0.12× (measured 0.070× for both ops, single-draw error 0.0093),
# far from what a biased rounding gives (a bias of the order of the SR noise keeps the ratio near 1).
N_DRAWS = 200
MEAN_RATIO_BOUND = 0.12


def _draws(value, leaf, g, n=N_DRAWS):
    total, first = torch.zeros(leaf.shape, dtype=torch.float64), None
    for _ in range(n):
        leaf.grad = None
        value.backward(g, retain_graph=True)
        total += leaf.grad.double()
        first = leaf.grad.double().clone() if first is None else first
    return total / n, first


def test_layernorm_backward_stochastic_rounding_is_unbiased():
    x, g, _ = _act(64, 384, torch.float32, seed=21)
    w, b = _ln_params(384)
    xs = x.clone().requires_grad_(True)
    out = int8_layernorm(xs, w, b, generator=torch.Generator().manual_seed(0))
    mean_grad, single = _draws(out.value, xs, g)
    x_hat = quantize_blockwise(x, (1, 128)).dequantize().double()
    var, mu = torch.var_mean(x.float(), dim=1, unbiased=False)
    rstd = torch.rsqrt(var + 1e-5)
    exact, _, _ = layernorm_backward(x_hat, mu.double(), rstd.double(), w.double(), g.double())
    e_single, e_mean = _rel(single, exact), _rel(mean_grad, exact)
    assert e_single > 1e-3                    # the single draw is noisy (the SR is active)
    assert e_mean < MEAN_RATIO_BOUND * e_single, (e_mean, e_single)


def test_gelu_backward_stochastic_rounding_is_unbiased():
    x, g, _ = _act(64, 384, torch.float32, seed=22)
    xs = x.clone().requires_grad_(True)
    out = int8_gelu(xs, generator=torch.Generator().manual_seed(0))
    mean_grad, single = _draws(out.value, xs, g)
    x_hat = quantize_blockwise(x, (1, 128)).dequantize().double()
    exact = gelu_tanh_grad(x_hat) * g.double()
    e_single, e_mean = _rel(single, exact), _rel(mean_grad, exact)
    assert e_single > 1e-3
    assert e_mean < MEAN_RATIO_BOUND * e_single, (e_mean, e_single)


# --------------------------------------------------------------------------------------------------
# The model's data flow: producers writing GEMM operands, and the linear that consumes them
from megaq.ops import (Int8Operand, data_flow_format, dataflow_linear, gelu_operand,  # noqa: E402
                       layernorm_operand, quantized_linear)


def _linear_case(rows=77, cols=384, out=640, dtype=torch.float32):
    gen = torch.Generator().manual_seed(rows + out)
    x = torch.randn(rows, cols, generator=gen) * 2
    x[:, ::97] *= 10
    w = torch.randn(out, cols, generator=gen) / math.sqrt(cols)
    b = 0.1 * torch.randn(out, generator=gen)
    g = torch.randn(rows, out, generator=gen)
    return x.to(dtype), w.to(dtype), b.to(dtype), g.to(dtype)


@pytest.mark.parametrize("recipe", ["int8", "int8_block128"])
def test_dataflow_linear_on_a_bf16_input_is_the_quantized_linear(recipe):
    """Same forward and dgrad as megaq.ops.linear (same quantizers, same random draws); wgrad from the
    saved INT8 operand instead of the BF16 input: within the recipe's own error of the exact one."""
    x, w, b, g = _linear_case()
    grads = []
    for fn in (quantized_linear, dataflow_linear):
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        torch.manual_seed(3)
        y = fn(xs, ws, bs, recipe)
        y.backward(g)
        grads.append((y.detach(), xs.grad, ws.grad, bs.grad))
    (y0, gx0, gw0, gb0), (y1, gx1, gw1, gb1) = grads
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1) and torch.equal(gb0, gb1)
    exact = g.double().t() @ x.double()
    # measured against fp64, BF16-input linear / data flow: int8 0.012 / 0.013; int8_block128 0.011 /
    # 0.021 — there the saved (1, 128) X tiles carry the ×10 outlier channels' scale (the rotated
    # per-token operand of the default recipe spreads them), then the wgrad requantizes along tokens
    bound = {"int8": 0.02, "int8_block128": 0.03}[recipe]
    assert _rel(gw1, exact) < bound and _rel(gw0, exact) < 0.018, (_rel(gw1, exact), _rel(gw0, exact))


@pytest.mark.parametrize("recipe", ["int8", "int8_block128"])
def test_layernorm_fc1_gelu_fc2_chain_against_fp64(recipe):
    rows, cols = 77, 384
    x, g, _ = _act(rows, cols, torch.float32, seed=11)
    lw, lb = _ln_params(cols)
    gen = torch.Generator().manual_seed(4)
    w1 = torch.randn(4 * cols, cols, generator=gen) / math.sqrt(cols)
    b1 = 0.1 * torch.randn(4 * cols, generator=gen)
    w2 = torch.randn(cols, 4 * cols, generator=gen) / math.sqrt(4 * cols)
    hadamard, block = data_flow_format(recipe)

    def chain(ln_fn):
        ts = [t.clone().requires_grad_(True) for t in (x, lw, lb, w1, b1, w2)]
        out = ln_fn(*ts)
        out.backward(g)
        return [out.detach()] + [t.grad for t in ts]

    def int8_chain(xs, lws, lbs, w1s, b1s, w2s):
        h = layernorm_operand(xs, lws, lbs, 1e-5, hadamard, block)
        assert isinstance(h, Int8Operand) and h.hadamard == hadamard
        u = dataflow_linear(h, w1s, b1s, recipe, int8_output=True)
        assert u.q.block == (1, 128) and u.q.data.dtype == torch.int8
        return dataflow_linear(gelu_operand(u, hadamard, block), w2s, None, recipe)

    def ref_chain(xs, lws, lbs, w1s, b1s, w2s):
        xd = [t.double() for t in (xs, lws, lbs, w1s, b1s, w2s)]
        h = F.layer_norm(xd[0], (cols,), xd[1], xd[2], 1e-5)
        return F.linear(F.gelu(F.linear(h, xd[3], xd[4]), approximate="tanh"), xd[5])

    torch.manual_seed(0)
    got, want = chain(int8_chain), chain(ref_chain)
    errs = [_rel(a, b) for a, b in zip(got, want)]
    # measured (int8 / int8_block128): output 0.021/0.019, ∇x 0.021/0.023, ∇γ ≤ 0.023, ∇β ≤ 0.022,
    # ∇W1 ≤ 0.026, ∇b1 ≤ 0.022, ∇W2 ≤ 0.025
    assert max(errs) < 0.04, errs


def test_int8_operand_is_loud_when_misused():
    x, _, _ = _act(33, 256, torch.float32, seed=2)
    w, b = _ln_params(256)
    h = layernorm_operand(x, w, b, 1e-5, 128, (1, -1))
    assert h.carrier.shape == x.shape and h.carrier.stride() == (0, 0)
    assert bool(torch.isnan(h.carrier).all())             # no data: a value consumer sees NaN
    assert _rel(h.dequantize(), F.layer_norm(x.double(), (256,), w.double(), b.double(), 1e-5)) < 0.02
    with pytest.raises(ValueError, match="unrotated INT8"):
        gelu_operand(h, 128, (1, -1))                     # GELU reads fc1's unrotated blocks
    with pytest.raises(ValueError, match="not recipe 'int8_block128'"):
        dataflow_linear(h, torch.randn(64, 256), None, "int8_block128")
    with pytest.raises(ValueError, match="INT8 forward"):
        dataflow_linear(x, torch.randn(64, 256), None, "int4")


def test_fused_residual_layernorm_sends_the_gradient_to_both_inputs():
    x, g, _ = _act(40, 384, torch.float32, seed=5)
    r = torch.randn(40, 384, generator=torch.Generator().manual_seed(6))
    w, b = _ln_params(384)
    xs, rs = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    x_sum, h = layernorm_operand(xs, w, b, 1e-5, 128, (1, -1), residual=rs)
    assert torch.equal(x_sum, x + r)
    gs = torch.randn(40, 384, generator=torch.Generator().manual_seed(7))
    torch.autograd.backward([x_sum, h.carrier], [gs, g])
    xd = (x + r).double().requires_grad_(True)
    F.layer_norm(xd, (384,), w.double(), b.double(), 1e-5).backward(g.double())
    assert torch.equal(xs.grad, rs.grad)
    assert _rel(xs.grad, xd.grad + gs.double()) < 0.01    # measured 0.004 (INT8 saved input)


def test_carried_stream_gradient_is_summed_in_the_layernorm_backward():
    """`carry`: x comes back as the stream (the same tensor), and its later gradient is added to the
    LayerNorm's ∇x inside the backward: exactly what autograd's sum of x's two uses gives."""
    x, g, _ = _act(40, 384, torch.float32, seed=8)
    w, b = _ln_params(384)
    gs = torch.randn(40, 384, generator=torch.Generator().manual_seed(9))
    xs = x.clone().requires_grad_(True)
    stream, h = layernorm_operand(xs, w, b, 1e-5, 128, (1, -1), carry=True)
    assert torch.equal(stream, x) and isinstance(h.carrier, torch.Tensor)
    torch.autograd.backward([stream, h.carrier], [gs, g])
    xu = x.clone().requires_grad_(True)
    hu = layernorm_operand(xu, w, b, 1e-5, 128, (1, -1))
    torch.autograd.backward([xu * 1, hu.carrier], [gs, g])   # two uses of x: autograd adds
    assert torch.allclose(xs.grad, xu.grad, rtol=0, atol=1e-6)
    assert not torch.equal(xs.grad, gs)                       # the LayerNorm's part is in it


# --------------------------------------------------------------------------------------------------
# The LayerNorm backward reading the consuming linear's INT8 gradient (INT8_LAYERNORM_GRAD)
import megaq.ops.dataflow as dataflow_ops  # noqa: E402
from conftest import record_layernorm_backward_grads  # noqa: E402
from megaq.quant import QuantizedTensor  # noqa: E402


@pytest.fixture
def int8_ln_grad(monkeypatch):
    """The switch on (it is off by default: measured slower, see megaq/ops/dataflow.py)."""
    monkeypatch.setattr(dataflow_ops, "INT8_LAYERNORM_GRAD", True)


@pytest.fixture
def ln_grads(monkeypatch, int8_ln_grad):
    """The incoming gradients the data-flow LayerNorm backward is given (tensor or INT8), switch on."""
    return record_layernorm_backward_grads(monkeypatch)


def _ln_linear_case(rows=77, cols=384, out=640, seed=31):
    x, _, _ = _act(rows, cols, torch.float32, seed=seed)
    lw, lb = _ln_params(cols)
    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(out, cols, generator=gen) / math.sqrt(cols)
    g = torch.randn(rows, out, generator=gen)
    return x, lw, lb, w, g


def _exact_ln_linear_grad(x, lw, lb, ws, gs):
    """fp64 ∇x of Σ_i <F.linear(LN(x), w_i), g_i>."""
    xd = x.double().requires_grad_(True)
    h = F.layer_norm(xd, (x.shape[-1],), lw.double(), lb.double(), 1e-5)
    sum((F.linear(h, w.double()) * g.double()).sum() for w, g in zip(ws, gs)).backward()
    return xd.grad


@pytest.mark.parametrize("recipe", ["int8", "int8_block128"])
def test_layernorm_backward_reads_the_linears_int8_gradient(recipe, ln_grads):
    x, lw, lb, w, g = _ln_linear_case()
    hadamard, block = data_flow_format(recipe)
    xs = x.clone().requires_grad_(True)
    h = layernorm_operand(xs, lw, lb, 1e-5, hadamard, block)
    assert h.grad_slot is not None
    carried = []
    h.carrier.register_hook(carried.append)        # what autograd hands on
    dataflow_linear(h, w, None, recipe).backward(g)
    (grad_q,) = ln_grads
    assert isinstance(grad_q, QuantizedTensor) and grad_q.block == (1, 128) and grad_q.bits == 8
    assert grad_q.shape == (77, 384) and grad_q.scale.shape == (77, 3)
    # autograd carried a zero placeholder of no memory: the values went through the slot
    assert carried[0].shape == (77, 384) and carried[0].stride() == (0, 0) and not carried[0].any()
    # emptied by the LayerNorm's backward: a later take returns what it is given
    assert h.grad_slot.take(carried[0]) is not grad_q and not h.grad_slot.take(carried[0]).any()
    # measured against fp64 over 5 seeds (int8 / int8_block128): 0.0158-0.0160 / 0.0156-0.0158; the
    # BF16-gradient path 0.013 (the saved INT8 input's error; the INT8 gradient adds its SR noise)
    err = _rel(xs.grad, _exact_ln_linear_grad(x, lw, lb, [w], [g]))
    assert err < 0.024, err


def test_int8_layernorm_gradient_switch_off(monkeypatch, ln_grads):
    monkeypatch.setattr(dataflow_ops, "INT8_LAYERNORM_GRAD", False)
    x, lw, lb, w, g = _ln_linear_case()
    xs = x.clone().requires_grad_(True)
    h = layernorm_operand(xs, lw, lb, 1e-5, 128, (1, -1))
    assert h.grad_slot is None
    dataflow_linear(h, w, None, "int8").backward(g)
    assert len(ln_grads) == 1 and isinstance(ln_grads[0], torch.Tensor)
    err = _rel(xs.grad, _exact_ln_linear_grad(x, lw, lb, [w], [g]))
    assert err < 0.02, err                         # measured 0.013 over 5 seeds


def test_layernorm_int8_gradient_is_unbiased_through_the_dgrad(int8_ln_grad):
    """E[∇x] over the dgrad's SR draws (∇Y's quantizer and the INT8 ∇X epilogue) is the LayerNorm
    backward (from its saved INT8 input) of ∇Y · Ŵ, Ŵ the dgrad's nearest-rounded weight operand."""
    from megaq.ops.linear import weight_operand
    from megaq.ops.recipe import get_recipe
    from megaq.quant import block_hadamard, pad_to_multiple
    rows, cols = 64, 384
    x, lw, lb, w, g = _ln_linear_case(rows=rows, cols=cols)
    recipe = get_recipe("int8")
    xs = x.clone().requires_grad_(True)
    h = layernorm_operand(xs, lw, lb, 1e-5, 128, (1, -1))
    y = dataflow_linear(h, w, None, recipe)
    mean_grad, single = _draws(y, xs, g, n=100)
    w_hat = weight_operand(w, recipe.dgrad, False, transpose=True).dequantize(torch.float64)
    grad_h = block_hadamard(pad_to_multiple(g.double(), 128), 128) @ w_hat.t()
    var, mu = torch.var_mean(x.double(), dim=1, unbiased=False)
    x_hat = quantize_blockwise(x, (1, 128)).dequantize().double()
    exact, _, _ = layernorm_backward(x_hat, mu, torch.rsqrt(var + 1e-5), lw.double(), grad_h)
    e_single, e_mean = _rel(single, exact), _rel(mean_grad, exact)
    # measured: one draw 0.014, the mean of 100 draws 0.0014 (ratio 0.10 = 1/sqrt(100))
    assert e_single > 1e-3 and e_mean < 0.15 * e_single, (e_mean, e_single)


def test_int8_gradient_is_not_used_for_a_summed_operand_gradient(ln_grads):
    """Two consumers of one LayerNorm operand (each puts its INT8 ∇X in the slot and hands autograd a
    zero placeholder), and a consumer outside the data flow: the LayerNorm must read the full dense
    sum — what autograd delivers plus every INT8 part — not one INT8 part (error ~0.7) nor the
    delivered sum alone (which lacks the INT8 parts: error ~1)."""
    x, lw, lb, w, g = _ln_linear_case()
    w2, g2 = torch.flip(w, (0,)), torch.roll(g, 1, 0)
    xs = x.clone().requires_grad_(True)
    h = layernorm_operand(xs, lw, lb, 1e-5, 128, (1, -1))
    (dataflow_linear(h, w, None, "int8") * g + dataflow_linear(h, w2, None, "int8") * g2).sum().backward()
    assert len(ln_grads) == 1 and not isinstance(ln_grads[0], QuantizedTensor)
    err = _rel(xs.grad, _exact_ln_linear_grad(x, lw, lb, [w, w2], [g, g2]))
    assert err < 0.024, err                        # measured 0.016 over 5 seeds

    ln_grads.clear()
    xs = x.clone().requires_grad_(True)
    h = layernorm_operand(xs, lw, lb, 1e-5, 128, (1, -1))
    extra = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch.autograd.backward([dataflow_linear(h, w, None, "int8"), h.carrier], [g, extra])
    assert len(ln_grads) == 1 and not isinstance(ln_grads[0], QuantizedTensor)
    xd = x.double().requires_grad_(True)
    hd = F.layer_norm(xd, (x.shape[-1],), lw.double(), lb.double(), 1e-5)
    hd.backward(g.double() @ w.double() + extra.double())
    err = _rel(xs.grad, xd.grad)
    assert err < 0.024, err                        # measured 0.0125 over 3 seeds


def test_micro_batches_keep_their_own_int8_gradients(ln_grads):
    """Two forwards before two backwards (reverse order): each LayerNorm reads its own INT8 gradient
    (a gradient from the other micro batch belongs to other inputs: error ~1)."""
    cases = [_ln_linear_case(seed=s) for s in (41, 42)]
    _, lw, lb, w, _ = cases[0]
    xs = [c[0].clone().requires_grad_(True) for c in cases]
    ys = [dataflow_linear(layernorm_operand(x, lw, lb, 1e-5, 128, (1, -1)), w, None, "int8") for x in xs]
    for y, c in reversed(list(zip(ys, cases))):
        y.backward(c[4])
    assert len(ln_grads) == 2 and all(isinstance(q, QuantizedTensor) for q in ln_grads)
    for x, c in zip(xs, cases):
        err = _rel(x.grad, _exact_ln_linear_grad(c[0], lw, lb, [w], [c[4]]))
        assert err < 0.024, err                    # measured 0.016 over 5 seeds


# --------------------------------------------------------------------------------------------------
# The GELU's backward run inside fc2's (FUSED_GELU_BACKWARD, handed over in a GeluGradSlot)
def _mlp_case(rows=77, cols=384, seed=51):
    x, _, gen = _act(rows, cols, torch.float32, seed=seed)
    w1 = torch.randn(4 * cols, cols, generator=gen) / math.sqrt(cols)
    b1 = 0.1 * torch.randn(4 * cols, generator=gen)
    w2 = torch.randn(cols, 4 * cols, generator=gen) / math.sqrt(4 * cols)
    return x, w1, b1, w2, torch.randn(rows, cols, generator=gen), torch.randn(rows, 4 * cols, generator=gen)


def _mlp_grads(monkeypatch, fused, x, w1, b1, w2, g, extra=None, recipe="int8"):
    """Gradients of LN -> fc1 (INT8 out) -> GELU -> fc2 with the GELU's backward fused into fc2's or
    not; `extra`: a gradient for the GELU's output from a second consumer."""
    monkeypatch.setattr(dataflow_ops, "FUSED_GELU_BACKWARD", fused)
    hadamard, block = data_flow_format(recipe)
    ts = [t.clone().requires_grad_(True) for t in (x, w1, b1, w2)]
    torch.manual_seed(0)
    h = dataflow_linear(layernorm_operand(ts[0], None, None, 1e-5, hadamard, block), ts[1], ts[2], recipe,
                        int8_output=True)
    y = gelu_operand(h, hadamard, block)
    assert (y.gelu_slot is not None) == (fused and dataflow_ops.RECOMPUTE_GELU_OPERAND)
    out = dataflow_linear(y, ts[3], None, recipe)
    if extra is None:
        out.backward(g)
    else:
        torch.autograd.backward([out, y.carrier], [g, extra])
    return [t.grad for t in ts]


@pytest.mark.parametrize("recipe", ["int8", "int8_block128"])
def test_gelu_backward_inside_fc2_gives_the_same_gradients(monkeypatch, recipe):
    x, w1, b1, w2, g, _ = _mlp_case()
    fused, apart = (_mlp_grads(monkeypatch, f, x, w1, b1, w2, g, recipe=recipe) for f in (True, False))
    for a, b in zip(fused, apart):
        assert torch.equal(a, b)


def test_gelu_backward_inside_fc2_adds_other_consumers_gradients(monkeypatch):
    """A second consumer of the GELU output: the GELU's backward gets the slot's ∇h plus GELU'·(what
    autograd delivered), the backward being linear in its incoming gradient."""
    x, w1, b1, w2, g, extra = _mlp_case(seed=52)
    fused, apart = (_mlp_grads(monkeypatch, f, x, w1, b1, w2, g, extra) for f in (True, False))
    # ∇h differs by FP32 rounding (another order of sums), which flips a few of fc1's stochastic
    # roundings of it: measured 6.9e-5 on ∇x, against 0.02 for the INT8 product's own error
    for a, b in zip(fused, apart):
        assert _rel(a, b) < 1e-3
    without = _mlp_grads(monkeypatch, True, x, w1, b1, w2, g)
    assert _rel(without[0], fused[0]) > 0.05          # the extra gradient did arrive


def test_gelu_grad_slot_takes_once():
    slot = dataflow_ops.GeluGradSlot()
    h = quantize_blockwise(torch.randn(4, 256), (1, 128))
    placeholder = dataflow_ops.zero_placeholder((4, 256), torch.float32, torch.device("cpu"))
    dh = torch.randn(4, 256)
    slot.put(dh, placeholder)
    with pytest.raises(RuntimeError, match="second gradient"):
        slot.put(dh, placeholder)
    assert slot.take(placeholder, h) is dh
    g = torch.randn(4, 256)            # an empty slot: the plain GELU backward
    assert torch.equal(slot.take(g, h), gelu_tanh_grad(h.dequantize(torch.float32)) * g)


@pytest.mark.parametrize("bf16_output", [True, False])
def test_layernorm_output_rounded_to_bf16_by_default(monkeypatch, bf16_output):
    """BF16 activations: the LayerNorm's operand for the next GEMM is its output rounded to BF16
    (LAYERNORM_OUTPUT_BF16), or the FP32 output rotated; FP32 activations are never rounded."""
    from megaq.kernels import dataflow as dataflow_kernels
    monkeypatch.setattr(dataflow_ops, "LAYERNORM_OUTPUT_BF16", bf16_output)
    x = (torch.randn(40, 256, generator=torch.Generator().manual_seed(5)) * 3).bfloat16()
    for act in (x, x.float()):
        op = layernorm_operand(act, None, None, 1e-5, 128, (1, -1))
        rounded = bf16_output and act.dtype == torch.bfloat16
        want = dataflow_kernels.layernorm_quantize(act, None, None, 1e-5, 128, (1, -1),
                                                   round_to=torch.bfloat16 if rounded else None)
        assert torch.equal(op.q.data, want.y_q.data) and torch.equal(op.q.scale, want.y_q.scale)
    # the rounding is seen: some INT8 value differs from the unrounded operand's
    unrounded = dataflow_kernels.layernorm_quantize(x, None, None, 1e-5, 128, (1, -1))
    rounded_op = dataflow_kernels.layernorm_quantize(x, None, None, 1e-5, 128, (1, -1), round_to=torch.bfloat16)
    assert not torch.equal(unrounded.y_q.data, rounded_op.y_q.data)


@pytest.mark.parametrize("bf16_output", [True, False])
def test_gelu_output_rounded_to_bf16_and_rebuilt_the_same(monkeypatch, bf16_output):
    """BF16 activations: the GELU's operand for fc2 is the GELU output rounded to BF16 (GELU_OUTPUT_BF16)
    or the FP32 output, and fc2's rebuild in backward makes the same choice: every gradient equals the
    one with fc2 keeping its forward operand, bit for bit."""
    from megaq.kernels import dataflow as dataflow_kernels
    monkeypatch.setattr(dataflow_ops, "GELU_OUTPUT_BF16", bf16_output)
    x, w1, b1, w2, g, _ = _mlp_case(rows=40, seed=53)
    x, w1, b1, w2, g = (t.bfloat16() for t in (x, w1, b1, w2, g))
    h = dataflow_linear(layernorm_operand(x, None, None, 1e-5, 128, (1, -1)), w1, b1, "int8", int8_output=True)
    y = gelu_operand(h, 128, (1, -1))
    want = dataflow_kernels.gelu_quantize(h.q, 128, (1, -1), torch.bfloat16 if bf16_output else None)
    assert torch.equal(y.q.data, want.data) and torch.equal(y.q.scale, want.scale)
    assert y.source_round_to == (torch.bfloat16 if bf16_output else None)
    runs = {}
    for recompute in (True, False):
        monkeypatch.setattr(dataflow_ops, "RECOMPUTE_GELU_OPERAND", recompute)
        runs[recompute] = _mlp_grads(monkeypatch, True, x, w1, b1, w2, g)
    for a, b in zip(runs[True], runs[False]):
        assert torch.equal(a, b)
