"""The MLP's GELU handed to fc2 (`quantized_linear(..., input_activation="gelu_tanh")`): fc2 applies
GELU to fc1's output h itself and runs GELU's backward in the epilogue of its dgrad GEMM
(`kernels.scaled_mm(..., gelu_grad_of=h)`), so the gradient of GELU's output never goes through
memory.

Run as test_kernels_int8.py: the reference tests in the CPU process; the `interp`-named tests in a
TRITON_INTERPRET=1 subprocess (CI); the `gpu` tests on real shapes with the CUDA GEMM.

Bounds (NaN never passes: every comparison fails on NaN):
  * CPU reference kernels: fused and unfused compute the same operations in the same order, so
    outputs and every gradient are bit for bit equal.
  * the GELU-gradient epilogue against `gelu_backward` of the same GEMM's rounded BF16 output: the FP32
    derivative may differ in its last bits (another tanh: libdevice's on the GPU, exp-based in the
    interpreter), so an element may round to a neighbouring BF16 value: each within 2 BF16 ulps
    (relative 2^-6) plus 2^-18 of the GEMM output (where GELU' is ~1e-6, |x| >~ 4, 1 - tanh² cancels and
    its relative error is large, its absolute one is not), and at most 3% of the elements differ.
  * a linear layer fused against unfused on the kernels: their GELU values may round differently in
    the last BF16 bit, which moves an INT8 value by at most one step where it sits near a rounding
    boundary: output and gradients within 1% (relative Frobenius error) of each other.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from interpreter_utils import run_interpreter_child
from tensor_utils import rel_error, random_input

from megaq import kernels
from megaq.ops import quantized_linear

IN_CHILD = os.environ.get("MEGAQ_GELU_INTERP_CHILD") == "1"
gpu = pytest.mark.gpu
interp_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter subprocess")
parent_only = pytest.mark.skipif(IN_CHILD, reason="parent-process test")

# nearest rounding everywhere, so that two runs compare without the dither's randomness
INT8_NEAREST = {"preset": "int8", "check_finite": False, "dgrad": {"a": {"rounding": "nearest"}},
                "wgrad": {"a": {"rounding": "nearest"}}}


def _layer(d_in, d_out, device, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(d_out, d_in, generator=g) * 0.05).to(device=device, dtype=dtype)
    b = (torch.randn(d_out, generator=g) * 0.1).to(device=device, dtype=dtype)
    return w, b


def _fwd_bwd(h, w, b, recipe, fused: bool, seed: int = 0):
    """Output and the gradients of h, w, b for a fixed output gradient; fresh leaves each call (delayed
    predictions live on the weight tensor: a clone starts its own)."""
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
    torch.manual_seed(seed)   # the quantizers' dither seeds come from torch's generator
    if fused:
        y = quantized_linear(h, w, b, recipe, input_activation="gelu_tanh")
    else:
        y = quantized_linear(F.gelu(h, approximate="tanh"), w, b, recipe)
    g = random_input(y.shape, y.device, y.dtype, seed=7)
    y.backward(g)
    return y.detach(), h.grad, w.grad, b.grad


# --------------------------------------------------------------------------------------------------
# the CPU reference kernels: the same computation
@parent_only
@pytest.mark.parametrize("recipe", ["bf16", "int8", "int8_delayed", "int4"])
def test_reference_fused_gelu_is_gelu_then_linear_bit_for_bit(recipe):
    h = random_input((96, 160), "cpu", torch.float32, seed=3)
    w, b = _layer(160, 72, "cpu", torch.float32)
    fused = _fwd_bwd(h, w, b, recipe, True)
    plain = _fwd_bwd(h, w, b, recipe, False)
    for name, a, e in zip(("y", "dh", "dw", "db"), fused, plain):
        assert torch.equal(a, e), (recipe, name, rel_error(a, e))


@parent_only
def test_an_unknown_input_activation_is_refused():
    w, b = _layer(32, 16, "cpu", torch.float32)
    with pytest.raises(ValueError, match="input_activation"):
        quantized_linear(torch.randn(4, 32), w, b, "int8", input_activation="relu")


@parent_only
def test_gelu_grad_of_must_match_the_output():
    qa = kernels.quantize(torch.randn(8, 64), (1, 64))
    qb = kernels.quantize(torch.randn(16, 64), (1, 64))
    with pytest.raises(ValueError, match="gelu_grad_of"):
        kernels.scaled_mm(qa, qb, torch.float32, gelu_grad_of=torch.randn(8, 15))
    with pytest.raises(ValueError, match="int8"):
        kernels.scaled_mm(qa, qb, torch.int8, gelu_grad_of=torch.randn(8, 16))


@parent_only
def test_the_mlp_hands_gelu_to_fc2():
    """The int8 model's MLP computes fc2(GELU(fc1(x))) through the fused path: bit for bit the unfused
    composition on the CPU."""
    from megaq.models.gpt import GPTConfig
    from megaq.models.transformer import MLP

    cfg = GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, n_embd=64, recipe=INT8_NEAREST)
    torch.manual_seed(0)
    mlp = MLP(cfg)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = random_input((16, 2, 64), "cpu", torch.float32, seed=5)
    expected = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
    assert torch.equal(mlp(x), expected)


# --------------------------------------------------------------------------------------------------
# the kernels (interpreter in CI, GPU)
def check_epilogue(device, m=77, n=392, k=320, cuda_direct=False):
    x = random_input((m, k), device, torch.bfloat16, seed=1)
    w = random_input((n, k), device, torch.bfloat16, seed=2)
    h = random_input((m, n), device, torch.bfloat16, seed=3)
    qa, qb = kernels.hadamard_quantize(x, 128, check=False), kernels.hadamard_quantize(w, 128, check=False)
    if cuda_direct:   # the csrc kernel itself (its GELU-gradient epilogue), not through the dispatcher
        from megaq.kernels import cuda_ext
        args = (qa.int_values().contiguous(), qb.int_values().contiguous(), qa.scale, qb.scale)
        plain = cuda_ext.int8_gemm(*args, out_dtype=torch.bfloat16)
        fused = cuda_ext.int8_gemm(*args, out_dtype=torch.bfloat16, gelu_aux=h)
    else:
        plain = kernels.scaled_mm(qa, qb, torch.bfloat16)
        fused = kernels.scaled_mm(qa, qb, torch.bfloat16, gelu_grad_of=h)
    expected = torch.ops.aten.gelu_backward(plain, h, approximate="tanh")
    assert fused.dtype == torch.bfloat16 and fused.shape == (m, n)
    diff = (fused.float() - expected.float()).abs()
    bound = expected.float().abs() * 2 ** -6 + plain.float().abs() * 2 ** -18
    assert bool((diff <= bound).all()), float((diff - bound).max())
    assert float((diff > 0).float().mean()) <= 0.03


def check_linear(device, tokens=300, d_in=384, d_out=200, recipe=INT8_NEAREST):
    h = random_input((tokens, d_in), device, torch.bfloat16, seed=4)
    w, b = _layer(d_in, d_out, device, torch.bfloat16)
    fused = _fwd_bwd(h, w, b, recipe, True)
    plain = _fwd_bwd(h, w, b, recipe, False)
    for name, a, e in zip(("y", "dh", "dw", "db"), fused, plain):
        assert rel_error(a, e) < 1e-2, (name, rel_error(a, e))


@parent_only
def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    run_interpreter_child(__file__, "MEGAQ_GELU_INTERP_CHILD", timeout=900)


@interp_only
def test_interp_gelu_grad_epilogue():
    check_epilogue("cpu")


@interp_only
def test_interp_gelu_grad_epilogue_unaligned_falls_back():
    check_epilogue("cpu", m=40, n=130, k=128)   # N % 8 != 0: GEMM, then gelu_backward


@interp_only
def test_interp_linear_with_gelu_input():
    check_linear("cpu", tokens=160, d_in=256, d_out=96)


@gpu
def test_gpu_gelu_grad_epilogue():
    check_epilogue("cuda", m=1000, n=1608, k=1600)
    check_epilogue("cuda", m=1000, n=1608, k=1600, cuda_direct=True)
    check_epilogue("cuda", m=333, n=6400, k=512)


@gpu
@pytest.mark.parametrize("recipe", [INT8_NEAREST, "int8", "int8_delayed"])
def test_gpu_linear_with_gelu_input(recipe):
    check_linear("cuda", tokens=1000, d_in=6400, d_out=1600, recipe=recipe)


@parent_only
def test_unfused_switch_gives_the_same_gradients():
    """FUSE_GELU_GRAD = False runs GELU's backward as its own op (what the benchmarks compare): on the
    CPU reference kernels the same numbers."""
    from megaq.ops import linear as linear_ops

    h = random_input((64, 128), "cpu", torch.float32, seed=3)
    w, b = _layer(128, 48, "cpu", torch.float32)
    fused = _fwd_bwd(h, w, b, "int8", True)
    linear_ops.FUSE_GELU_GRAD = False
    try:
        unfused = _fwd_bwd(h, w, b, "int8", True)
    finally:
        linear_ops.FUSE_GELU_GRAD = True
    assert all(torch.equal(a, e) for a, e in zip(fused, unfused))
