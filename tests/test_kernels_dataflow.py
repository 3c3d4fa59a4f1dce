"""megaq.kernels.dataflow: the Triton LayerNorm / GELU kernels of the INT8 data flow against their
reference (the same module's PyTorch path on megaq.quant).

Run like tests/test_kernels_int8.py: `test_triton_dataflow_kernels_under_interpreter` re-runs the
`test_interp_` tests in a subprocess with TRITON_INTERPRET=1 and MEGAQ_KERNELS=triton (small shapes:
hidden 384 and 200 — a Hadamard tail —, odd row counts); the `gpu` tests check the same on real shapes.
Both kernel families are checked: the row-resident kernels (the automatic choice at these widths;
also with a persistent grid of fewer programs than tiles, at 1600 wide: 13 chunks in a 16-chunk row,
and a row tail) and the chunked kernels (`config_override(KERNEL="chunked")`, the fallback for rows
too long to hold).

Bounds (random inputs, never all zero; every comparison fails on NaN):
  * LayerNorm forward: the residual sum equals x + r rounded to the dtype (the interpreter converts
    FP32 -> BF16 by truncation: within one ulp there); everything else is compared with the
    reference run on the kernel's own sum: the saved INT8 copy bit for bit, mean and rstd within
    1e-5 relative (FP32 sums in another order), the output scales within 1e-5 relative and the INT8
    output within ±1 on <= 0.5% of the elements (near-ties after differently ordered FP32 sums; the
    GPU's rotation splits FP32 into two BF16 parts, error <= 2^-17 relative).
  * NaN: a NaN LayerNorm input (check off) or a NaN GELU input scale leaves NaN output scales on
    its row (never a finite row); a NaN incoming gradient gives NaN in the backward's output.
  * GELU forward: same output bounds. Backward kernels: FP32 results within 1e-5 relative
    (Frobenius); BF16 results within one BF16 ulp per element (2^-7 relative) — rounding of nearly
    equal FP32 values can fall either way; weight/bias gradients (FP32) within 1e-5 relative. The
    same bounds hold for the LayerNorm backward reading an INT8 (1, 128) incoming gradient (both
    sides read the same INT8 values).
  * The dgrad GEMM's INT8 stochastically rounded output (what that LayerNorm backward reads): scales
    as nearest rounding's (1e-5 relative), every payload within 1 (+1e-3 for FP32 sum order) of
    accumulator / scale, rounded differently from nearest on >= 10% of the elements (expected ~25%),
    and the mean of 16 draws within 0.4x the error of one draw (unbiased: ~1/4 expected).
  * The LayerNorm backward from an SR-quantized gradient against the exact FP32 backward from the
    same saved input (reference path, 64 x 384, gradient with a x10 outlier channel every 97): one
    draw's relative error in [1e-3, 0.05] (measured dx 0.026, dw 0.0038, db 0.029), the mean of 100
    draws within 0.15x of it (measured 0.097-0.102: 1/sqrt(100) for an unbiased rounding; a bias of
    the order of the noise keeps the ratio near 1).
"""

import importlib
import os
from unittest import mock

import pytest
import torch

from interpreter_utils import run_interpreter_child
from tensor_utils import rel_error

from megaq import kernels
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
    with mock.patch.dict(os.environ, {"MEGAQ_KERNELS": "reference"}):
        cpu = [a.cpu() if isinstance(a, torch.Tensor) else _qt_cpu(a) for a in args]
        return fn(*cpu, **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})


def _qt_cpu(q):
    if q is None or not hasattr(q, "scale"):
        return q
    return type(q)(q.data.cpu(), q.scale.cpu(), q.block, q.bits, q.shape)


def _assert_int8_close(q, ref, what, bf16_rounded=False):
    """INT8 operands within the kernels' bounds of the reference: scales to 1e-5 (relative, all of
    them), values one step apart on ≤ 0.5% of them. `bf16_rounded`: both sides first round FP32
    values, computed in different orders, to BF16, and the two roundings part on the values within
    an FP32 ulp or two of a BF16 tie (~10⁻⁵ of them). Each such value moves by one BF16 ulp (2⁻⁸ to
    2⁻⁷ of it), and so does its block's scale where it is a (1, 128) block's abs-max (less after a
    rotation): on an H100 a few such blocks broke the 1e-5 bound (one scale 0.71% off, a mean of
    2.4·10⁻⁷). So each scale is held to 2⁻⁷ and their mean relative deviation to 1e-5 (sparse flips,
    not a drift)."""
    assert q.block == ref.block and q.shape == ref.shape, (what, q.block, ref.block, q.shape, ref.shape)
    if bf16_rounded:
        rel = (q.scale.cpu().double() - ref.scale.double()).abs() / ref.scale.double().abs()
        assert float(rel.max()) <= 2.0 ** -7 and float(rel.mean()) <= 1e-5, \
            (what, float(rel.max()), float(rel.mean()))
    else:
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
def check_layernorm(R, C, dtype, residual, hadamard, block, device, bias=True, plan=None, round_to=None):
    with kd.config_override(**(plan or {})):
        _check_layernorm(R, C, dtype, residual, hadamard, block, device, bias, round_to)


