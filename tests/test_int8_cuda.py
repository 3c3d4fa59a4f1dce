"""The Hopper INT8 GEMM of csrc/int8_gemm (megaq._C.int8_gemm via megaq.kernels.cuda_ext.int8_gemm),
and its routing from megaq.kernels.scaled_mm.

GPU tests (marked `gpu`) need an sm_90 GPU and an extension built with sm_90a code; elsewhere they
skip. They compare the kernel with an exact reference: the int8 operands and FP32 scales multiplied
in float64. Bounds:
  * rowcol, unit scales, float32 output: bit-exact (the INT32 sum is exact and |acc| < 2^24 here,
    so float(acc) is too);
  * float32 output: relative Frobenius error <= 1e-6 (rowcol: float(acc), sa*sb and their product
    round once each, <= ~2^-22 per element; block128 adds one FP32 rounding per K-block of 128);
  * bfloat16 output: relative Frobenius error <= 4e-3 (one more rounding to 8 significant bits,
    2^-9 per element at most).
A NaN scale must make the outputs it touches NaN.
"""

from __future__ import annotations

import pytest
import torch

from megaq import kernels
from megaq.kernels import cuda_ext, gemm
from megaq.quant import quantize_blockwise

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------- CPU


def test_wrapper_refuses_cpu_tensors_with_a_clear_error():
    a = torch.zeros(4, 32, dtype=torch.int8)
    s = torch.ones(4, 1)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_ext.int8_gemm(a, a, s, s)
    with pytest.raises(ValueError, match="mode"):
        cuda_ext.int8_gemm(a, a, s, s, mode="blocked64")
    with pytest.raises(ValueError, match="out_dtype"):
        cuda_ext.int8_gemm(a, a, s, s, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="writes bfloat16"):
        cuda_ext.int8_gemm(a, a, s, s, out_dtype=torch.float32, gelu_input=(a, s))


