"""megaq.kernels.dataflow: the Triton LayerNorm / GELU kernels of the INT8 data flow against their
reference (the same module's PyTorch path on megaq.quant).

Run like tests/test_kernels_int8.py: `test_triton_dataflow_kernels_under_interpreter` re-runs the
`test_interp_` tests in a subprocess with TRITON_INTERPRET=1 and MEGAQ_KERNELS=triton (small shapes:
hidden 384 and 200 — a Hadamard tail —, odd row counts); the `gpu` tests check the same on real shapes.

Bounds (random inputs, never all zero; every comparison fails on NaN):
  * LayerNorm forward: the residual sum equals x + r rounded to the dtype (the interpreter converts
    FP32 -> BF16 by truncation: within one ulp there); everything else is compared with the
    reference run on the kernel's own sum: the saved INT8 copy bit for bit, mean and rstd within
    1e-5 relative (FP32 sums in another order), the output scales within 1e-5 relative and the INT8
    output within ±1 on <= 0.5% of the elements (near-ties after differently ordered FP32 sums; the
    GPU's rotation splits FP32 into two BF16 parts, error <= 2^-17 relative).
  * GELU forward: same output bounds. Backward kernels: FP32 results within 1e-5 relative
    (Frobenius); BF16 results within one BF16 ulp per element (2^-7 relative) — rounding of nearly
    equal FP32 values can fall either way; weight/bias gradients (FP32) within 1e-5 relative.
"""

import os

import pytest
import torch

from interpreter_utils import run_interpreter_child
from tensor_utils import rel_error

from megaq.kernels import dataflow as kd
from megaq.quant import NonFiniteError, quantize_blockwise

IN_CHILD = os.environ.get("MEGAQ_INTERP_CHILD") == "1"
gpu = pytest.mark.gpu
interp_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter subprocess")
FORMATS = [(128, (1, -1)), (0, (1, 128))]      # default recipe's operand; int8_block128's


_rel = rel_error