def _check_layernorm(R, C, dtype, residual, hadamard, block, device, bias, round_to=None):
    x = _data((R, C), device, dtype, seed=R + C)
    r = _data((R, C), device, dtype, seed=R * C, scale=1.0, shift=0.0) if residual else None
    g = torch.Generator().manual_seed(1)
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(device)
    b = (0.1 * torch.randn(C, generator=g)).to(device) if bias else None
    out = kd.layernorm_quantize(x, w, b, 1e-5, hadamard, block, residual=r, round_to=round_to)
    xs = x if r is None else out.x_sum
    if r is not None:
        exact = (x.float() + r.float()).to(dtype).cpu()
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -23
        assert bool(((xs.cpu().float() - exact.float()).abs() <= ulp * exact.float().abs()).all())
    ref = _reference(kd.layernorm_quantize, xs, w, b, 1e-5, hadamard, block, round_to=round_to)
    assert torch.equal(out.x_q.data.cpu(), ref.x_q.data) and torch.equal(out.x_q.scale.cpu(), ref.x_q.scale)
    assert out.x_q.block == ref.x_q.block == kd.SAVE_BLOCK
    assert _rel(out.rstd, ref.rstd) <= 1e-5
    assert bool(((out.mean.cpu() - ref.mean).abs() <= 1e-5 / ref.rstd).all())
    _assert_int8_close(out.y_q, ref.y_q, "LayerNorm output", bf16_rounded=round_to is not None)
    # backward from the saved copy, with and without the residual gradient
    gy = _data((R, C), device, dtype, seed=7, scale=1.0, shift=0.0)
    gres = _data((R, C), device, dtype, seed=8, scale=1.0, shift=0.0) if residual else None
    dx, dw, db = kd.layernorm_backward(out.x_q, out.mean, out.rstd, w, gy, gres)
    rdx, rdw, rdb = _reference(kd.layernorm_backward, out.x_q, out.mean, out.rstd, w, gy, gres)
    _assert_grad_close(dx, rdx, "LayerNorm dx")
    assert _rel(dw, rdw) <= 1e-5 and _rel(db, rdb) <= 1e-5


def check_gelu(R, N, dtype, hadamard, block, device, plan=None, round_to=None):
    with kd.config_override(**(plan or {})):
        _check_gelu(R, N, dtype, hadamard, block, device, round_to)


def _check_gelu(R, N, dtype, hadamard, block, device, round_to=None):
    h = quantize_blockwise(_data((R, N), "cpu", torch.float32, seed=N, scale=3.0, shift=-0.5), (1, 128))
    h = type(h)(h.data.to(device), h.scale.to(device), h.block, h.bits, h.shape)
    _assert_int8_close(kd.gelu_quantize(h, hadamard, block, round_to),
                       _reference(kd.gelu_quantize, h, hadamard, block, round_to), "GELU output")
    g = _data((R, N), device, dtype, seed=3, scale=1.0, shift=0.0)
    _assert_grad_close(kd.gelu_backward(h, g), _reference(kd.gelu_backward, h, g), "GELU dh")


def _sr_quantized(g2d, seed):
    """An incoming gradient as the dgrad epilogue writes it: INT8 (1, 128), stochastic rounding."""
    q = quantize_blockwise(g2d.float().cpu(), kd.SAVE_BLOCK, 8, "stochastic",
                           generator=torch.Generator().manual_seed(seed))
    return type(q)(q.data.to(g2d.device), q.scale.to(g2d.device), q.block, q.bits, q.shape)


def check_layernorm_int8_grad(R, C, dtype, residual, device, weight=True, plan=None):
    """The LayerNorm backward kernel reading an INT8 incoming gradient, against the reference."""
    with kd.config_override(**(plan or {})):
        _check_layernorm_int8_grad(R, C, dtype, residual, device, weight)