def test_scaled_mm_gelu_backward_reference_is_the_two_steps():
    """Off the CUDA kernel, scaled_mm(gelu_grad_of=h) is the product in out_dtype, then the GELU
    backward; a GELU input of another shape or block is refused."""
    from megaq.kernels.dataflow import gelu_backward
    qa = quantize_blockwise(torch.randn(8, 64), (1, -1))
    qb = quantize_blockwise(torch.randn(256, 64), (1, -1))
    h = quantize_blockwise(torch.randn(8, 256) * 3, (1, 128))
    out = kernels.scaled_mm(qa, qb, out_dtype=torch.bfloat16, gelu_grad_of=h)
    assert torch.equal(out, gelu_backward(h, kernels.scaled_mm(qa, qb, out_dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="gelu_grad_of must be an INT8"):
        kernels.scaled_mm(qa, qb, gelu_grad_of=quantize_blockwise(torch.randn(8, 256), (1, 64)))


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only behaviour")
def test_not_available_without_cuda():
    assert not cuda_ext.int8_gemm_available()
    assert not cuda_ext.int8_gemm_available("cpu")


def test_dispatch_choice_is_validated_and_cpu_stays_off_cuda(monkeypatch):
    x = torch.randn(8, 64)
    qa = quantize_blockwise(x, (1, -1))
    qb = quantize_blockwise(torch.randn(16, 64), (1, -1))
    args = (qa, qb, qa.data, qb.data, "rowcol", 0, 1, 1, torch.bfloat16)
    monkeypatch.setenv("MEGAQ_INT8_GEMM", "fastest")
    with pytest.raises(ValueError, match="MEGAQ_INT8_GEMM"):
        gemm._cuda_int8_mode(*args)
    for choice in ("auto", "cuda", "triton"):
        monkeypatch.setenv("MEGAQ_INT8_GEMM", choice)
        assert gemm._cuda_int8_mode(*args) is None   # CPU operands: never the CUDA kernel


# ---------------------------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def dev():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the INT8 wgmma GEMM needs an sm_90 GPU (H100 / H200)")
    if not cuda_ext.int8_gemm_available():
        pytest.skip(f"int8_gemm unavailable: {cuda_ext.extension_unavailable_reason() or 'no sm_90a code'}")
    return torch.device("cuda")


def _operands(m, n, k, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=g, device=dev, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, device=dev, dtype=torch.int8)
    return a, b, g


def _scales(rows, cols, g, dev):
    return torch.rand(rows, cols, generator=g, device=dev) * 0.01 + 1e-3


def _ref_rowcol(a, b, sa, sb, bias):
    ref = (a.double() @ b.double().T) * sa.double().reshape(-1, 1) * sb.double().reshape(1, -1)
    return ref + bias.double() if bias is not None else ref


def _ref_block128(a, b, sa, sb, sb_rows, bias):
    k = a.shape[1]
    nkb = -(-k // 128)
    sa_full = sa.double().expand(a.shape[0], nkb).repeat_interleave(128, 1)[:, :k]
    sb_full = sb.double().expand(sb.shape[0], nkb).repeat_interleave(sb_rows, 0)[:b.shape[0]]
    sb_full = sb_full.repeat_interleave(128, 1)[:, :k]
    ref = (a.double() * sa_full) @ (b.double() * sb_full).T
    return ref + bias.double() if bias is not None else ref


_BOUND = {torch.float32: 1e-6, torch.bfloat16: 4e-3}
# (M, N, K): M 1 / 77 / 1000, N 384 / 1600 / 6400 + tails, K 16 and multiples of 16 that are not
# multiples of 128 (the TMA engine zero-fills the last K tile)
SHAPES = [(1, 384, 384), (77, 1600, 1600), (1000, 6472, 4096), (129, 130, 16), (300, 257, 48),
          (1000, 1601, 400)]


@gpu
@pytest.mark.parametrize("tile", [0, 1, 2])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_rowcol_matches_fp64(dev, m, n, k, tile):
    a, b, g = _operands(m, n, k, dev, seed=m + n + k)
    sa, sb = _scales(m, 1, g, dev), _scales(n, 1, g, dev)
    for out_dtype, bias in ((torch.float32, None), (torch.bfloat16, torch.randn(n, generator=g, device=dev))):
        out = cuda_ext.int8_gemm(a, b, sa, sb, bias=bias, out_dtype=out_dtype, tile=tile)
        assert out.dtype == out_dtype and out.shape == (m, n)
        err = _rel(out, _ref_rowcol(a, b, sa, sb, bias))
        assert err <= _BOUND[out_dtype], (m, n, k, tile, out_dtype, err)


@gpu
@pytest.mark.parametrize("m,n,k", [(1000, 6472, 4096), (4099, 1664, 2048), (300, 257, 48)])
def test_bf16_output_is_the_fp32_output_rounded(dev, m, n, k):
    """BF16 output (TMA stores where the rows are 16-byte aligned, register stores otherwise) is the FP32
    output rounded to nearest even, bit for bit: what lets a caller ask the epilogue for BF16 instead
    of casting an FP32 output (the INT8 data flow's dgrad)."""
    a, b, g = _operands(m, n, k, dev, seed=m + 3 * n + k)
    sa, sb = _scales(m, 1, g, dev), _scales(n, 1, g, dev)
    out32 = cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=torch.float32)
    out16 = cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=torch.bfloat16)
    assert torch.equal(out16, out32.bfloat16())


@gpu
@pytest.mark.parametrize("mode,tile", [("rowcol", 0), ("rowcol", 1), ("rowcol", 2), ("block128", 0),
                                       ("block128", 3)])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_output_is_the_fp32_output_requantized(dev, m, n, k, mode, tile):
    """INT8 output (the data flow's epilogue): `quantize_blockwise` of the FP32 output with (1, 128)
    blocks, nearest — the scales bit for bit, the values too except within 1.5 ulp of a rounding tie
    (the kernel multiplies by the reciprocal scale: one step, on ≤ 1e-4 of them) — including the bias,
    N tails (a last block narrower than 128) and rows past M. The reference runs on the CPU: CUDA
    PyTorch divides by a scalar as a product with its reciprocal, not the IEEE division the kernel
    and the CPU do."""
    a, b, g = _operands(m, n, k, dev, seed=m + 5 * n + k)
    if mode == "rowcol":
        sa, sb, rows = _scales(m, 1, g, dev), _scales(n, 1, g, dev), 1
    else:
        nkb = -(-k // 128)
        sa, sb, rows = _scales(m, nkb, g, dev), _scales(-(-n // 128), nkb, g, dev), 128
    bias = torch.randn(n, generator=g, device=dev)
    out32 = cuda_ext.int8_gemm(a, b, sa, sb, mode=mode, scale_b_rows=rows, bias=bias, out_dtype=torch.float32,
                               tile=tile)
    q, s = cuda_ext.int8_gemm(a, b, sa, sb, mode=mode, scale_b_rows=rows, bias=bias, out_dtype=torch.int8,
                              tile=tile)
    ref = quantize_blockwise(out32.cpu(), (1, 128))
    assert q.dtype == torch.int8 and q.shape == (m, n) and s.shape == (m, -(-n // 128))
    assert torch.equal(s.cpu(), ref.scale)
    _assert_near_ties_only(q.cpu(), ref.data)
    assert int(q.abs().max()) == 127   # every block's abs-max maps to ±127


@gpu
@pytest.mark.parametrize("m,n,k", [(4099, 1664, 2048), (77, 1600, 1600), (130, 384, 48), (1000, 6400, 4096)])
def test_int8_output_tma_is_the_staged_output(dev, m, n, k):
    """The default launch's INT8 epilogue (TMA stores from a swizzled shared-memory tile, rows 16-byte
    aligned) writes what the 4-stage kernel's staged stores write, bit for bit, scales included:
    row and column tails of the tile, a bias, and an N tail inside a 128-column block."""
    a, b, g = _operands(m, n, k, dev, seed=m + 7 * n + k)
    sa, sb = _scales(m, 1, g, dev), _scales(n, 1, g, dev)
    bias = torch.randn(n, generator=g, device=dev)
    q_tma, s_tma = cuda_ext.int8_gemm(a, b, sa, sb, bias=bias, out_dtype=torch.int8, tile=0)
    q_old, s_old = cuda_ext.int8_gemm(a, b, sa, sb, bias=bias, out_dtype=torch.int8, tile=1)
    assert torch.equal(s_tma, s_old)
    assert torch.equal(q_tma, q_old)
    assert int(q_tma.abs().max()) == 127


@gpu
@pytest.mark.parametrize("m,n,k,ldc", [(300, 301, 384, 320), (77, 1601, 1600, 1616), (300, 304, 384, 320)])
def test_outputs_never_written_past_n_in_a_strided_out(dev, m, n, k, ldc):
    """BF16 and INT8 out into rows of ldc > N elements, 16-byte aligned: the default launch takes TMA
    stores only where a row is whole 16-byte pieces (N = 304 INT8; the others fall back to staged
    stores: TMA wrote the rest of the last 16-byte piece past N on an H100), and the values are the
    FP32 output's, rounded or requantized."""
    a, b, g = _operands(m, n, k, dev, seed=m + n)
    sa, sb = _scales(m, 1, g, dev), _scales(n, 1, g, dev)
    out32 = cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=torch.float32)
    full16 = torch.full((m, ldc), 7.0, device=dev, dtype=torch.bfloat16)
    cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=torch.bfloat16, out=full16[:, :n])
    assert torch.equal(full16[:, :n], out32.bfloat16())
    assert (full16[:, n:] == 7.0).all()
    full8 = torch.full((m, ldc), -128, device=dev, dtype=torch.int8)
    q, s = cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=torch.int8, out=full8[:, :n])
    ref = quantize_blockwise(out32.cpu(), (1, 128))
    assert torch.equal(s.cpu(), ref.scale)
    _assert_near_ties_only(q.cpu(), ref.data)
    assert (full8[:, n:] == -128).all()


def _assert_near_ties_only(q, ref_q):
    step = (q.int() - ref_q.int()).abs()
    assert int(step.max()) <= 1 and float((step > 0).float().mean()) <= 1e-4, \
        (int(step.max()), float((step > 0).float().mean()))


@gpu
@pytest.mark.parametrize("pad", [0, 1, 2, 8])
def test_int8_output_rows_not_16_byte_aligned(dev, pad):
    """INT8 out into a strided `out` (pad 0: 16-byte aligned rows, but N = 301 not whole 16-byte
    pieces, so the staged stores, not TMA; else the per-fragment stores): nothing written past N (-128
    never comes out of the kernel: it clamps to ±127)."""
    a, b, g = _operands(300, 301, 384, dev, seed=11 + pad)
    sa, sb = _scales(300, 1, g, dev), _scales(301, 1, g, dev)
    ref = quantize_blockwise(cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=torch.float32).cpu(), (1, 128))
    width = 320 if pad == 0 else 301 + pad
    full = torch.full((300, width), -128, device=dev, dtype=torch.int8)
    q, s = cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=torch.int8, out=full[:, :301])
    assert q.data_ptr() == full.data_ptr()
    assert torch.equal(s.cpu(), ref.scale)
    _assert_near_ties_only(q.cpu(), ref.data)
    assert (full[:, 301:] == -128).all()


@gpu
def test_int8_output_nan_and_zero_blocks(dev):
    """A NaN scale gives its row's blocks NaN scales (never a finite-looking block); an all-zero block
    gets scale 1 and zeros, as the reference."""
    a, b, g = _operands(200, 300, 384, dev, seed=12)
    a[4] = 0
    sa, sb = _scales(200, 1, g, dev), _scales(300, 1, g, dev)
    sa[3] = float("nan")
    q, s = cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=torch.int8)
    assert torch.isnan(s[3]).all()
    assert torch.isfinite(s[torch.arange(200, device=dev) != 3]).all()
    assert (s[4] == 1).all() and (q[4] == 0).all()


