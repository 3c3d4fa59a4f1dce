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
    reproducible under torch.manual_seed. The fixed-point rounding itself (interpreter): over all 2^16
    dithers, exactly rint(v · 2^16) mod 2^16 of them round v up, and nothing passes ±127.
  * hadamard_quantize_dual (x and x.T at once): nearest bit for bit the two single calls run with
    the same tile shape, and within the fused-rotation bounds above of the reference; stochastic:
    the nearest scales, values within one step of the nearest ones, unbiased (6 sigma), and the two
    orientations' rounding decisions uncorrelated (|z| <= 6; a shared stream gives z ~ 30 here).
  * column sums (`column_sums_out`, the bias gradient from the quantizer pass that reads ∇Y for ∇Yᵀ):
    FP32 sums of the exact inputs whose every term passes through at most d = h + ceil(R / h) additions
    (a reduction tree inside an h-row tile, the tiles one after another, the partial rows in torch), so
    |sum - exact| <= d·2^-24·Σ|x| per column (dropping one element breaks it); against torch's own FP32
    sum `x.float().sum(0)` (depth <= R - 1): |sum - torch| <= (d + R - 1)·2^-24·Σ|x|. NaN/Inf in a
    column give a NaN/Inf sum there. The quantized outputs are bit for bit those of the call without
    column sums (the same Philox seed), and so are a linear's other gradients.
  * scaled_mm: relative Frobenius error <= 1e-5 against the dequantized FP32 matmul (FP32 partial
    sums in a different order); bf16 output <= 4e-3; INT8 output: scales relative error <= 1e-5,
    payload |diff| <= 1 on <= 1% of elements (near-ties after a differently ordered FP32 sum).
"""

import os

import pytest
import torch

from interpreter_utils import run_interpreter_child
from tensor_utils import random_input, rel_error

from megaq import kernels
from megaq.kernels import quantizers
from megaq.kernels.quantizers import ROW_KERNELS
from megaq.quant import (NonFiniteError, block_hadamard, pad_to_multiple, quantize_blockwise)

HAS_CUDA = torch.cuda.is_available()
IN_CHILD = os.environ.get("MEGAQ_INTERP_CHILD") == "1"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
interp_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter subprocess")

TINY = dict(BM=32, BN=32, num_warps=4, num_stages=1, QUANT_ROWS=16)


_rel = rel_error


def _rand(shape, device, dtype=torch.float32, seed=0, outliers=False):
    return random_input(shape, device, dtype, seed, outliers=50 if outliers else 0)


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


def _rotated(x, had, transpose=False):
    """The reference's rotated rows of x (of x.T when `transpose`), zero padded, FP32 on the CPU."""
    v = (x.t() if transpose else x).float().cpu()
    return block_hadamard(pad_to_multiple(v, had), had)


