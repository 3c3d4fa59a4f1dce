"""megaq.kernels INT8: the Triton quantizers and block-scaled GEMMs against their megaq.quant reference.

Three ways these run:
  * CPU, interpreter (CI): `test_triton_kernels_under_interpreter` re-runs this file in a subprocess
    with TRITON_INTERPRET=1 and MEGAQ_KERNELS=triton (TRITON_INTERPRET must be set before triton is
    imported, hence the subprocess), which runs the `interp`-named tests on small awkward shapes with
    tiny tiles (both the TMA-descriptor and the pointer load paths, every INT32->FP32 conversion);
  * CPU, plain: dispatch falls back to the reference bit for bit; MEGAQ_KERNELS is honoured;
  * GPU (`gpu` marker, skipped without CUDA): the same checks on real shapes (hidden 384 / 1600,
    M not a multiple of the tile, N > 4096) with the tuned sm_90 configurations.

Bounds (all on random, never all-zero inputs; NaN never passes: every comparison fails on NaN):
  * quantize, nearest: scales bit-exact, payload bit-exact (IEEE division + round-half-even, as the
    reference). Fused Hadamard + quantize: the rotation's FP32 sums differ in order from the reference's
    matmul, so payloads may differ by ±1 at near-ties: |diff| <= 1 on <= 0.1% of elements, scales
    relative error <= 1e-6.
  * quantize, stochastic: q in {floor(v), floor(v)+1}, |q| <= 127, unbiased (mean of q - v over
    draws within 6 sigma of 0, per element and overall), fresh numbers per call and per tile,
    reproducible under torch.manual_seed.
  * scaled_mm: relative Frobenius error <= 1e-5 against the dequantized FP32 matmul (FP32 partial
    sums in a different order); bf16 output <= 4e-3; INT8 output: scales relative error <= 1e-5,
    payload |diff| <= 1 on <= 1% of elements (near-ties after a differently ordered FP32 sum).
"""

import os

import pytest
import torch

from interpreter_utils import run_interpreter_child

from megaq import kernels
from megaq.quant import (NonFiniteError, block_hadamard, pad_to_multiple, quantize_blockwise)

HAS_CUDA = torch.cuda.is_available()
IN_CHILD = os.environ.get("MEGAQ_INTERP_CHILD") == "1"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
interp_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter subprocess")