@gpu
@pytest.mark.parametrize("tile", [0, 1, 2])
def test_rowcol_int32_part_is_exact(dev, tile):
    a, b, _ = _operands(1000, 1000, 1600, dev, seed=3)
    exact = a.double() @ b.double().T
    assert float(exact.abs().max()) < 2 ** 24   # so float(acc) is exact too
    ones_a, ones_b = torch.ones(1000, device=dev), torch.ones(1000, device=dev)
    out = cuda_ext.int8_gemm(a, b, ones_a, ones_b, out_dtype=torch.float32, tile=tile)
    assert torch.equal(out.double(), exact)


@gpu
@pytest.mark.parametrize("tile", [0, 2, 3])
@pytest.mark.parametrize("sb_rows", [128, 1])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_block128_matches_fp64(dev, m, n, k, sb_rows, tile):
    a, b, g = _operands(m, n, k, dev, seed=m + 2 * n + k)
    nkb = -(-k // 128)
    sa, sb = _scales(m, nkb, g, dev), _scales(-(-n // sb_rows), nkb, g, dev)
    for out_dtype, bias in ((torch.float32, torch.randn(n, generator=g, device=dev)), (torch.bfloat16, None)):
        out = cuda_ext.int8_gemm(a, b, sa, sb, mode="block128", scale_b_rows=sb_rows, bias=bias,
                                 out_dtype=out_dtype, tile=tile)
        err = _rel(out, _ref_block128(a, b, sa, sb, sb_rows, bias))
        assert err <= _BOUND[out_dtype], (m, n, k, sb_rows, tile, out_dtype, err)


@gpu
def test_block128_with_one_scale_per_row_and_strided_scales(dev):
    """An A scale per row over all of K ([M, 1]: K-block stride 0) and a transposed (strided) B grid,
    as the dispatcher passes them (and as rowcol above 133143 of K runs)."""
    a, b, g = _operands(1000, 1000, 4096, dev, seed=5)
    sa = _scales(1000, 1, g, dev)
    sb = _scales(32, 1000, g, dev).t()          # [N, 32] with strides (1, N)
    out = cuda_ext.int8_gemm(a, b, sa, sb, mode="block128", out_dtype=torch.float32)
    assert _rel(out, _ref_block128(a, b, sa, sb.contiguous(), 1, None)) <= 1e-6


@gpu
def test_large_tiles_and_row_tails(dev):
    a, b, g = _operands(16384, 6400 + 40, 1600, dev, seed=6)
    sa, sb = _scales(16384, 1, g, dev), _scales(6440, 1, g, dev)
    out = cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=torch.bfloat16)
    assert _rel(out, _ref_rowcol(a, b, sa, sb, None)) <= 4e-3
    sa, sb = _scales(16384, 13, g, dev), _scales(51, 13, g, dev)
    out = cuda_ext.int8_gemm(a, b, sa, sb, mode="block128", scale_b_rows=128, out_dtype=torch.bfloat16)
    assert _rel(out, _ref_block128(a, b, sa, sb, 128, None)) <= 4e-3


@gpu
@pytest.mark.parametrize("pad", [1, 2, 8])
def test_output_rows_not_16_byte_aligned(dev, pad):
    """`out` with a row stride that breaks 16-byte (and 2-element) alignment: the per-fragment stores."""
    a, b, g = _operands(300, 301, 384, dev, seed=pad)
    sa, sb = _scales(300, 1, g, dev), _scales(301, 1, g, dev)
    for out_dtype in (torch.float32, torch.bfloat16):
        full = torch.full((300, 301 + pad), float("nan"), device=dev, dtype=out_dtype)
        out = cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=out_dtype, out=full[:, :301])
        assert _rel(out, _ref_rowcol(a, b, sa, sb, None)) <= _BOUND[out_dtype]
        assert torch.isnan(full[:, 301:]).all()   # nothing written past N
        sa3, sb3 = _scales(300, 3, g, dev), _scales(3, 3, g, dev)
        out = cuda_ext.int8_gemm(a, b, sa3, sb3, mode="block128", scale_b_rows=128, out_dtype=out_dtype,
                                 out=full[:, :301])
        assert _rel(out, _ref_block128(a, b, sa3, sb3, 128, None)) <= _BOUND[out_dtype]


@gpu
def test_nan_scales_give_nan(dev):
    a, b, g = _operands(200, 300, 384, dev, seed=9)
    sa, sb = _scales(200, 1, g, dev), _scales(300, 1, g, dev)
    sa[3] = float("nan")
    sb[7] = float("nan")
    out = cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=torch.float32)
    nan = torch.isnan(out)
    assert nan[3].all() and nan[:, 7].all() and int(nan.sum()) == 300 + 200 - 1
    sa, sb = _scales(200, 3, g, dev), _scales(3, 3, g, dev)
    sa[5, 1] = float("nan")     # one K-block of one row
    sb[2, 2] = float("inf")     # one K-block of columns 256..299: inf * int != finite
    out = cuda_ext.int8_gemm(a, b, sa, sb, mode="block128", scale_b_rows=128, out_dtype=torch.bfloat16)
    assert torch.isnan(out[5]).all()
    assert not torch.isfinite(out[:, 256:]).any()
    assert torch.isfinite(out[:5, :256]).all()