def _data(shape, device, dtype, seed, scale=2.0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale + shift
    x[:, ::97] *= 10                                         # outlier channels
    return x.to(device=device, dtype=dtype)


def _reference(fn, *args, **kwargs):
    """Run a megaq.kernels.dataflow function on the CPU reference path."""
    old = os.environ.get("MEGAQ_KERNELS")
    os.environ["MEGAQ_KERNELS"] = "reference"
    try:
        cpu = [a.cpu() if isinstance(a, torch.Tensor) else _qt_cpu(a) for a in args]
        return fn(*cpu, **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    finally:
        if old is None:
            del os.environ["MEGAQ_KERNELS"]
        else:
            os.environ["MEGAQ_KERNELS"] = old


def _qt_cpu(q):
    if q is None or not hasattr(q, "scale"):
        return q
    return type(q)(q.data.cpu(), q.scale.cpu(), q.block, q.bits, q.shape)


def _assert_int8_close(q, ref, what):
    assert q.block == ref.block and q.shape == ref.shape, (what, q.block, ref.block, q.shape, ref.shape)
    assert _rel(q.scale, ref.scale) <= 1e-5, (what, _rel(q.scale, ref.scale))
    diff = (q.data.cpu().int() - ref.data.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 5e-3, \
        (what, int(diff.max()), float((diff > 0).float().mean()))


def _assert_grad_close(out, ref, what):
    out, ref = out.cpu(), ref.cpu()
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        assert _rel(out, ref) <= 1e-5, (what, _rel(out, ref))
    else:
        tol = 2.0 ** -7 * ref.float().abs() + 1e-6 * float(ref.float().abs().max())
        assert bool(((out.float() - ref.float()).abs() <= tol).all()), (what, _rel(out, ref))


# --------------------------------------------------------------------------------------------------
# checks shared by the interpreter and the GPU tests
def check_layernorm(R, C, dtype, residual, hadamard, block, device, bias=True):
    x = _data((R, C), device, dtype, seed=R + C)
    r = _data((R, C), device, dtype, seed=R * C, scale=1.0, shift=0.0) if residual else None
    g = torch.Generator().manual_seed(1)
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(device)
    b = (0.1 * torch.randn(C, generator=g)).to(device) if bias else None
    out = kd.layernorm_quantize(x, w, b, 1e-5, hadamard, block, residual=r)
    xs = x if r is None else out.x_sum
    if r is not None:
        exact = (x.float() + r.float()).to(dtype).cpu()
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -23
        assert bool(((xs.cpu().float() - exact.float()).abs() <= ulp * exact.float().abs()).all())
    ref = _reference(kd.layernorm_quantize, xs, w, b, 1e-5, hadamard, block)
    assert torch.equal(out.x_q.data.cpu(), ref.x_q.data) and torch.equal(out.x_q.scale.cpu(), ref.x_q.scale)
    assert out.x_q.block == ref.x_q.block == kd.SAVE_BLOCK
    assert _rel(out.rstd, ref.rstd) <= 1e-5
    assert bool(((out.mean.cpu() - ref.mean).abs() <= 1e-5 / ref.rstd).all())
    _assert_int8_close(out.y_q, ref.y_q, "LayerNorm output")
    # backward from the saved copy, with and without the residual gradient
    gy = _data((R, C), device, dtype, seed=7, scale=1.0, shift=0.0)
    gres = _data((R, C), device, dtype, seed=8, scale=1.0, shift=0.0) if residual else None
    dx, dw, db = kd.layernorm_backward(out.x_q, out.mean, out.rstd, w, gy, gres)
    rdx, rdw, rdb = _reference(kd.layernorm_backward, out.x_q, out.mean, out.rstd, w, gy, gres)
    _assert_grad_close(dx, rdx, "LayerNorm dx")
    assert _rel(dw, rdw) <= 1e-5 and _rel(db, rdb) <= 1e-5


def check_gelu(R, N, dtype, hadamard, block, device):
    h = quantize_blockwise(_data((R, N), "cpu", torch.float32, seed=N, scale=3.0, shift=-0.5), (1, 128))
    h = type(h)(h.data.to(device), h.scale.to(device), h.block, h.bits, h.shape)
    _assert_int8_close(kd.gelu_quantize(h, hadamard, block), _reference(kd.gelu_quantize, h, hadamard, block),
                       "GELU output")
    g = _data((R, N), device, dtype, seed=3, scale=1.0, shift=0.0)
    _assert_grad_close(kd.gelu_backward(h, g), _reference(kd.gelu_backward, h, g), "GELU dh")


def check_nonfinite(device):
    x = _data((19, 200), device, torch.float32, seed=0)
    x[3, 5] = float("nan")
    with pytest.raises(NonFiniteError):
        kd.layernorm_quantize(x, None, None, 1e-5, 128, (1, -1))
    r = torch.zeros_like(x)
    x[3, 5] = 1.0
    r[7, 0] = float("inf")
    with pytest.raises(NonFiniteError):   # the check sees the summed input
        kd.layernorm_quantize(x, None, None, 1e-5, 128, (1, -1), residual=r)


# --------------------------------------------------------------------------------------------------
# CPU: the interpreter subprocess
def test_triton_dataflow_kernels_under_interpreter():
    if IN_CHILD:
        pytest.skip("this is the child")
    pytest.importorskip("triton")
    run_interpreter_child(__file__, "MEGAQ_INTERP_CHILD", timeout=600)


@interp_only
@pytest.mark.parametrize("hadamard,block", FORMATS)
@pytest.mark.parametrize("R,C,dtype,residual", [(37, 384, torch.bfloat16, True),
                                                 (19, 200, torch.float32, False)])
def test_interp_layernorm(R, C, dtype, residual, hadamard, block):
    check_layernorm(R, C, dtype, residual, hadamard, block, "cpu")


@interp_only
def test_interp_layernorm_without_affine():
    check_layernorm(21, 256, torch.float32, True, 128, (1, -1), "cpu", bias=False)


@interp_only
@pytest.mark.parametrize("hadamard,block", FORMATS)
@pytest.mark.parametrize("R,N,dtype", [(37, 384, torch.bfloat16), (19, 800, torch.float32)])
def test_interp_gelu(R, N, dtype, hadamard, block):
    check_gelu(R, N, dtype, hadamard, block, "cpu")


@interp_only
def test_interp_nonfinite_input_raises():
    check_nonfinite("cpu")


# --------------------------------------------------------------------------------------------------
# GPU
@gpu
@pytest.mark.parametrize("hadamard,block", FORMATS)
@pytest.mark.parametrize("R,C,dtype,residual", [(4099, 1600, torch.bfloat16, True),
                                                 (2053, 4096, torch.bfloat16, False),
                                                 (300, 384, torch.float32, True)])
def test_gpu_layernorm(R, C, dtype, residual, hadamard, block):
    check_layernorm(R, C, dtype, residual, hadamard, block, "cuda")


@gpu
@pytest.mark.parametrize("hadamard,block", FORMATS)
@pytest.mark.parametrize("R,N,dtype", [(4099, 6400, torch.bfloat16), (300, 1536, torch.float32)])
def test_gpu_gelu(R, N, dtype, hadamard, block):
    check_gelu(R, N, dtype, hadamard, block, "cuda")


@gpu
def test_gpu_nonfinite_input_raises():
    check_nonfinite("cuda")