def check_hadamard_reference(q, x, had, transpose=False):
    ref = quantize_blockwise(_rotated(x, had, transpose), (1, -1))
    assert q.shape == ref.shape and q.block == ref.block
    assert _rel(q.scale.cpu(), ref.scale) <= 1e-6
    diff = (q.data.cpu().int() - ref.data.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3


def check_hadamard_quantize(x, had, transpose=False):
    check_hadamard_reference(kernels.hadamard_quantize(x, had, transpose=transpose), x, had, transpose)


def _assert_same(q, r):
    assert q.block == r.block and q.shape == r.shape and q.bits == r.bits
    assert q.data.dtype == r.data.dtype and q.scale.shape == r.scale.shape
    assert torch.equal(q.scale.cpu(), r.scale.cpu()), int((q.scale != r.scale).sum())
    assert torch.equal(q.data.cpu(), r.data.cpu()), int((q.data != r.data).sum())


def _assert_near_ties(q, r):
    """Two quantizations of the same rotated values whose FP32 rotation sums may differ in order
    (numpy orders a matmul's sums by its shape): scales within 1e-6, payloads equal but for ±1 on
    at most 0.1% of the elements."""
    assert q.block == r.block and q.shape == r.shape and q.bits == r.bits
    assert _rel(q.scale.cpu(), r.scale.cpu()) <= 1e-6
    diff = (q.data.cpu().int() - r.data.cpu().int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3


def assert_rounds_up_with_probability_frac(ups, frac, draws):
    """Stochastic rounding's P(up) = frac: `ups` counts, per element, how many of `draws` draws rounded
    up a value whose fractional part is `frac`. Checked per decile of frac (thousands of draws each, so
    the normal approximation of the binomial holds) and overall, within 6 sigma."""
    for lo_f in [i / 10 for i in range(10)] + [None]:
        sel = (frac > 0) if lo_f is None else (frac >= lo_f) & (frac < lo_f + 0.1)
        if int(sel.sum()) == 0:
            continue
        f = frac[sel]
        z = float((ups[sel].sum() - draws * f.sum()) / torch.sqrt(draws * (f * (1 - f)).sum()))
        assert abs(z) <= 6, (lo_f, z)


def check_hadamard_dual(x, had):
    """Nearest rounding: both outputs within the fused-rotation bounds of the reference, and bit for
    bit the two single calls. For the latter the single calls run the two-pass kernels with the
    dual's tile shape and warps: the rotation's FP32 sums then have the same order (the interpreter's
    numpy matmul orders them by matrix shape; the result may differ in the last bit otherwise)."""
    rows, cols = kernels.hadamard_quantize_dual(x, had)
    check_hadamard_reference(rows, x, had)
    check_hadamard_reference(cols, x, had, transpose=True)
    with kernels.config_override(QUANT_ROWS=had, QUANT_COLS=had, QUANT_WARPS=8, ROW_KERNEL="twopass"):
        rows, cols = kernels.hadamard_quantize_dual(x, had)
        _assert_same(rows, kernels.hadamard_quantize(x, had))
        _assert_same(cols, kernels.hadamard_quantize(x, had, transpose=True))


def check_hadamard_dual_stochastic(x, had, draws):
    """Stochastic rounding of both orientations: scales those of nearest rounding, each value within one
    step of the nearest one, unbiased (the mean of the draws tends to the rotated x), fresh numbers
    per call, and the two orientations not rounded with the same random numbers."""
    near = kernels.hadamard_quantize_dual(x, had)
    refs = (_rotated(x, had).double(), _rotated(x, had, transpose=True).double())
    # E[q - nearest] = v - nearest: the excess of the exact rotated value over the nearest integer
    excess = [r / n.scale.cpu().double() - n.data.cpu().double() for r, n in zip(refs, near)]
    frac = [e - torch.floor(e) for e in excess]
    sums = [torch.zeros_like(e) for e in excess]
    previous = None
    for i in range(draws):
        out = kernels.hadamard_quantize_dual(x, had, rounding="stochastic")
        steps = []
        for q, n, total in zip(out, near, sums):
            assert torch.equal(q.scale.cpu(), n.scale.cpu())
            d = q.data.cpu().double() - n.data.cpu().double()
            assert int(d.abs().max()) <= 1
            total += d
            steps.append(d)
        if i == 0:
            # shared random numbers: both orientations at tile position (i, j) would round up together
            # whenever u(i, j) is below both fractions; with independent streams the centred rounding
            # decisions are uncorrelated (z ~ N(0, 1); a shared stream gives z ~ 0.5 sqrt(elements))
            R, C = x.shape            # tile positions present in both outputs
            r, fr, er = (t[:R, :C] for t in (steps[0], frac[0], excess[0]))
            c, fc, ec = (t.t()[:R, :C] for t in (steps[1], frac[1], excess[1]))
            cov = (r - er) * (c - ec)
            var = fr * (1 - fr) * fc * (1 - fc)
            z = float(cov.sum() / var.sum().sqrt())
            assert abs(z) <= 6, f"the two orientations share random numbers (z = {z:.1f})"
            assert bool(r.any()) and bool(c.any()), "stochastic rounding never left the nearest value"
            previous = [q.data.cpu() for q in out]
        elif i == 1:
            for q, p in zip(out, previous):
                assert not torch.equal(q.data.cpu(), p), "two calls drew the same random numbers"
    for total, e, f, ref, n in zip(sums, excess, frac, refs, near):
        # overall and per decile of the fraction: times rounded up match P(up) = frac (6 sigma)
        ups = total - draws * (e - f)     # d = floor(e) + [up]
        assert_rounds_up_with_probability_frac(ups, f, draws)
        # the mean of the dequantized draws tends to the rotated x: its error against the nearest
        # result's is about sqrt(E[f(1-f)] / draws / E[(v - rint v)^2]) = sqrt(2 / draws)
        scale = n.scale.cpu().double()
        mean = (n.data.cpu().double() + total / draws) * scale
        nearest_err = _rel(n.data.cpu().double() * scale, ref)
        assert _rel(mean, ref) <= 1.5 * (2 / draws) ** 0.5 * nearest_err


def assert_column_sums(sums, x, had):
    """The column-sum bounds of the module docstring: against the exact (FP64) sum and torch's FP32 sum."""
    R = x.shape[0]
    xd = x.detach().double().cpu()
    abs_sum = xd.abs().sum(0)
    depth = had + -(-R // had)
    assert sums.dtype == torch.float32 and sums.shape == (x.shape[1],)
    err = (sums.cpu().double() - xd.sum(0)).abs()
    assert bool((err <= depth * 2.0 ** -24 * abs_sum * 1.001 + 1e-30).all()), float((err / abs_sum).max())
    err_torch = (sums.cpu().double() - x.detach().float().sum(0).cpu().double()).abs()
    assert bool((err_torch <= (depth + R - 1) * 2.0 ** -24 * abs_sum * 1.001 + 1e-30).all())


def check_column_sums(x, had):
    """x.sum(0) from the first pass of the transposed single quantizer (the graphed wgrad operand ∇Yᵀ)
    and of the dual one, nearest and stochastic; the quantized outputs unchanged by asking for it."""
    for rounding in ("nearest", "stochastic"):
        calls = (lambda **k: (kernels.hadamard_quantize(x, had, rounding=rounding, transpose=True, **k),),
                 lambda **k: kernels.hadamard_quantize_dual(x, had, rounding=rounding, **k))
        for call in calls:
            sums = torch.full((x.shape[1],), float("nan"), device=x.device)   # every column must be written
            torch.manual_seed(11)
            with_sums = call(column_sums_out=sums)
            torch.manual_seed(11)
            for q, r in zip(with_sums, call()):
                _assert_same(q, r)
            assert_column_sums(sums, x, had)


def check_column_sums_nonfinite_and_args(device):
    x = _rand((70, 200), device, seed=5)
    x[65, 133] = float("nan")
    x[3, 7] = float("inf")
    for call in (lambda out: kernels.hadamard_quantize(x, 32, transpose=True, check=False, column_sums_out=out),
                 lambda out: kernels.hadamard_quantize_dual(x, 128, check=False, column_sums_out=out)):
        sums = torch.zeros(200, device=device)
        call(sums)
        assert bool(sums[133].isnan()) and bool(sums[7].isinf()), (sums[133], sums[7])
        others = torch.ones(200, dtype=torch.bool)
        others[[7, 133]] = False
        assert bool(sums.cpu()[others].isfinite().all())
        with pytest.raises(NonFiniteError):
            kernels.hadamard_quantize(x, 32, transpose=True, column_sums_out=sums)
    for bad in (torch.zeros(200, dtype=torch.float64, device=device), torch.zeros(199, device=device),
                torch.zeros(400, device=device)[::2]):
        with pytest.raises(ValueError, match="column_sums_out"):
            kernels.hadamard_quantize(x, 32, transpose=True, check=False, column_sums_out=bad)
        with pytest.raises(ValueError, match="column_sums_out"):
            kernels.hadamard_quantize_dual(x, 32, check=False, column_sums_out=bad)


def check_linear_bias_grad(device, dtype, shape=(37, 96, 130)):
    """The int8 linear's bias gradient from the ∇Yᵀ quantizer's kernels, eagerly (dual quantizer) and with the
    kernels a CUDA graph captures (single quantizers): within the column-sum bounds, the quantizer
    was asked for it, and every other gradient bit for bit the unfused path's (`FUSE_BIAS_GRAD`)."""
    import contextlib

    from megaq.ops import linear as linear_mod
    from megaq.ops import quantized_linear
    M, K, N = shape
    x0, w0 = _rand((M, K), device, dtype, seed=1), _rand((N, K), device, dtype, seed=2) / K ** 0.5
    b0, gy = _rand((N,), device, dtype, seed=3), _rand((M, N), device, dtype, seed=4)
    asked = []
    for name in ("hadamard_quantize", "hadamard_quantize_dual"):
        fn = getattr(kernels, name)
        setattr(kernels, name, lambda *a, _fn=fn, **k: asked.append(k.get("column_sums_out") is not None) or _fn(*a, **k))
    try:
        for warmup in (False, True):
            grads = []
            for fuse in (True, False):
                linear_mod.FUSE_BIAS_GRAD = fuse
                x, w, b = (t.clone().requires_grad_(True) for t in (x0, w0, b0))
                asked.clear()
                torch.manual_seed(5)
                with (linear_mod.graph_warmup() if warmup else contextlib.nullcontext(),
                      kernels.config_override(COLUMN_SUMS_MIN_COLS=0)):   # the kernels sum at every width
                    quantized_linear(x, w, b, "int8").backward(gy)
                # the linear fuses for 16-bit ∇Y only (FP32: the torch sum; megaq.ops.linear)
                assert any(asked) == (fuse and dtype != torch.float32), (warmup, fuse, asked)
                grads.append((x.grad, w.grad, b.grad))
            (gx, gw, gb), (gx0, gw0, gb0) = grads
            assert torch.equal(gx, gx0) and torch.equal(gw, gw0)
            assert gb.dtype == dtype
            if dtype == torch.float32:
                assert_column_sums(gb, gy, 128)
            else:   # both FP32 sums (bound E apart) rounded to BF16: within E·(1 + 2^-8) + 2^-7·|torch's|
                g = gy.double().cpu()
                e = (128 + -(-M // 128) + M - 1) * 2.0 ** -24 * g.abs().sum(0)
                diff = (gb.double() - gb0.double()).abs().cpu()
                assert bool((diff <= gb0.double().abs().cpu() * 2.0 ** -7 + 1.01 * e).all())
    finally:
        linear_mod.FUSE_BIAS_GRAD = True
        for name in ("hadamard_quantize", "hadamard_quantize_dual"):
            setattr(kernels, name, getattr(quantizers, name))


def check_hadamard_dual_nonfinite(device):
    for bad in (float("nan"), float("inf")):
        for dtype in (torch.float32, torch.bfloat16):
            x = _rand((70, 200), device, dtype, seed=3)
            x[65, 133] = bad
            with pytest.raises(NonFiniteError):
                kernels.hadamard_quantize_dual(x, 32)
            with pytest.raises(NonFiniteError):
                kernels.hadamard_quantize_dual(x, 128, rounding="stochastic")
            kernels.hadamard_quantize_dual(x, 32, check=False)  # the hot path may switch the check off


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
    assert_rounds_up_with_probability_frac(ups, frac, draws)
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


def check_dither_positions_independent(device):
    """The dither gives 8 elements 16 bits each of one Philox call: the two halves of word w go to
    columns 8w + 2q and 8w + 2q + 1 of a 32-column span (q: the call's place in the span). At
    frac(v) = 1/2 every one of the 8 positions rounds up half the time, and elements that share a
    call (1, 8, 16 apart) or not (2 apart) decide independently (a reused word would correlate them
    fully)."""
    x = torch.full((64, 264), 0.5, device=device)
    x[:, 0] = 127.0  # the row scale is 1: every other element is v = 1/2, rounded to 0 or 1
    for transpose in (False, True):
        q = kernels.quantize(x.t().contiguous() if transpose else x, (1, -1), rounding="stochastic",
                             transpose=transpose).data.cpu().double()
        up = q[:, 8:]                                            # [64, 256] of 0/1
        assert bool(((up == 0) | (up == 1)).all())
        # columns 8..263 = (span, word, q, half): the rate per (word, half), 2048 draws each
        rate = up.reshape(64, 8, 4, 4, 2).mean(dim=(0, 1, 3))
        assert float((rate - 0.5).abs().max()) < 0.06, rate      # 4.5 sigma at 2048 draws each
        centred = up - up.mean()
        for shift in (1, 2, 8, 16):
            a, b = centred[:, :-shift].reshape(-1), centred[:, shift:].reshape(-1)
            corr = float((a * b).mean() / (a.std() * b.std()))
            assert abs(corr) < 0.05, (shift, corr)               # ~6 sigma at 16k pairs


def check_division_exact(device):
    """The kernels divide by a block's scale through its reciprocal with two fused corrections
    (`triton_quant._divide`), which must equal IEEE division bit for bit: rows whose values sit
    within a few ulps of a rounding tie (k + 1/2) · scale, for scales from 1e-30 to 1e30 and at the
    top of a binade, quantized to nearest against the reference."""
    g = torch.Generator().manual_seed(11)
    rows, cols = 48, 300
    exps = torch.randint(-100, 100, (rows, 1), generator=g).double()
    s = (1 + torch.rand(rows, 1, generator=g, dtype=torch.float64)) * 2.0 ** exps
    s[::5] = 2.0 ** exps[::5] * (2 - 2.0 ** -22)                 # scales at the top of their binade
    k = torch.randint(-127, 127, (rows, cols), generator=g).double() + 0.5
    ulps = torch.randint(-6, 7, (rows, cols), generator=g).double() * 2.0 ** -24
    x = (k * (1 + ulps) * s).float()
    x[:, 0] = (127 * s[:, 0]).float()                            # the row's abs-max: scale ≈ s
    for block in ((1, -1), (1, 128), (1, 32)):
        check_quantize(x.to(device), block)


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
            bound = 1e-5 if od == torch.float32 else 4e-3
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
def test_cpu_hadamard_quantize_dual_is_the_two_reference_calls(monkeypatch):
    monkeypatch.setenv("MEGAQ_KERNELS", "auto")
    x = _rand((37, 300), "cpu", outliers=True)
    rows, cols = kernels.hadamard_quantize_dual(x, 128)
    _assert_same(rows, kernels.hadamard_quantize(x, 128))
    _assert_same(cols, kernels.hadamard_quantize(x, 128, transpose=True))
    g = torch.Generator().manual_seed(5)
    rows, cols = kernels.hadamard_quantize_dual(x, 32, rounding="stochastic", generator=g)
    g.manual_seed(5)
    _assert_same(rows, kernels.hadamard_quantize(x, 32, rounding="stochastic", generator=g))
    _assert_same(cols, kernels.hadamard_quantize(x, 32, rounding="stochastic", generator=g, transpose=True))
    with pytest.raises(ValueError, match="Hadamard block"):
        kernels.hadamard_quantize_dual(x, 48)
    with pytest.raises(ValueError, match="2-D"):
        kernels.hadamard_quantize_dual(x[None], 128)


@pytest.mark.skipif(IN_CHILD, reason="parent-process test")
def test_cpu_column_sums_fall_back_to_torch(monkeypatch):
    monkeypatch.setenv("MEGAQ_KERNELS", "auto")
    x = _rand((37, 300), "cpu", torch.bfloat16)
    for call in (lambda out: kernels.hadamard_quantize(x, 128, transpose=True, column_sums_out=out),
                 lambda out: kernels.hadamard_quantize(x, 128, column_sums_out=out),
                 lambda out: kernels.hadamard_quantize_dual(x, 8, column_sums_out=out)):
        out = torch.full((300,), float("nan"))
        call(out)
        assert torch.equal(out, x.sum(0, dtype=torch.float32))
    check_column_sums_nonfinite_and_args("cpu")


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


@pytest.mark.skipif(IN_CHILD, reason="parent-process test")
def test_two_pass_grid_programs_per_strip():
    """The two-pass grid's programs per strip (`_programs_per_strip`) on an H100's 264 places (132 SMs x 2)
    and 16,384 tokens (128 tiles per strip): what the session-17 sweep measured best at 2048, 6144 and
    8192 columns of 64; never more programs than tiles; one program per strip once the strips fill the
    places; and the modelled time of its choice is the least of all counts."""
    from megaq.kernels.quantizers import _PROGRAM_OVERHEAD_TILES, _cdiv, _programs_per_strip

    assert [_programs_per_strip(columns // 64, 128, 264) for columns in (2048, 6144, 8192)] == [8, 8, 2]
    assert _programs_per_strip(300, 128, 264) == 1 and _programs_per_strip(264, 128, 264) == 1
    for strips, tiles in ((1, 3), (5, 7), (25, 128), (100, 64), (36, 129)):
        p = _programs_per_strip(strips, tiles, 264)
        assert 1 <= p <= tiles

        def modelled(q):
            return _cdiv(strips * q, 264) * (_cdiv(tiles, q) + _PROGRAM_OVERHEAD_TILES)
        assert modelled(p) == min(modelled(q) for q in range(1, tiles + 1)), (strips, tiles, p)


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
        # rounded to nearest as on the GPU (the kernel rounds the bits itself: the interpreter's own
        # fp32 -> bf16 conversion truncates)
        assert torch.equal(kernels.dequantize(q, torch.bfloat16), q.dequantize(torch.bfloat16))


@interp_only
def test_interp_hadamard_quantize():
    with kernels.config_override(**TINY):
        for dtype in (torch.float32, torch.bfloat16):
            x = _rand((37, 300), "cpu", dtype, outliers=True)
            check_hadamard_quantize(x, 128)
            check_hadamard_quantize(x, 32, transpose=True)
    for kernel in ROW_KERNELS:
        with kernels.config_override(**TINY, ROW_KERNEL=kernel):
            check_hadamard_quantize(_rand((37, 300), "cpu", outliers=True), 128)
    with pytest.raises(ValueError, match="ROW_KERNEL"), kernels.config_override(ROW_KERNEL="fast"):
        kernels.hadamard_quantize(_rand((4, 128), "cpu"), 128)


@interp_only
def test_interp_hadamard_rows_resident(monkeypatch):
    """The one-read kernel: within the reference bounds, and the two-pass kernels' outputs up to
    near-ties (same Philox counters: stochastic rounding matches too) on row tails,
    padded Hadamard blocks, block counts that are not powers of two, fp16 / bf16 / fp32, a strided
    view, INT4 payloads; its NaN check; rows too long for registers take the two-pass kernels."""
    cases = [((37, 300), 128, torch.float32), ((19, 1600), 128, torch.bfloat16),
             ((21, 384), 32, torch.float16), ((5, 2000), 128, torch.float32), ((13, 208), 16, torch.bfloat16)]
    for shape, had, dtype in cases:
        x = _rand(shape, "cpu", dtype, seed=shape[1], outliers=True)
        with kernels.config_override(**TINY, ROW_KERNEL="resident"):
            check_hadamard_quantize(x, had)
        for bits, rounding in ((8, "nearest"), (8, "stochastic"), (4, "nearest")):
            out = []
            for kernel, tile in (("resident", dict(RESIDENT_TILE=16)), ("twopass", {})):
                with kernels.config_override(**TINY, **tile, ROW_KERNEL=kernel):
                    torch.manual_seed(7)
                    out.append(kernels.hadamard_quantize(x, had, bits=bits, rounding=rounding))
            _assert_near_ties(*out)
    strided = _rand((40, 500), "cpu", seed=3)[:, 37:337]
    with kernels.config_override(**TINY, ROW_KERNEL="resident"):
        check_hadamard_quantize(strided, 64)
        bad = _rand((9, 300), "cpu", seed=1)
        bad[4, 250] = float("nan")
        with pytest.raises(NonFiniteError):
            kernels.hadamard_quantize(bad, 128)
    twopass_calls = []
    launch = quantizers._launch_twopass   # patched where hadamard_quantize reads it
    monkeypatch.setattr(quantizers, "_launch_twopass", lambda *a, **k: twopass_calls.append(1) or launch(*a, **k))
    with kernels.config_override(**TINY, ROW_KERNEL="resident"):
        check_hadamard_quantize(_rand((3, quantizers._RESIDENT_MAX_ROW + 1), "cpu", seed=2), 128)
    assert twopass_calls == [1]


@interp_only
def test_interp_hadamard_stochastic():
    """Unbiased stochastic rounding of the rotated values, both kernels and orientations."""
    x = _rand((32, 128), "cpu", seed=4)
    for transpose in (False, True):
        v = x.t() if transpose else x
        rot = block_hadamard(v, 128 if not transpose else 32)
        ref = quantize_blockwise(rot, (1, -1))
        vv = rot / ref.expanded_scale()
        for kernel in ROW_KERNELS:
            with kernels.config_override(**TINY, ROW_KERNEL=kernel):
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
def test_interp_hadamard_quantize_dual():
    # tails in both dimensions, every input dtype, Hadamard 16..128, a strided view
    for shape, had, dtype in [((200, 384), 128, torch.float32), ((130, 1600), 128, torch.bfloat16),
                              ((37, 300), 32, torch.float16), ((50, 70), 16, torch.bfloat16)]:
        check_hadamard_dual(_rand(shape, "cpu", dtype, seed=shape[1], outliers=True), had)
    check_hadamard_dual(_rand((90, 400), "cpu", seed=2)[:, 37:337], 64)
    x = _rand((37, 300), "cpu", seed=4)
    with kernels.config_override(QUANT_ROWS=32, QUANT_COLS=32, ROW_KERNEL="twopass"):   # INT4 payloads, packed alike
        for q, r in zip(kernels.hadamard_quantize_dual(x, 32, bits=4),
                        (kernels.hadamard_quantize(x, 32, bits=4),
                         kernels.hadamard_quantize(x, 32, bits=4, transpose=True))):
            _assert_same(q, r)
    # Hadamard blocks below 16: the two single calls
    for q, r in zip(kernels.hadamard_quantize_dual(x, 8),
                    (kernels.hadamard_quantize(x, 8), kernels.hadamard_quantize(x, 8, transpose=True))):
        _assert_same(q, r)
    with pytest.raises(ValueError, match="rounding"):
        kernels.hadamard_quantize_dual(x, 32, rounding="up")


@interp_only
def test_interp_hadamard_dual_stochastic_and_nonfinite():
    check_hadamard_dual_stochastic(_rand((40, 90), "cpu", seed=6, outliers=True), 32, draws=16)
    check_hadamard_dual_stochastic(_rand((64, 130), "cpu", torch.bfloat16, seed=7), 128, draws=8)
    check_hadamard_dual_nonfinite("cpu")


@interp_only
def test_interp_column_sums():
    """Partial rows (several programs or rows of tiles per column) and a direct store, row and column
    tails, fp32 / bf16 / fp16, a strided view (the kernels sum at every width: COLUMN_SUMS_MIN_COLS=0); the
    untransposed and sub-16 Hadamard paths, and narrow inputs by default, sum in torch."""
    x = _rand((37, 300), "cpu", seed=3)
    for call in (lambda out: kernels.hadamard_quantize(x, 128, transpose=True, column_sums_out=out),
                 lambda out: kernels.hadamard_quantize_dual(x, 128, column_sums_out=out)):
        out = torch.full((300,), float("nan"))
        call(out)
        assert torch.equal(out, x.sum(0))
    with kernels.config_override(**TINY, COLUMN_SUMS_MIN_COLS=0):
        for shape, had, dtype in [((100, 50), 32, torch.float32), ((37, 300), 128, torch.bfloat16),
                                  ((130, 200), 128, torch.float16)]:
            check_column_sums(_rand(shape, "cpu", dtype, seed=shape[0]), had)
        check_column_sums(_rand((90, 400), "cpu", seed=2)[:, 37:337], 64)
        x = _rand((37, 300), "cpu", seed=3)
        for call in (lambda out: kernels.hadamard_quantize(x, 128, column_sums_out=out),
                     lambda out: kernels.hadamard_quantize_dual(x, 8, column_sums_out=out)):
            out = torch.full((300,), float("nan"))
            call(out)
            assert torch.equal(out, x.sum(0))
        check_column_sums_nonfinite_and_args("cpu")


@interp_only
def test_interp_linear_bias_grad():
    check_linear_bias_grad("cpu", torch.float32)
    check_linear_bias_grad("cpu", torch.bfloat16)


@interp_only
def test_interp_stochastic_rounding():
    with kernels.config_override(**TINY):
        x = _rand((32, 200), "cpu", seed=9)
        check_stochastic(x, (1, 128), draws=24)
        check_stochastic(x, (1, -1), draws=8)
        check_stochastic(x, (1, -1), draws=8, transpose=True)
        check_tiles_have_own_streams("cpu")
        check_dither_positions_independent("cpu")
        check_division_exact("cpu")


def check_fixed_point_rounding(device: str):
    """Stochastic rounding in 16-bit fixed point (`_quantize_scaled`): for every dither k of 0..2^16-1,
    q = floor((t + k) / 2^16) with t = rint(v · 2^16), so exactly t mod 2^16 of the 2^16 dithers round
    v up: P(up) = 1/4 for 3.25, 3/4 for -3.25 (up is toward +inf), 0 for an integer, 65535/65536 one
    step below an integer, 0 for 2^-17 (a tie of t, below the fixed point's resolution), 19661/65536
    for 0.3 (t rounded to nearest, not truncated); never past ±127, even for |v| a hair above 127 (the
    scale's rounding). The GPU rounds t with `cvt.rni`, the interpreter with floor and remainder."""
    from triton_probes import fixed_point_stochastic_kernel as kernel

    values = torch.tensor([3.25, -3.25, 5.0, -7.0, 6.0 - 2.0 ** -16, 127.0, -127.0, 127.0 + 2.0 ** -12,
                           -(127.0 + 2.0 ** -12), 0.0, 2.0 ** -17, 1.5, 0.3, -0.3], dtype=torch.float32)
    n, dithers = 16, 1 << 16
    v = torch.zeros(n, device=device)
    v[:len(values)] = values.to(device)
    ups = torch.zeros(n, dtype=torch.int64, device=device)
    q_all = []
    for k0 in range(0, dithers, 4096):   # 4096 dithers per launch, each applied to every value
        k = torch.arange(k0, k0 + 4096, dtype=torch.int32, device=device)
        a = v.repeat(4096)                       # rn = 1: a is v itself
        kk = k.repeat_interleave(n)
        q = torch.empty(n * 4096, dtype=torch.int8, device=device)
        kernel[(n * 4096 // 1024,)](a, torch.ones(n * 4096, device=device), kk, q, BLOCK=1024,
                                    RINT_LIBDEVICE=device != "cpu")
        q = q.view(4096, n).int()
        q_all.append(q)
        ups += (q > torch.floor(v).int()).sum(0)
    q_all, ups = torch.cat(q_all).cpu(), ups.cpu()
    assert int(q_all.max()) <= 127 and int(q_all.min()) >= -127
    # 0.3 · 2^16 = 19660.8 in FP32: t = 19661 (rounded, not truncated), and -0.3 rounds up to 0 on the rest
    expect = {0: 16384, 1: 49152, 2: 0, 3: 0, 4: 65535, 5: 0, 6: 0, 9: 0, 10: 0, 11: 32768, 12: 19661,
              13: 65536 - 19661}
    for i, e in expect.items():
        assert int(ups[i]) == e, (float(values[i]), int(ups[i]), e)
    assert bool((q_all[:, 7] == 127).all()) and bool((q_all[:, 8] == -127).all())   # clamped, never ±128


@interp_only
def test_interp_fixed_point_stochastic_rounding_is_exact_in_its_dither():
    check_fixed_point_rounding("cpu")


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
def test_interp_bf16_outputs_round_to_nearest():
    """A BF16 GEMM output is its FP32 output rounded to nearest even, as on the GPU (the interpreter's
    own FP32 -> BF16 conversion truncates; the kernel rounds the bits first)."""
    x, w, b = _rand((37, 256), "cpu", seed=1), _rand((70, 256), "cpu", seed=2), _rand((70,), "cpu", seed=3)
    qa, qb = kernels.quantize(x, (1, 128)), kernels.quantize(w, (1, 128))
    with kernels.config_override(**TINY):
        out32 = kernels.scaled_mm(qa, qb, out_dtype=torch.float32, bias=b)
        out16 = kernels.scaled_mm(qa, qb, out_dtype=torch.bfloat16, bias=b)
    assert torch.equal(out16, out32.bfloat16())


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
        for kernel in ROW_KERNELS:
            with kernels.config_override(ROW_KERNEL=kernel):
                check_hadamard_quantize(x, 128)
        check_hadamard_quantize(x.float(), 128)
        q = kernels.quantize(x, (1, 128))
        assert torch.equal(kernels.dequantize(q).cpu(), q.dequantize().cpu())


@gpu
@needs_cuda
def test_gpu_hadamard_rows_resident():
    """The one-read row kernel at the trained widths whose Hadamard block counts are not powers of two
    (1600: 13, 2304: 18, 3072: 24, 6144: 48; padded to 16, 32, 32, 64): within the reference bounds,
    and equal to the two-pass kernels' output up to near-ties, stochastic rounding included (same
    dither)."""
    for shape in [(513, 1600), (1000, 2304), (777, 3072), (300, 6144)]:
        x = _rand(shape, "cuda", torch.bfloat16, seed=shape[1], outliers=True)
        with kernels.config_override(ROW_KERNEL="resident"):
            check_hadamard_quantize(x, 128)
        for rounding in ("nearest", "stochastic"):
            out = []
            for kernel in ("resident", "twopass"):
                with kernels.config_override(ROW_KERNEL=kernel):
                    torch.manual_seed(11)
                    out.append(kernels.hadamard_quantize(x, 128, rounding=rounding))
            _assert_near_ties(*out)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_gpu_hadamard_quantize_dual(dtype):
    for shape in [(4100, 1600), (2048, 384), (1000, 4096)]:
        check_hadamard_dual(_rand(shape, "cuda", dtype, seed=shape[0], outliers=True), 128)
    check_hadamard_dual(_rand((1000, 384), "cuda", dtype, seed=1, outliers=True), 32)
    check_hadamard_dual(_rand((333, 1000), "cuda", dtype, seed=2), 16)
    check_hadamard_dual(_rand((1000, 4096), "cuda", dtype, seed=3)[:, 100:3700], 64)


@gpu
@needs_cuda
def test_gpu_hadamard_dual_stochastic_and_nonfinite():
    check_hadamard_dual_stochastic(_rand((2048, 384), "cuda", torch.bfloat16, outliers=True), 128, draws=32)
    check_hadamard_dual_stochastic(_rand((1000, 1600), "cuda", torch.float32, seed=1), 128, draws=16)
    check_hadamard_dual_nonfinite("cuda")


@gpu
@needs_cuda
def test_gpu_column_sums():
    # GPT-2 widths with row tails (bf16, as ∇Y), 8192 rows (several partial rows per column), an FP32 input;
    # the kernels sum at every width (by default narrow inputs are summed by torch)
    with kernels.config_override(COLUMN_SUMS_MIN_COLS=0):
        for (R, C), dtype in (((4097, 768), torch.bfloat16), ((1000, 1600), torch.bfloat16),
                              ((2049, 4096), torch.bfloat16), ((8192, 4096), torch.bfloat16),
                              ((1000, 1600), torch.float32)):
            check_column_sums(_rand((R, C), "cuda", dtype, seed=R), 128)
        check_column_sums(_rand((1000, 1700), "cuda", torch.bfloat16, seed=4)[:, 50:1650], 128)   # a strided view
        check_column_sums_nonfinite_and_args("cuda")


@gpu
@needs_cuda
def test_gpu_linear_bias_grad():
    check_linear_bias_grad("cuda", torch.bfloat16, shape=(1000, 768, 1600))
    check_linear_bias_grad("cuda", torch.float32, shape=(4097, 1600, 768))


@gpu
@needs_cuda
def test_gpu_fixed_point_stochastic_rounding_is_exact_in_its_dither():
    check_fixed_point_rounding("cuda")


@gpu
@needs_cuda
def test_gpu_stochastic_and_nonfinite():
    check_stochastic(_rand((1000, 384), "cuda", torch.bfloat16), (1, 128), draws=64)
    check_stochastic(_rand((300, 1600), "cuda"), (1, -1), draws=32)
    check_stochastic(_rand((1000, 384), "cuda", torch.bfloat16), (1, -1), draws=32, transpose=True)
    check_stochastic(_rand((1000, 384), "cuda", torch.bfloat16), (1, 128), draws=32, transpose=True)
    check_tiles_have_own_streams("cuda")
    check_dither_positions_independent("cuda")
    check_division_exact("cuda")
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