@gpu
def test_bad_inputs_name_the_problem(dev):
    a, b, g = _operands(64, 64, 128, dev)
    s64 = _scales(64, 1, g, dev)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cuda_ext.int8_gemm(a[:, :100], b[:, :100], s64, s64)
    with pytest.raises(RuntimeError, match="a must be int8; got"):
        cuda_ext.int8_gemm(a.to(torch.uint8), b, s64, s64)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        cuda_ext.int8_gemm(a.t(), b, s64, s64)
    with pytest.raises(RuntimeError, match="same K"):
        cuda_ext.int8_gemm(a, b[:, :112], s64, s64)
    with pytest.raises(RuntimeError, match="scale_a must have shape"):
        cuda_ext.int8_gemm(a, b, _scales(63, 1, g, dev), s64)
    with pytest.raises(RuntimeError, match="scale_b must have shape"):
        cuda_ext.int8_gemm(a, b, s64, _scales(64, 2, g, dev))   # rowcol: one scale per row
    with pytest.raises(RuntimeError, match="scale_a must be on"):
        cuda_ext.int8_gemm(a, b, s64.cpu(), s64)
    with pytest.raises(RuntimeError, match="scale_b_rows"):
        cuda_ext.int8_gemm(a, b, s64, s64, mode="block128", scale_b_rows=64)
    with pytest.raises(ValueError, match="out must be"):
        cuda_ext.int8_gemm(a, b, s64, s64, out=torch.empty(64, 65, device=dev, dtype=torch.bfloat16))
    ext = cuda_ext.load_extension()
    q8 = torch.empty(64, 64, dtype=torch.int8, device=dev)
    with pytest.raises(RuntimeError, match="int8 out needs out_scale"):
        ext.int8_gemm(a, b, q8, s64, s64, None, "rowcol", 1, 0, 0)
    with pytest.raises(RuntimeError, match="out_scale must be a float32"):
        ext.int8_gemm(a, b, q8, s64, s64, None, "rowcol", 1, 0, 0, torch.empty(64, 2, device=dev))
    with pytest.raises(RuntimeError, match="out_scale is for int8 out only"):
        ext.int8_gemm(a, b, torch.empty(64, 64, device=dev), s64, s64, None, "rowcol", 1, 0, 0,
                      torch.empty(64, 1, device=dev))
    with pytest.raises(RuntimeError, match="K <= 133143"):
        big = torch.zeros(1, 133152, dtype=torch.int8, device=dev)
        cuda_ext.int8_gemm(big, big, torch.ones(1, device=dev), torch.ones(1, device=dev))