def _check_layernorm_int8_grad(R, C, dtype, residual, device, weight):
    x = _data((R, C), device, dtype, seed=R + 3 * C)
    gen = torch.Generator().manual_seed(2)
    w = (1 + 0.1 * torch.randn(C, generator=gen)).to(device) if weight else None
    _, mean, rstd = kd.layernorm_forward_math(x, w, None, 1e-5)
    x_q = quantize_blockwise(x.float().cpu(), kd.SAVE_BLOCK)
    x_q = type(x_q)(x_q.data.to(device), x_q.scale.to(device), x_q.block, x_q.bits, x_q.shape)
    g_q = _sr_quantized(_data((R, C), device, torch.float32, seed=9, scale=1.0, shift=0.0), seed=R)
    gres = _data((R, C), device, dtype, seed=8, scale=1.0, shift=0.0) if residual else None
    dx, dw, db = kd.layernorm_backward(x_q, mean, rstd, w, g_q, gres, out_dtype=dtype)
    rdx, rdw, rdb = _reference(kd.layernorm_backward, x_q, mean, rstd, w, g_q, gres, out_dtype=dtype)
    assert dx.dtype == dtype and bool(torch.isfinite(dx).all())
    _assert_grad_close(dx, rdx, "LayerNorm dx from an INT8 gradient")
    assert _rel(db, rdb) <= 1e-5
    assert (dw is None) == (rdw is None) == (w is None)
    if w is not None:
        assert _rel(dw, rdw) <= 1e-5


def check_dgrad_int8_stochastic(M, N, K, ablock, bblock, device, draws=16):
    """`scaled_mm(..., out_dtype=int8, out_rounding="stochastic")` — the dgrad GEMM writing the INT8
    gradient the LayerNorm backward reads — rounds stochastically (see the module doc's bounds)."""
    qa = kernels.quantize(_data((M, K), device, torch.float32, seed=M, scale=1.0, shift=0.0), ablock)
    qb = kernels.quantize(_data((N, K), device, torch.float32, seed=N, scale=1.0, shift=0.0), bblock)
    exact = (qa.dequantize().double() @ qb.dequantize().double().t()).cpu()
    nearest = quantize_blockwise(exact.float(), kd.SAVE_BLOCK)
    gen = torch.Generator(device=device).manual_seed(0)
    v = exact / nearest.scale.double().repeat_interleave(128, dim=1)[:, :N]   # accumulator / scale
    total, single = torch.zeros_like(exact), None
    for _ in range(draws):
        q = kernels.scaled_mm(qa, qb, out_dtype=torch.int8, out_block=kd.SAVE_BLOCK,
                              out_rounding="stochastic", generator=gen)
        assert q.block == kd.SAVE_BLOCK and q.shape == (M, N) and q.data.dtype == torch.int8
        assert _rel(q.scale, nearest.scale) <= 1e-5
        assert float((q.data.cpu().double() - v).abs().max()) <= 1 + 1e-3
        value = q.dequantize(torch.float32).cpu().double()
        total += value
        if single is None:
            single = value
            assert float((q.data.cpu() != nearest.data).float().mean()) >= 0.1   # SR is active
    assert _rel(total / draws, exact) <= 0.4 * _rel(single, exact), (_rel(total / draws, exact),
                                                                     _rel(single, exact))


def check_nonfinite(device, plan=None):
    with kd.config_override(**(plan or {})):
        _check_nonfinite(device)


def _check_nonfinite(device):
    x = _data((19, 200), device, torch.float32, seed=0)
    x[3, 5] = float("nan")
    with pytest.raises(NonFiniteError):
        kd.layernorm_quantize(x, None, None, 1e-5, 128, (1, -1))
    r = torch.zeros_like(x)
    x[3, 5] = 1.0
    r[7, 0] = float("inf")
    with pytest.raises(NonFiniteError):   # the check sees the summed input
        kd.layernorm_quantize(x, None, None, 1e-5, 128, (1, -1), residual=r)