TINY = dict(BM=32, BN=32, num_warps=4, num_stages=1, QUANT_ROWS=16)


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _rand(shape, device, dtype=torch.float32, seed=0, outliers=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0
    if outliers:
        x[:, ::37] *= 50
    return x.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# checks shared by the interpreter and the GPU tests
def check_quantize(x, block, transpose=False):
    q = kernels.quantize(x, block, transpose=transpose)
    ref = quantize_blockwise((x.t() if transpose else x).float().cpu(), block)
    assert q.block == ref.block and q.shape == ref.shape
    assert q.data.dtype == torch.int8 and q.scale.dtype == torch.float32
    assert torch.equal(q.scale.cpu(), ref.scale), (block, transpose)
    assert torch.equal(q.data.cpu(), ref.data), (block, transpose,
                                                 int((q.data.cpu() != ref.data).sum()))


def check_quantize_dual(x, block, block_t):
    qn, qt = kernels.quantize_dual(x, block, block_t)
    rn = quantize_blockwise(x.float().cpu(), block)
    rt = quantize_blockwise(x.t().float().cpu(), block_t)
    for q, r in ((qn, rn), (qt, rt)):
        assert q.block == r.block and q.shape == r.shape
        assert torch.equal(q.scale.cpu(), r.scale) and torch.equal(q.data.cpu(), r.data)


def check_hadamard_quantize(x, had, transpose=False):
    q = kernels.hadamard_quantize(x, had, transpose=transpose)
    v = (x.t() if transpose else x).float().cpu()
    ref = quantize_blockwise(block_hadamard(pad_to_multiple(v, had), had), (1, -1))
    assert q.shape == ref.shape and q.block == ref.block
    assert _rel(q.scale.cpu(), ref.scale) <= 1e-6
    diff = (q.data.cpu().int() - ref.data.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3


def check_stochastic(x, block, draws, transpose=False):
    """Unbiased, in {floor, floor+1}, different per call, reproducible per seed."""
    xs = (x.t() if transpose else x).float().cpu()
    ref = quantize_blockwise(xs, block)
    v = xs / ref.expanded_scale()
    lo = torch.floor(v)
    total = torch.zeros_like(v, dtype=torch.float64)
    first = None
    for i in range(draws):
        q = kernels.quantize(x, block, rounding="stochastic", transpose=transpose)
        assert torch.equal(q.scale.cpu(), ref.scale)
        d = q.data.cpu().float()
        assert int(d.abs().max()) <= 127
        assert bool(((d == lo) | (d == lo + 1)).all())
        total += d.double()
        if i == 0:
            first = q.data.cpu()
        elif i == 1:
            assert not torch.equal(first, q.data.cpu()), "two calls drew the same random numbers"
    ups = total - lo.double() * draws                      # times each element rounded up
    frac = v.double() - lo.double()
    assert bool((ups[frac == 0] == 0).all()), "an integer value was rounded away"
    # P(up) = frac: checked per decile of frac (thousands of draws each, so the normal
    # approximation of the binomial holds) and overall, within 6 sigma
    for lo_f in [i / 10 for i in range(10)] + [None]:
        sel = (frac > 0) if lo_f is None else (frac >= lo_f) & (frac < lo_f + 0.1)
        if int(sel.sum()) == 0:
            continue
        f = frac[sel]
        z = float((ups[sel].sum() - draws * f.sum()) / torch.sqrt(draws * (f * (1 - f)).sum()))
        assert abs(z) <= 6, (lo_f, z)
    torch.manual_seed(1234)
    a = kernels.quantize(x, block, rounding="stochastic", transpose=transpose).data.cpu()
    torch.manual_seed(1234)
    b = kernels.quantize(x, block, rounding="stochastic", transpose=transpose).data.cpu()
    assert torch.equal(a, b), "stochastic rounding does not follow torch's RNG state"


def check_tiles_have_own_streams(device):
    """Identical tiles must not get identical random numbers (Jetfire's shared-stream bug)."""
    tile = _rand((32, 128), "cpu", seed=5)
    x = tile.repeat(4, 4).to(device)
    q = kernels.quantize(x, (1, 128), rounding="stochastic").data.cpu()
    blocks = [q[i * 32:(i + 1) * 32, j * 128:(j + 1) * 128] for i in range(4) for j in range(4)]
    same = sum(torch.equal(blocks[0], b) for b in blocks[1:])
    assert same == 0


def check_nonfinite(device):
    for bad in (float("nan"), float("inf")):
        x = _rand((37, 300), device, seed=3)
        x[5, 7] = bad
        for call in (lambda: kernels.quantize(x, (1, 128)),
                     lambda: kernels.quantize(x, (1, -1)),
                     lambda: kernels.quantize(x, (32, 32), transpose=True),
                     lambda: kernels.hadamard_quantize(x, 128)):
            with pytest.raises(NonFiniteError):
                call()
        kernels.quantize(x, (1, 128), check=False)  # the hot path may switch the check off


def check_scaled_mm(M, N, K, ablock, bblock, device, dtype=torch.float32, bias=True, outliers=False,
                    out_dtypes=(torch.float32, torch.bfloat16, torch.int8)):
    x = _rand((M, K), device, dtype, seed=M + K, outliers=outliers)
    w = _rand((N, K), device, dtype, seed=N + 7)
    b = _rand((N,), device, seed=11) if bias else None
    qa, qb = kernels.quantize(x, ablock), kernels.quantize(w, bblock)
    ref = qa.dequantize().double() @ qb.dequantize().double().t()   # on the device, in fp64
    if bias:
        ref = ref + b.double()
    ref = ref.cpu()
    for od in out_dtypes:
        out = kernels.scaled_mm(qa, qb, out_dtype=od, bias=b)
        if od == torch.int8:
            r = quantize_blockwise(ref.float(), (1, 128))
            assert out.block == r.block and out.shape == r.shape
            assert _rel(out.scale.cpu(), r.scale) <= 1e-5
            diff = (out.data.cpu().int() - r.data.int()).abs()
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-2
        else:
            assert out.dtype == od and out.shape == (M, N)
            err = _rel(out.cpu(), ref)
            bound = 1e-5 if od == torch.float32 else (8e-3 if IN_CHILD else 4e-3)  # see dequantize
            assert err <= bound, (ablock, bblock, od, err)


# --------------------------------------------------------------------------------------------------
# CPU: the interpreter subprocess, and the reference fallback
def test_triton_kernels_under_interpreter():
    if IN_CHILD:
        pytest.skip("this is the child")
    pytest.importorskip("triton")
    run_interpreter_child(__file__, "MEGAQ_INTERP_CHILD", timeout=900)


@pytest.mark.skipif(IN_CHILD, reason="parent-process test")
def test_cpu_dispatch_is_the_reference(monkeypatch):
    monkeypatch.setenv("MEGAQ_KERNELS", "auto")
    x = _rand((37, 300), "cpu")
    for block in [(1, 128), (32, 32), (1, -1)]:
        q, r = kernels.quantize(x, block), quantize_blockwise(x, block)
        assert torch.equal(q.data, r.data) and torch.equal(q.scale, r.scale)
    qa, qb = kernels.quantize(x, (1, 128)), kernels.quantize(_rand((70, 300), "cpu", seed=1), (128, 128))
    out = kernels.scaled_mm(qa, qb)
    assert torch.equal(out, qa.dequantize() @ qb.dequantize().t())
    o8 = kernels.scaled_mm(qa, qb, out_dtype=torch.int8)
    r8 = quantize_blockwise(out, (1, 128))
    assert torch.equal(o8.data, r8.data) and torch.equal(o8.scale, r8.scale)
    h = kernels.hadamard_quantize(x, 128)
    rh = quantize_blockwise(block_hadamard(pad_to_multiple(x, 128), 128), (1, -1))
    assert torch.equal(h.data, rh.data)


@pytest.mark.skipif(IN_CHILD, reason="parent-process test")
def test_kernel_mode_env(monkeypatch):
    monkeypatch.setenv("MEGAQ_KERNELS", "nonsense")
    with pytest.raises(ValueError, match="MEGAQ_KERNELS"):
        kernels.quantize(torch.randn(4, 4), (1, -1))
    monkeypatch.setenv("MEGAQ_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if kernels.triton_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kernels.quantize(torch.randn(4, 4), (1, -1))
    monkeypatch.setenv("MEGAQ_KERNELS", "reference")
    assert kernels.kernel_mode() == "reference"


# --------------------------------------------------------------------------------------------------
# interpreter (run by the subprocess above)
QUANT_BLOCKS = [(1, 128), (128, 128), (32, 32), (1, 32), (1, -1), (128, 1)]


@interp_only
@pytest.mark.parametrize("block", QUANT_BLOCKS)
def test_interp_quantize(block):
    with kernels.config_override(**TINY):
        for shape in [(37, 300), (70, 160)]:
            x = _rand(shape, "cpu", seed=shape[0])
            check_quantize(x, block)
            check_quantize(x, block, transpose=True)
        check_quantize(_rand((33, 200), "cpu", torch.bfloat16), block)


@interp_only
def test_interp_quantize_dual_and_dequantize():
    x = _rand((37, 300), "cpu")
    for fused in (False, True):
        with kernels.config_override(DUAL_FUSED=fused):
            check_quantize_dual(x, (1, 128), (1, 128))
            check_quantize_dual(x, (1, 32), (1, 32))
            check_quantize_dual(x, (32, 32), (32, 32))
    for block in [(1, 128), (32, 32), (1, -1)]:
        q = quantize_blockwise(x, block)
        assert torch.equal(kernels.dequantize(q), q.dequantize())
        # the interpreter converts fp32 -> bf16 by truncation (the GPU rounds): one bf16 ulp
        assert torch.allclose(kernels.dequantize(q, torch.bfloat16).float(),
                              q.dequantize(torch.bfloat16).float(), rtol=2 ** -7, atol=0)


@interp_only
def test_interp_hadamard_quantize():
    with kernels.config_override(**TINY):
        for dtype in (torch.float32, torch.bfloat16):
            x = _rand((37, 300), "cpu", dtype, outliers=True)
            check_hadamard_quantize(x, 128)
            check_hadamard_quantize(x, 32, transpose=True)
    for twopass in (False, True):
        with kernels.config_override(**TINY, ROW_TWOPASS=twopass):
            check_hadamard_quantize(_rand((37, 300), "cpu", outliers=True), 128)


@interp_only
def test_interp_hadamard_stochastic():
    """Unbiased stochastic rounding of the rotated values, both kernels and orientations."""
    x = _rand((32, 128), "cpu", seed=4)
    for transpose in (False, True):
        v = x.t() if transpose else x
        rot = block_hadamard(v, 128 if not transpose else 32)
        ref = quantize_blockwise(rot, (1, -1))
        vv = rot / ref.expanded_scale()
        for twopass in (False, True):
            with kernels.config_override(**TINY, ROW_TWOPASS=twopass):
                draws, ups = 16, torch.zeros_like(vv, dtype=torch.float64)
                for _ in range(draws):
                    q = kernels.hadamard_quantize(x, 128 if not transpose else 32,
                                                  rounding="stochastic", transpose=transpose)
                    assert _rel(q.scale, ref.scale) <= 1e-6
                    d = q.data.double() - torch.floor(vv).double()
                    assert bool(((d == 0) | (d == 1)).all())
                    ups += d
                frac = vv.double() - torch.floor(vv).double()
                z = float((ups.sum() - draws * frac.sum()) / torch.sqrt(draws * (frac * (1 - frac)).sum()))
                assert abs(z) <= 6, z


@interp_only
def test_interp_stochastic_rounding():
    with kernels.config_override(**TINY):
        x = _rand((32, 200), "cpu", seed=9)
        check_stochastic(x, (1, 128), draws=24)
        check_stochastic(x, (1, -1), draws=8)
        check_stochastic(x, (1, -1), draws=8, transpose=True)
        check_tiles_have_own_streams("cpu")


@interp_only
def test_interp_nonfinite_raises():
    with kernels.config_override(**TINY):
        check_nonfinite("cpu")


GEMM_CASES = [((1, 128), (128, 128), 384), ((1, 32), (32, 32), 160), ((1, -1), (1, -1), 384),
              ((1, 128), (1, 128), 384), ((1, -1), (128, 128), 384), ((1, 32), (1, 128), 256),
              ((32, 32), (32, 32), 160)]


@interp_only
@pytest.mark.parametrize("ablock,bblock,K", GEMM_CASES)
def test_interp_scaled_mm(ablock, bblock, K):
    for tma in (True, False):
        with kernels.config_override(**TINY, USE_TMA=tma, CVT=int(tma)):
            check_scaled_mm(37, 70, K, ablock, bblock, "cpu",
                            out_dtypes=(torch.float32,) if not tma else (torch.float32, torch.bfloat16))
    with kernels.config_override(BM=32, BN=128, num_warps=4, num_stages=1, J=2, CVT=1):
        check_scaled_mm(37, 200, K, ablock, bblock, "cpu", out_dtypes=(torch.int8,))


@interp_only
def test_interp_scaled_mm_odd_k_and_int4():
    # K = 100: not a multiple of 16 (no TMA), tails in every dimension
    with kernels.config_override(**TINY):
        check_scaled_mm(37, 70, 100, (1, -1), (1, -1), "cpu", out_dtypes=(torch.float32,))
        x, w = _rand((37, 128), "cpu"), _rand((70, 128), "cpu", seed=2)
        qa, qb = quantize_blockwise(x, (1, -1), bits=4), quantize_blockwise(w, (1, -1), bits=4)
        out = kernels.scaled_mm(qa, qb)
        assert _rel(out, qa.dequantize() @ qb.dequantize().t()) <= 1e-5


# --------------------------------------------------------------------------------------------------
# GPU
@gpu
@needs_cuda
@pytest.mark.parametrize("block", QUANT_BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_quantize(block, dtype):
    for shape in [(1000, 384), (1000, 1600), (257, 4200), (4097, 1600)]:
        x = _rand(shape, "cuda", dtype, seed=shape[1])
        check_quantize(x, block)
        check_quantize(x, block, transpose=True)


@gpu
@needs_cuda
def test_gpu_quantize_dual_hadamard_dequantize():
    for shape in [(1000, 1600), (4097, 384)]:
        x = _rand(shape, "cuda", torch.bfloat16, outliers=True)
        for fused in (False, True):
            with kernels.config_override(DUAL_FUSED=fused):
                check_quantize_dual(x, (1, 128), (1, 128))
                check_quantize_dual(x, (32, 32), (32, 32))
        for had in (128, 32):
            check_hadamard_quantize(x, had)
            check_hadamard_quantize(x, had, transpose=True)
        with kernels.config_override(ROW_TWOPASS=True):
            check_hadamard_quantize(x, 128)
        check_hadamard_quantize(x.float(), 128)
        q = kernels.quantize(x, (1, 128))
        assert torch.equal(kernels.dequantize(q).cpu(), q.dequantize().cpu())


@gpu
@needs_cuda
def test_gpu_stochastic_and_nonfinite():
    check_stochastic(_rand((1000, 384), "cuda", torch.bfloat16), (1, 128), draws=64)
    check_stochastic(_rand((300, 1600), "cuda"), (1, -1), draws=32)
    check_stochastic(_rand((1000, 384), "cuda", torch.bfloat16), (1, -1), draws=32, transpose=True)
    check_stochastic(_rand((1000, 384), "cuda", torch.bfloat16), (1, 128), draws=32, transpose=True)
    check_tiles_have_own_streams("cuda")
    check_nonfinite("cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("ablock,bblock", [(a, b) for a, b, _ in GEMM_CASES])
@pytest.mark.parametrize("M,N,K", [(1000, 1600, 384), (1000, 384, 1600), (257, 4200, 640),
                                   (4097, 6400, 1600)])
def test_gpu_scaled_mm(ablock, bblock, M, N, K):
    check_scaled_mm(M, N, K, ablock, bblock, "cuda", dtype=torch.bfloat16)


@gpu
@needs_cuda
def test_gpu_scaled_mm_paths_and_tails():
    for cfg in (dict(USE_TMA=False), dict(CVT=0), dict(CVT=1), dict(J=2)):
        with kernels.config_override(**cfg):
            check_scaled_mm(1000, 4200, 384, (1, 128), (128, 128), "cuda")
            check_scaled_mm(1000, 4200, 384, (1, -1), (1, -1), "cuda")
    check_scaled_mm(77, 4100, 100, (1, -1), (1, -1), "cuda", out_dtypes=(torch.float32,))