def _quantized_linear_operands(dev, out_features: int, ablock, bblock, seed: int):
    """A linear's operands as scaled_mm takes them: 1000 tokens x 1600 features (BF16, quantized with
    `ablock`), the weight [out_features, 1600] (quantized with `bblock`) and an FP32 bias."""
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(1000, 1600, generator=g, device=dev).bfloat16()
    w = torch.randn(out_features, 1600, generator=g, device=dev).bfloat16()
    bias = torch.randn(out_features, generator=g, device=dev)
    return kernels.quantize(x, ablock), kernels.quantize(w, bblock), bias


def _record_cuda_calls(monkeypatch, key: str) -> list:
    """Calls of cuda_ext.int8_gemm from here on, as the value of their keyword `key` each (the call
    still runs)."""
    calls = []
    real = cuda_ext.int8_gemm
    monkeypatch.setattr(cuda_ext, "int8_gemm", lambda *a, **k: calls.append(k[key]) or real(*a, **k))
    return calls


def _on_triton_then(monkeypatch, choice: str, key: str, call):
    """`call()` with MEGAQ_INT8_GEMM=triton (it must make no CUDA GEMM call), then with `choice`: both
    results, and the list of the CUDA calls' `key` values (`_record_cuda_calls`, still recording)."""
    calls = _record_cuda_calls(monkeypatch, key)
    monkeypatch.setenv("MEGAQ_INT8_GEMM", "triton")
    on_triton = call()
    assert calls == []
    monkeypatch.setenv("MEGAQ_INT8_GEMM", choice)
    return on_triton, call(), calls