def check_nan_propagates(device, plan=None):
    """NaN in -> NaN out (check off): the LayerNorm's row scales, the GELU's row scale, both backwards."""
    R, C = 21, 384
    with kd.config_override(**(plan or {})):
        x = _data((R, C), device, torch.bfloat16, seed=1)
        x[5, 7] = float("nan")
        out = kd.layernorm_quantize(x, None, None, 1e-5, 128, (1, -1), check=False)
        y_nan, x_nan = torch.isnan(out.y_q.scale).cpu(), torch.isnan(out.x_q.scale).cpu()
        assert bool(y_nan[5].all()) and not bool(y_nan[torch.arange(R) != 5].any())
        assert bool(x_nan[5, 0]) and int(x_nan.sum()) == 1          # the (1, 128) block holding it
        g = _data((R, C), device, torch.bfloat16, seed=2, scale=1.0, shift=0.0)
        g[3, 9] = float("nan")
        dx, dw, db = kd.layernorm_backward(out.x_q, out.mean, out.rstd, None, g)
        assert bool(torch.isnan(dx[3]).all()) and bool(torch.isnan(db[9])) and dw is None
        h = quantize_blockwise(_data((R, 4 * C), "cpu", torch.float32, seed=3), (1, 128))
        h.scale[4, 2] = float("nan")
        h = type(h)(h.data.to(device), h.scale.to(device), h.block, h.bits, h.shape)
        s = kd.gelu_quantize(h, 128, (1, -1)).scale.cpu()
        assert bool(torch.isnan(s[4]).all()) and not bool(torch.isnan(s[torch.arange(R) != 4]).any())
        gh = _data((R, 4 * C), device, torch.bfloat16, seed=4, scale=1.0, shift=0.0)
        gh[0, 1] = float("nan")
        dh = kd.gelu_backward(h, gh).cpu()
        assert bool(torch.isnan(dh[0, 1])) and bool(torch.isnan(dh[4, 256:384]).all())


def check_requantize_transposed(R, C, hadamard, rounding, delayed, device):
    """The data flow's wgrad operand Xᵀ from the saved X̃ (`kernels.requantize_transposed`, the
    quantizer dequantizing as it loads) against `dequantize` + the same quantizer on the BF16 copy:
    bit for bit (payload, scales and, delayed, the predictions and overflow counts), over three calls
    whose column abs-maxes move (the first seeds a prediction, the later ones use and pass it). The
    Philox seeds come from twin generators, so stochastic rounding draws the same dither."""
    from megaq.quant import DelayedAmax
    g = torch.Generator().manual_seed(11)
    base = torch.randn((R, C), generator=g) * 2.0
    base[:, ::37] *= 12.0                                   # outlier channels
    states = [DelayedAmax(C, 0.9, device) for _ in range(2)] if delayed else [None, None]
    gens = [torch.Generator(device=device).manual_seed(5) for _ in range(2)]
    for factor in (1.0, 1.6, 0.3):
        x = (base * factor).to(device=device, dtype=torch.bfloat16)
        xq = kernels.hadamard_quantize(x, hadamard)         # X̃ as a LayerNorm/GELU producer saves it
        copy = kernels.dequantize(xq, torch.bfloat16)
        if delayed:
            want = kernels.hadamard_quantize_delayed(copy, hadamard, states[0], rounding=rounding,
                                                     generator=gens[0], transpose=True)
        else:
            want = kernels.hadamard_quantize(copy, hadamard, rounding=rounding, generator=gens[0], transpose=True)
        from megaq.kernels import quantizers
        # the fused path writes no dequantized copy: dequantize must not be called on the way
        with mock.patch.object(quantizers, "dequantize", side_effect=AssertionError("dequantized copy")):
            got = kernels.requantize_transposed(xq, hadamard, torch.bfloat16, state=states[1], rounding=rounding,
                                                generator=gens[1])
        assert got.block == want.block and got.shape == want.shape and got.bits == want.bits
        assert torch.equal(got.scale, want.scale), (factor, rel_error(got.scale, want.scale))
        assert torch.equal(got.data, want.data), (factor, int((got.data != want.data).sum()))
        if delayed:
            assert torch.equal(states[1].pred, states[0].pred)
    if delayed:
        assert states[1].take_counts() == states[0].take_counts()


def check_requantize_rotated_back(R, C, hadamard, rounding, delayed, device):
    """`requantize_transposed(..., rotate_back=True)`: the wgrad operand from X = X̃·H, each tile of the
    saved X̃ rotated as the kernel loads it (INT8 × ±1, exact, then the scale, one BF16 rounding),
    against the reference path (FP32 dequantization, FP32 rotation, BF16, the same quantizer) over
    three calls. The two BF16 copies differ by one ulp on near-ties only, so: scales within 2^-8
    relative (an abs-max one ulp away) and the predictions likewise; payloads within 1, differing on
    at most 1% of the elements (stochastic rounding draws the same dither on both sides)."""
    from megaq.quant import DelayedAmax, block_hadamard
    g = torch.Generator().manual_seed(12)
    base = torch.randn((R, C), generator=g) * 2.0
    base[:, ::37] *= 12.0
    states = [DelayedAmax(C, 0.9, device) for _ in range(2)] if delayed else [None, None]
    gens = [torch.Generator(device=device).manual_seed(6) for _ in range(2)]
    for factor in (1.0, 1.6, 0.3):
        x = (base * factor).to(device=device, dtype=torch.bfloat16)
        xq = kernels.hadamard_quantize(x, hadamard)
        copy = block_hadamard(kernels.dequantize(xq, torch.float32), hadamard).to(torch.bfloat16)
        assert rel_error(copy.float(), x.float()) < 0.02                       # X̃·H is X again
        if delayed:
            want = kernels.hadamard_quantize_delayed(copy, hadamard, states[0], rounding=rounding,
                                                     generator=gens[0], transpose=True)
        else:
            want = kernels.hadamard_quantize(copy, hadamard, rounding=rounding, generator=gens[0], transpose=True)
        got = kernels.requantize_transposed(xq, hadamard, torch.bfloat16, state=states[1], rounding=rounding,
                                            generator=gens[1], rotate_back=True)
        assert got.block == want.block and got.shape == want.shape and got.bits == want.bits
        scale_err = ((got.scale - want.scale).abs() / want.scale).max()
        assert float(scale_err) <= 2 ** -8, (factor, float(scale_err))
        diff = (got.data.int() - want.data.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01, \
            (factor, int(diff.max()), float((diff > 0).float().mean()))
        if delayed:
            assert float(((states[1].pred - states[0].pred).abs() / states[0].pred).max()) <= 2 ** -8
    with pytest.raises(ValueError, match="whole Hadamard blocks"):
        kernels.requantize_transposed(kernels.quantize(base[:, :hadamard + 8].to(device), (1, -1)), hadamard,
                                      rotate_back=True)


def check_rotate_back(R, Cp, cols, hadamard, device):
    """`kd.rotate_back` (the data flow's ∇W out of Hadamard space) against the FP64 product, per
    element: |error| <= 2^-15 · S for the FP32 output, S = Σ|x| over the element's Hadamard block /
    sqrt(h) (two BF16 parts leave <= 2^-16 of each input, FP32 sums of 128 terms ~2^-17 of S), plus
    half a BF16 ulp (2^-8 relative) for the BF16 output. An absolute bound in S, not a relative one:
    an output can cancel to far below its inputs."""
    from megaq.quant import block_hadamard
    g = torch.Generator().manual_seed(3)
    x = torch.randn((R, Cp), generator=g) * 1e-3
    x[:, ::29] *= 50.0
    want = block_hadamard(x.double(), hadamard)[:, :cols]
    block_abs = x.double().abs().reshape(R, Cp // hadamard, hadamard).sum(-1) / hadamard ** 0.5
    S = block_abs.repeat_interleave(hadamard, dim=1)[:, :cols]
    x = x.to(device)
    got32 = kd.rotate_back(x, hadamard, cols, torch.float32)
    assert got32.shape == (R, cols) and got32.dtype == torch.float32
    err32 = (got32.cpu().double() - want).abs()
    assert bool((err32 <= 2 ** -15 * S).all()), float((err32 / S).max())
    got16 = kd.rotate_back(x, hadamard, cols, torch.bfloat16).cpu().double()
    assert got16.shape == (R, cols)
    err16 = (got16 - want).abs()
    assert bool((err16 <= want.abs() * 2 ** -8 + 2 ** -15 * S).all()), float(((err16 - want.abs() * 2 ** -8) / S).max())
    # a BF16 input (the data flow's wgrad GEMM writes ∇W̃ in the weight's dtype): the same bounds
    # against the FP64 rotation of that BF16 input
    xb = x.bfloat16()
    want_b = block_hadamard(xb.cpu().double(), hadamard)[:, :cols]
    gotb = kd.rotate_back(xb, hadamard, cols, torch.bfloat16).cpu().double()
    errb = (gotb - want_b).abs()
    excess = errb - want_b.abs() * 2 ** -8
    assert bool((excess <= 2 ** -15 * S).all()), float((excess / S).max())
    with pytest.raises(ValueError, match="whole Hadamard blocks"):
        kd.rotate_back(x[:, :Cp - 1], hadamard, cols, torch.float32)


def check_dataflow_linear_wgrad(recipe, device):
    """The data flow's linear end to end (forward + backward, a BF16 input quantized once inside, 200
    features: padded to 256 in Hadamard space, 96 tokens: padded to 128 along the wgrad's reduction)
    with its fused wgrad operand and rotation against the same layer with both replaced by the
    unfused composition (`dequantize` + the transposed quantizer, the FP32 reference rotation, a cut
    and a cast), with the rotation on the operand (`ROTATE_WGRAD_OPERAND`) and on ∇W. Same seeds, so
    the same stochastic rounding: ∇X and the bias gradient equal bit for bit; ∇W within 2^-7 relative
    (Frobenius; the two rotations round differently: one BF16 ulp at most, before or after the
    operand's quantization)."""
    from megaq.ops import dataflow_linear
    g = torch.Generator().manual_seed(2)
    x = (torch.randn((96, 200), generator=g) * 2.0).to(device=device, dtype=torch.bfloat16)
    w = (torch.randn((160, 200), generator=g) * 0.05).to(device=device, dtype=torch.bfloat16)
    b = (torch.randn(160, generator=g) * 0.1).to(device=device, dtype=torch.bfloat16)
    gy = torch.randn((96, 160), generator=g).to(device=device, dtype=torch.bfloat16)

    def grads():
        torch.manual_seed(7)
        xx, ww, bb = (t.clone().requires_grad_(True) for t in (x, w, b))
        dataflow_linear(xx, ww, bb, recipe).backward(gy)
        return xx.grad, ww.grad, bb.grad

    def unfused_operand(xq, hadamard, dtype, state=None, bits=8, rounding="nearest", generator=None, check=True,
                        rotate_back=False):
        copy = kernels.dequantize(xq, dtype)
        if rotate_back:
            from megaq.quant import block_hadamard
            copy = block_hadamard(kernels.dequantize(xq, torch.float32), hadamard).to(dtype)
        if state is None:
            return kernels.hadamard_quantize(copy, hadamard, rounding=rounding, generator=generator, check=check,
                                             transpose=True)
        return kernels.hadamard_quantize_delayed(copy, hadamard, state, rounding=rounding, generator=generator,
                                                 check=check, transpose=True)

    def reference_rotation(x2d, hadamard, cols, dtype):
        from megaq.quant import block_hadamard
        return block_hadamard(x2d.float(), hadamard)[:, :cols].to(dtype)

    linear_module = importlib.import_module("megaq.ops.dataflow_linear")
    for rotate_operand in (False, True):
        with mock.patch.object(linear_module, "ROTATE_WGRAD_OPERAND", rotate_operand):
            fused = grads()
            with mock.patch.object(kernels, "requantize_transposed", side_effect=unfused_operand) as operand, \
                    mock.patch.object(kd, "rotate_back", side_effect=reference_rotation) as rotation:
                unfused = grads()
        # the linear took the fused paths: the operand's, and the rotation of ∇W unless the operand's
        assert operand.call_count == 1 and rotation.call_count == (0 if rotate_operand else 1)
        assert operand.call_args.kwargs.get("rotate_back", False) == rotate_operand
        assert torch.equal(fused[0], unfused[0]) and torch.equal(fused[2], unfused[2])
        assert rel_error(fused[1].float(), unfused[1].float()) <= 2 ** -7, rel_error(fused[1].float(),
                                                                                   unfused[1].float())


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
@pytest.mark.parametrize("plan", [None, {"KERNEL": "chunked"}])
def test_interp_gelu_rounded_to_bf16(plan):
    """The GELU output rounded to BF16 before the rotation (one product): against the reference that
    rounds torch's GELU, within the same bounds."""
    check_gelu(37, 384, torch.bfloat16, 128, (1, -1), "cpu", plan=plan, round_to=torch.bfloat16)
    check_gelu(19, 800, torch.bfloat16, 0, (1, 128), "cpu", plan=plan, round_to=torch.bfloat16)


@interp_only
@pytest.mark.parametrize("plan", [None, {"KERNEL": "chunked"}])
def test_interp_layernorm_rounded_to_bf16(plan):
    """The LayerNorm output rounded to BF16 before the rotation (one product), both kernel families:
    against the reference that rounds the FP32 LayerNorm output, within the same bounds."""
    check_layernorm(37, 384, torch.bfloat16, True, 128, (1, -1), "cpu", plan=plan, round_to=torch.bfloat16)
    check_layernorm(19, 200, torch.bfloat16, False, 0, (1, 128), "cpu", plan=plan, round_to=torch.bfloat16)


def test_layernorm_round_to_names_a_bad_dtype():
    with pytest.raises(ValueError, match="round_to"):
        kd.layernorm_quantize(torch.randn(4, 128), None, None, 1e-5, 128, (1, -1), round_to=torch.float16)


@interp_only
@pytest.mark.parametrize("R,C,dtype,residual,weight", [(37, 384, torch.bfloat16, True, True),
                                                        (19, 200, torch.float32, False, True),
                                                        (21, 256, torch.float32, True, False)])
def test_interp_layernorm_backward_int8_gradient(R, C, dtype, residual, weight):
    check_layernorm_int8_grad(R, C, dtype, residual, "cpu", weight)


@interp_only
@pytest.mark.parametrize("ablock,bblock", [((1, -1), (1, -1)), ((1, 128), (128, 128))])
def test_interp_dgrad_int8_output_rounds_stochastically(ablock, bblock):
    check_dgrad_int8_stochastic(37, 200, 256, ablock, bblock, "cpu")


@interp_only
def test_interp_nonfinite_input_raises():
    check_nonfinite("cpu")
    check_nonfinite("cpu", {"KERNEL": "chunked"})


# the row-resident kernels with a persistent grid smaller than the tile count (each program loops),
# at GPT-2 XL's width (13 chunks held as 16) and with a row tail (9 rows, 2 per tile)
PERSISTENT = {"PROGRAMS": 3, "TILE": 32}


@interp_only
def test_interp_resident_kernels_persistent_at_1600():
    check_layernorm(9, 1600, torch.bfloat16, True, 128, (1, -1), "cpu", plan=PERSISTENT)
    check_layernorm_int8_grad(9, 1600, torch.bfloat16, True, "cpu", plan=dict(PERSISTENT, TILE=2))
    check_gelu(9, 1600, torch.bfloat16, 128, (1, -1), "cpu", plan=PERSISTENT)


@interp_only
@pytest.mark.parametrize("hadamard,block", FORMATS)
def test_interp_chunked_kernels(hadamard, block):
    check_layernorm(19, 200, torch.float32, True, hadamard, block, "cpu", plan={"KERNEL": "chunked"})
    check_layernorm_int8_grad(19, 200, torch.float32, False, "cpu", plan={"KERNEL": "chunked"})
    check_gelu(19, 384, torch.bfloat16, hadamard, block, "cpu", plan={"KERNEL": "chunked"})


@interp_only
def test_interp_nan_propagates():
    check_nan_propagates("cpu")


@interp_only
@pytest.mark.parametrize("recipe", ["int8", "int8_delayed"])
def test_interp_dataflow_linear_wgrad(recipe):
    check_dataflow_linear_wgrad(recipe, "cpu")


@pytest.mark.skipif(IN_CHILD, reason="parent-process test")
def test_reference_dataflow_linear_wgrad():
    check_dataflow_linear_wgrad("int8_delayed", "cpu")


@interp_only
def test_interp_rotate_back():
    check_rotate_back(70, 256, 200, 128, "cpu")
    check_rotate_back(33, 64, 64, 32, "cpu")


@pytest.mark.skipif(IN_CHILD, reason="parent-process test")
def test_reference_rotate_back():
    check_rotate_back(70, 256, 200, 128, "cpu")


@interp_only
@pytest.mark.parametrize("R,C,hadamard,rounding,delayed", [(200, 96, 32, "nearest", False),
                                                           (200, 96, 32, "stochastic", True),
                                                           (77, 256, 128, "nearest", True)])
def test_interp_requantize_transposed(R, C, hadamard, rounding, delayed):
    check_requantize_transposed(R, C, hadamard, rounding, delayed, "cpu")


@interp_only
@pytest.mark.parametrize("R,C,hadamard,rounding,delayed", [(200, 96, 32, "stochastic", False),
                                                           (77, 256, 128, "nearest", True)])
def test_interp_requantize_rotated_back(R, C, hadamard, rounding, delayed):
    check_requantize_rotated_back(R, C, hadamard, rounding, delayed, "cpu")


# --------------------------------------------------------------------------------------------------
# CPU reference: the INT8 incoming gradient
@pytest.mark.skipif(IN_CHILD, reason="parent-process test")
def test_reference_dgrad_int8_output_rounds_stochastically(monkeypatch):
    monkeypatch.setenv("MEGAQ_KERNELS", "reference")
    check_dgrad_int8_stochastic(37, 200, 256, (1, -1), (1, -1), "cpu")


@pytest.mark.skipif(IN_CHILD, reason="parent-process test")
def test_layernorm_backward_from_sr_int8_gradient_is_unbiased(monkeypatch):
    """The reference LayerNorm backward reading SR-quantized INT8 gradients, against the exact FP32
    backward from the same saved input: noisy per draw, unbiased over draws (bounds: module doc)."""
    monkeypatch.setenv("MEGAQ_KERNELS", "reference")
    R, C, draws = 64, 384, 100
    x = _data((R, C), "cpu", torch.float32, seed=4)
    g = _data((R, C), "cpu", torch.float32, seed=5, scale=1.0, shift=0.0)
    w = 1 + 0.1 * torch.randn(C, generator=torch.Generator().manual_seed(6))
    _, mean, rstd = kd.layernorm_forward_math(x, w, None, 1e-5)
    x_q = quantize_blockwise(x, kd.SAVE_BLOCK)
    exact = kd.layernorm_backward_math(x_q.dequantize().double(), mean.double(), rstd.double(),
                                       w.double(), g.double())
    totals, singles = [0.0, 0.0, 0.0], None
    for seed in range(draws):
        got = kd.layernorm_backward(x_q, mean, rstd, w, _sr_quantized(g, seed), out_dtype=torch.float32)
        totals = [t + v.double() for t, v in zip(totals, got)]
        singles = singles or [v.double() for v in got]
    for name, total, single, ref in zip(("dx", "dw", "db"), totals, singles, exact):
        e_single, e_mean = _rel(single, ref), _rel(total / draws, ref)
        assert 1e-3 < e_single < 0.05, (name, e_single)
        assert e_mean < 0.15 * e_single, (name, e_mean, e_single)


# --------------------------------------------------------------------------------------------------
# GPU
@gpu
@pytest.mark.parametrize("hadamard,block", FORMATS)
@pytest.mark.parametrize("R,C,dtype,residual", [(4099, 1600, torch.bfloat16, True),
                                                 (2053, 4096, torch.bfloat16, False),
                                                 (300, 384, torch.float32, True)])
def test_gpu_layernorm(R, C, dtype, residual, hadamard, block):
    check_layernorm(R, C, dtype, residual, hadamard, block, "cuda")
    if dtype == torch.bfloat16:
        check_layernorm(R, C, dtype, residual, hadamard, block, "cuda", round_to=torch.bfloat16)


@gpu
@pytest.mark.parametrize("hadamard,block", FORMATS)
@pytest.mark.parametrize("R,N,dtype", [(4099, 6400, torch.bfloat16), (300, 1536, torch.float32)])
def test_gpu_gelu(R, N, dtype, hadamard, block):
    check_gelu(R, N, dtype, hadamard, block, "cuda")
    if dtype == torch.bfloat16:
        check_gelu(R, N, dtype, hadamard, block, "cuda", round_to=torch.bfloat16)


@gpu
@pytest.mark.parametrize("R,C,residual", [(8192, 1600, True), (4096, 2048, False), (4099, 1600, True)])
def test_gpu_layernorm_backward_int8_gradient(R, C, residual):
    check_layernorm_int8_grad(R, C, torch.bfloat16, residual, "cuda")


@gpu
@pytest.mark.parametrize("ablock,bblock", [((1, -1), (1, -1)), ((1, 128), (128, 128))])
def test_gpu_dgrad_int8_output_rounds_stochastically(ablock, bblock):
    # the dgrad of fc1 at GPT-2 XL width: ∇X [tokens, 1600] from ∇Y [tokens, 6400] (Hadamard-padded)
    check_dgrad_int8_stochastic(4099, 1600, 6400, ablock, bblock, "cuda")


@gpu
def test_gpu_nonfinite_input_raises():
    check_nonfinite("cuda")


@gpu
def test_gpu_nan_propagates():
    check_nan_propagates("cuda")


@gpu
@pytest.mark.parametrize("recipe", ["int8", "int8_delayed"])
def test_gpu_dataflow_linear_wgrad(recipe):
    check_dataflow_linear_wgrad(recipe, "cuda")


@gpu
def test_gpu_rotate_back():
    check_rotate_back(16384, 4096, 4096, 128, "cuda")
    check_rotate_back(6400, 1664, 1600, 128, "cuda")


@gpu
@pytest.mark.parametrize("R,C,rounding,delayed", [(4099, 1664, "nearest", False), (16384, 1664, "stochastic", True),
                                                  (8192, 6400, "nearest", True)])
def test_gpu_requantize_transposed(R, C, rounding, delayed):
    check_requantize_transposed(R, C, 128, rounding, delayed, "cuda")


@gpu
@pytest.mark.parametrize("R,C,rounding,delayed", [(4099, 1664, "stochastic", False), (16384, 6400, "nearest", True)])
def test_gpu_requantize_rotated_back(R, C, rounding, delayed):
    check_requantize_rotated_back(R, C, 128, rounding, delayed, "cuda")


@gpu
@pytest.mark.parametrize("plan", [{"KERNEL": "chunked"}, {"PROGRAMS": 7}])
def test_gpu_other_plans(plan):
    """The chunked fallback (rows too long to hold) and a persistent grid of 7 programs."""
    check_layernorm(4099, 1600, torch.bfloat16, True, 128, (1, -1), "cuda", plan=plan)
    check_layernorm_int8_grad(4099, 1600, torch.bfloat16, True, "cuda", plan=plan)
    check_gelu(4099, 6400, torch.bfloat16, 128, (1, -1), "cuda", plan=plan)