@gpu
@pytest.mark.parametrize("ablock,bblock", [((1, -1), (1, -1)), ((1, 128), (128, 128)), ((1, 128), (1, 128))])
def test_scaled_mm_routes_to_the_cuda_kernel(dev, monkeypatch, ablock, bblock):
    """MEGAQ_INT8_GEMM=cuda sends every supported plan to csrc/int8_gemm (and its result matches the
    Triton kernel's), =triton never does."""
    qa, qb, bias = _quantized_linear_operands(dev, 384, ablock, bblock, seed=1)
    triton_out, out, calls = _on_triton_then(monkeypatch, "cuda", "mode",
                                             lambda: kernels.scaled_mm(qa, qb, out_dtype=torch.float32, bias=bias))
    assert calls == ["rowcol" if ablock == (1, -1) else "block128"]
    assert _rel(out, triton_out.double()) <= 1e-6
    assert kernels.scaled_mm(qa, qb, out_dtype=torch.bfloat16).dtype == torch.bfloat16


@gpu
def test_scaled_mm_int8_output_on_the_cuda_kernel(dev, monkeypatch):
    """scaled_mm(out_dtype=int8) with (1, 128) blocks and nearest rounding runs in the CUDA epilogue;
    it agrees with the Triton epilogue (the two compute the FP32 value in a different order: scales
    within 1e-6, at most one INT8 step apart, on almost no elements), and stochastic rounding stays on
    Triton."""
    qa, qb, bias = _quantized_linear_operands(dev, 6400, (1, -1), (1, -1), seed=2)
    ref, out, calls = _on_triton_then(monkeypatch, "auto", "out_dtype",
                                      lambda: kernels.scaled_mm(qa, qb, out_dtype=torch.int8, bias=bias))
    assert calls == [torch.int8]
    assert out.block == ref.block == (1, 128) and out.shape == ref.shape
    assert float(((out.scale - ref.scale).abs() / ref.scale).max()) <= 1e-6
    step = (out.data.int() - ref.data.int()).abs()
    assert int(step.max()) <= 1 and float(step.float().mean()) < 1e-3
    kernels.scaled_mm(qa, qb, out_dtype=torch.int8, bias=bias, out_rounding="stochastic")
    assert calls == [torch.int8]   # stochastic: the Triton epilogue


# ------------------------------------------------------------------------ the GELU-backward epilogue
def _gelu_input(m, n, dev, seed):
    """A GELU's INT8 input in (1, 128) blocks, as fc1's epilogue writes it (values ~ 3·N(0, 1) - 0.5)."""
    h = torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * 3.0 - 0.5
    q = quantize_blockwise(h, (1, 128), 8, "nearest")
    return type(q)(q.data.to(dev), q.scale.to(dev), q.block, q.bits, q.shape)


@gpu
@pytest.mark.parametrize("m,n,k", [(1000, 1600, 384), (77, 200, 1600), (300, 6472, 4096), (129, 136, 48)])
def test_gelu_backward_epilogue_matches_fp64(dev, m, n, k):
    """gelu_input: the product rounded to BF16, times GELU'(h) in FP32, rounded again (the two-step
    path's roundings; row and column tails of the tiles), against the FP64 product times FP64 GELU' of
    the same INT8 h: two half-ulp roundings are within 2^-7 relative (the FP32 math and its
    approximate exp2 and reciprocal are ~2^-20), plus 1e-6 of the largest value. A NaN h scale makes
    its block NaN."""
    from megaq.kernels.dataflow import gelu_tanh_grad
    a, b, g = _operands(m, n, k, dev, seed=m + 5 * n + k)
    sa, sb = _scales(m, 1, g, dev), _scales(n, 1, g, dev)
    h = _gelu_input(m, n, dev, seed=n)
    out = cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=torch.bfloat16, gelu_input=(h.data, h.scale))
    ref = _ref_rowcol(a, b, sa, sb, None) * gelu_tanh_grad(h.dequantize(torch.float64))
    assert out.dtype == torch.bfloat16 and out.shape == (m, n) and bool(torch.isfinite(out).all())
    tol = 2.0 ** -7 * ref.abs() + 1e-6 * float(ref.abs().max())
    assert bool(((out.double() - ref).abs() <= tol).all()), _rel(out, ref)
    bad = h.scale.clone()
    bad[m // 2, 0] = float("nan")
    out = cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=torch.bfloat16, gelu_input=(h.data, bad))
    nan = torch.isnan(out)
    assert bool(nan[m // 2, :min(n, 128)].all()) and int(nan.sum()) == min(n, 128)


@gpu
def test_gelu_backward_epilogue_refuses_what_it_does_not_run(dev):
    a, b, g = _operands(64, 256, 128, dev)
    sa, sb = _scales(64, 1, g, dev), _scales(256, 1, g, dev)
    h = _gelu_input(64, 256, dev, seed=1)
    with pytest.raises(ValueError, match="writes bfloat16"):
        cuda_ext.int8_gemm(a, b, sa, sb, out_dtype=torch.float32, gelu_input=(h.data, h.scale))
    with pytest.raises(RuntimeError, match="no bias"):
        cuda_ext.int8_gemm(a, b, sa, sb, bias=torch.zeros(256, device=dev), gelu_input=(h.data, h.scale))
    with pytest.raises(RuntimeError, match="gelu_q must be an int8"):
        cuda_ext.int8_gemm(a, b, sa, sb, gelu_input=(h.data[:, :128], h.scale))
    with pytest.raises(RuntimeError, match="gelu_scale must be a float32"):
        cuda_ext.int8_gemm(a, b, sa, sb, gelu_input=(h.data, h.scale[:32]))
    a, b, g = _operands(64, 100, 128, dev)           # rows of 200 bytes: no TMA stores
    h = _gelu_input(64, 100, dev, seed=2)
    with pytest.raises(RuntimeError, match="16-byte aligned rows"):
        cuda_ext.int8_gemm(a, b, sa, _scales(100, 1, g, dev), gelu_input=(h.data, h.scale))


@gpu
def test_scaled_mm_gelu_backward_on_the_cuda_kernel(dev, monkeypatch):
    """scaled_mm(gelu_grad_of=h) (the data flow's fc2 dgrad) runs in the CUDA epilogue for BF16 out and
    agrees with the two-step path (the product in BF16, then the Triton GELU backward: one rounding
    more) within 4e-3 relative."""
    qa, qb, _ = _quantized_linear_operands(dev, 6400, (1, -1), (1, -1), seed=3)
    h = _gelu_input(1000, 6400, dev, seed=4)
    two_step, fused, calls = _on_triton_then(
        monkeypatch, "auto", "out_dtype", lambda: kernels.scaled_mm(qa, qb, out_dtype=torch.bfloat16, gelu_grad_of=h))
    assert calls == [torch.bfloat16] and fused.dtype == torch.bfloat16
    assert _rel(fused, two_step.double()) <= 4e-3
    with pytest.raises(ValueError, match="gelu_grad_of must be an INT8"):
        kernels.scaled_mm(qa, qb, out_dtype=torch.bfloat16, gelu_grad_of=_gelu_input(1000, 640, dev, seed=5))
