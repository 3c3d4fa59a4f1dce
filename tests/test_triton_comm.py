"""The fused passes of the compressed gradient all-reduce (megaq.kernels.grad_comm /
megaq.kernels.triton_comm) against the torch path of megaq.parallel.grad_compression.

The world is simulated in one process: every rank's bucket goes through the worker pass, each
rank's received buffer is assembled from the others' send buffers (what the all-to-all delivers),
the server segments are stacked (what the all-gather delivers). The oracle runs the same steps with
grad_compression's own torch functions (`_quantize_with_feedback`, `_sum_received`) and the megaq.quant
reference quantizer (MEGAQ_KERNELS=reference), on the CPU.

Bounds:
  * round-to-nearest: bit for bit — worker and server payloads (INT8, or packed INT4) and scales,
    both residuals, the output — on bucket lengths that are not multiples of the block, shorter than
    one block, 1600*384+7; blocks 32/128/1024; bits 8/4; fp32/bf16/fp16 buckets; with and without
    error feedback, averaging or summing; 2, 3 and 4 ranks.
  * NaN/Inf in a bucket: its blocks carry NaN scales (payload as the oracle's: non-finite elements
    as 0), the output is NaN in exactly those blocks on every rank, both residuals of every rank are
    zero afterwards; a finite step leaves the flag clear.
  * BF16/FP16 outputs of the final pass: the FP32 output rounded (GPU: bit for bit as torch's
    .to(); interpreter, which truncates: within one unit in the last place).
  * stochastic rounding: every value rounds to one of its two neighbours on the grid, the number
    of round-ups per element matches frac(v / s) within 6 sigma (z-score over all elements and
    draws), fresh numbers per call, and two ranks with the same seed round independently (|z| <= 6).
  * end to end over gloo (2 processes, interpreter): `compressed_all_reduce_` through the fused
    kernels and through the torch path give bit-identical results, residuals and CommStats.

Runs: the `test_interp_*` tests in an interpreter child (TRITON_INTERPRET=1, MEGAQ_KERNELS=triton);
the `gpu` tests on CUDA at 2^22+5 elements per rank (oracle on the CPU).
"""

import os
from unittest import mock

import pytest
import torch

from interpreter_utils import run_interpreter_child

from megaq.kernels import grad_comm
from megaq.parallel.grad_compression import (GradCompressionState, _quantize_with_feedback,
                                             compressed_all_reduce_)
from megaq.parallel.quantized_comm import (_dequantize, _flat_blocks, _padded_numel, _sum_received,
                                           _unpack_rows, track_comm)
from megaq.quant import QuantizedTensor

IN_CHILD = os.environ.get("MEGAQ_COMM_INTERP_CHILD") == "1"
interp_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter subprocess")
gpu = pytest.mark.gpu


def _kernels(mode: str):
    """MEGAQ_KERNELS=mode for the calls inside (a context manager)."""
    return mock.patch.dict(os.environ, {"MEGAQ_KERNELS": mode})


def _inputs(world, n, dtype, seed=0, ef=True, block=128):
    """Per rank: the bucket (N(0,1) with a few large blocks), a worker residual, a server residual."""
    g = torch.Generator().manual_seed(seed)
    padded = _padded_numel(n, world, block)
    xs, ws, ss = [], [], []
    for _ in range(world):
        x = torch.randn(n, generator=g)
        x[: n // 3] *= 30.0
        xs.append(x.to(dtype))
        ws.append(0.05 * torch.randn(padded, generator=g) if ef else None)
        ss.append(0.05 * torch.randn(padded // world, generator=g) if ef else None)
    return xs, ws, ss


def _clone(ts, device="cpu"):
    return [t.clone().to(device) if t is not None else None for t in ts]


def run_fused(xs, ws, ss, block, bits, rounding="nearest", average=True, device="cpu",
              out_dtype=torch.float32):
    """The simulated step through the fused kernels: per rank the send buffer, the received buffer,
    the all-gather segment; the output; the residuals after the step; the overflow flag."""
    world, n = len(xs), xs[0].numel()
    rc = _padded_numel(n, world, block) // block // world
    xs, ws, ss = _clone(xs, device), _clone(ws, device), _clone(ss, device)
    sends = []
    for r in range(world):
        send = grad_comm.exchange_buffer(world, rc, block, bits, device)
        grad_comm.worker_quantize(xs[r], ws[r], send, rc, block, bits, rounding, rank=r)
        sends.append(send)
    segs = []
    for j in range(world):
        recv = torch.stack([sends[r][j] for r in range(world)])
        seg = grad_comm.exchange_buffer(1, rc, block, bits, device)
        grad_comm.server_quantize(recv, ss[j], seg, rc, block, bits, rounding, average)
        segs.append(seg)
    gathered = torch.cat(segs)
    out = torch.empty(n, dtype=out_dtype, device=device)
    flag = grad_comm.dequantize_gathered(gathered, out, rc, block, bits)
    if ws[0] is not None:
        for r in range(world):
            grad_comm.zero_residuals_if_flag(flag, ws[r], ss[r])
    return dict(worker=[_unpacked(s, rc, block, bits) for s in sends],
                server=[_unpacked(s, rc, block, bits) for s in segs],
                out=out.cpu(), worker_residual=_clone(ws), server_residual=_clone(ss),
                overflow=bool(flag.cpu()[0]))


def _unpacked(buf, rc, block, bits):
    """(scales [rows], payload [rows, row bytes]) of a packed [k, seg] exchange buffer."""
    rb = grad_comm.row_bytes(block, bits)
    scales, payload = _unpack_rows(buf.cpu(), rc, rc * rb, torch.int8 if bits == 8 else torch.uint8)
    return scales.reshape(-1), payload.reshape(-1, rb)


def run_torch(xs, ws, ss, block, bits, rounding="nearest", average=True):
    """The same step through grad_compression's torch functions and the megaq.quant reference (CPU)."""
    world, n = len(xs), xs[0].numel()
    state = GradCompressionState(block=block, bits=bits, rounding=rounding)
    xs, ws, ss = _clone(xs), _clone(ws), _clone(ss)
    with _kernels("reference"):
        qts = []
        for r in range(world):
            blocks, _ = _flat_blocks(xs[r], world, block)
            v = blocks + ws[r].view_as(blocks) if ws[r] is not None else blocks
            qts.append(_quantize_with_feedback(v, ws[r], state))
        rc = qts[0].shape[0] // world
        qss = []
        for j in range(world):
            chunk = slice(j * rc, (j + 1) * rc)
            received = QuantizedTensor(torch.cat([q.data[chunk] for q in qts]),
                                       torch.cat([q.scale[chunk] for q in qts]), (1, block), bits,
                                       (world * rc, block))
            shard = _sum_received(received, world)
            if average:
                shard = shard / world
            if ss[j] is not None:
                shard = shard + ss[j].view_as(shard)
            qss.append(_quantize_with_feedback(shard, ss[j], state))
        full = QuantizedTensor(torch.cat([q.data for q in qss]), torch.cat([q.scale for q in qss]),
                               (1, block), bits, (world * rc, block))
        overflow = bool(torch.isnan(full.scale).any())
        if overflow and ws[0] is not None:
            for t in ws + ss:
                t.zero_()
        out = _dequantize(full, torch.float32).reshape(-1)[:n]
    return dict(worker=[(q.scale.reshape(-1), q.data) for q in qts],
                server=[(q.scale.reshape(-1), q.data) for q in qss], out=out,
                worker_residual=ws, server_residual=ss, overflow=overflow)


def _bits_equal(a, b):
    """Same shape and dtype, equal values, NaN where the other has NaN."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        nan = torch.isnan(a)
        return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])
    return torch.equal(a, b)


def assert_same_step(fused, ref):
    for name in ("worker", "server"):
        for rank, ((fs, fp), (rs, rp)) in enumerate(zip(fused[name], ref[name])):
            assert _bits_equal(fs, rs), (name, rank, "scales")
            # the payload of a row scales with its (possibly NaN) scale: compare them all
            assert _bits_equal(fp.view(rp.dtype), rp), (name, rank, "payload",
                                                        int((fp.view(rp.dtype) != rp).sum()))
    for name in ("worker_residual", "server_residual"):
        for rank, (f, r) in enumerate(zip(fused[name], ref[name])):
            assert _bits_equal(f, r), (name, rank)
    assert _bits_equal(fused["out"], ref["out"])
    assert fused["overflow"] == ref["overflow"]


def check_matches_torch(world, n, block, bits, dtype, ef=True, average=True, device="cpu", seed=0):
    xs, ws, ss = _inputs(world, n, dtype, seed, ef, block)
    fused = run_fused(xs, ws, ss, block, bits, average=average, device=device)
    assert_same_step(fused, run_torch(xs, ws, ss, block, bits, average=average))
    assert not fused["overflow"]
    if ef:  # the residuals are live: a step that changed nothing would pass the comparison too
        assert all(float(w.abs().max()) > 0 for w in fused["worker_residual"])
    exact = torch.stack([x.float() for x in xs]).sum(0) / (world if average else 1)
    err = float((fused["out"].double() - exact.double()).norm() / exact.double().norm())
    # and the step is the all-reduce: two quantizations plus the residuals fed back (measured on the
    # interpreter cases <= 1.2% INT8, <= 21% INT4, whose step is 18x coarser)
    assert err <= (0.3 if bits == 4 else 0.02), err


def check_out_dtypes(device="cpu", exact=False):
    """The final pass writes BF16/FP16 outputs: the FP32 output rounded (on the GPU exactly as
    torch rounds; the interpreter truncates to BF16: within one unit of the last place)."""
    xs, ws, ss = _inputs(2, 1000, torch.float32, seed=9)
    ref = run_fused(xs, ws, ss, 128, 8, device=device)["out"]
    for dtype, ulp in ((torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)):
        out = run_fused(xs, ws, ss, 128, 8, device=device, out_dtype=dtype)["out"]
        assert out.dtype == dtype
        if exact:
            assert torch.equal(out, ref.to(dtype)), dtype
        else:
            assert bool(((out.float() - ref).abs() <= ulp * ref.abs()).all()), dtype


def check_nonfinite(world, n, block, bits, device="cpu"):
    xs, ws, ss = _inputs(world, n, torch.float32, seed=5, block=block)
    xs[1][3] = float("nan")
    xs[1][min(n - 1, 2 * block + 1)] = float("inf")
    bad_blocks = sorted({3 // block, min(n - 1, 2 * block + 1) // block})
    fused = run_fused(xs, ws, ss, block, bits, device=device)
    assert_same_step(fused, run_torch(xs, ws, ss, block, bits))
    assert fused["overflow"]
    scales = fused["worker"][1][0]
    assert torch.isnan(scales).nonzero().reshape(-1).tolist() == bad_blocks
    padded = torch.nn.functional.pad(fused["out"], (0, -n % block), value=float("nan"))
    assert torch.isnan(padded.view(-1, block)).all(1).nonzero().reshape(-1).tolist() == bad_blocks
    tail = -n % block if (n - 1) // block in bad_blocks else 0
    assert int(torch.isnan(fused["out"]).sum()) == len(bad_blocks) * block - tail
    for t in fused["worker_residual"] + fused["server_residual"]:
        assert int(torch.count_nonzero(t)) == 0


def check_stochastic(block, bits, device="cpu", draws=48):
    """Worker pass, stochastic: per element q in {floor(v/s), floor(v/s)+1} and P(up) = frac(v/s)
    (z-score over all elements and draws); fresh numbers per call; rank 0 and rank 1 on the same
    input and seed round independently."""
    world, n = 2, 8 * block
    x = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(device)
    rc = n // block // world
    ref = run_torch([x.cpu()] * world, [None] * world, [None] * world, block, bits)
    scale = ref["worker"][0][0].repeat_interleave(block)
    v = (x.cpu() / scale).double()                           # the kernel's FP32 quotient
    low, frac = torch.floor(v), v - torch.floor(v)
    ups = torch.zeros(n, dtype=torch.float64)
    previous = None
    for i in range(draws):
        decided = []
        for rank in (0, 1):
            torch.manual_seed(100 + i)                       # the same seed on both "ranks"
            send = grad_comm.exchange_buffer(world, rc, block, bits, device)
            grad_comm.worker_quantize(x, None, send, rc, block, bits, "stochastic", rank=rank)
            s, p = _unpacked(send, rc, block, bits)
            assert torch.equal(s, ref["worker"][0][0])
            q = (QuantizedTensor(p.view(torch.int8) if bits == 8 else p, s.reshape(-1, 1), (1, block), bits,
                                 (n // block, block)).int_values().reshape(-1).double())
            d = q - low
            assert bool(((d == 0) | (d == 1)).all())
            decided.append(d)
        ups += decided[0]
        if i == 0:
            # independent decisions: the centred products have mean 0 and variance (f(1-f))^2;
            # shared random numbers give z ~ sqrt(elements)
            cov = ((decided[0] - frac) * (decided[1] - frac)).sum()
            z = float(cov / (frac * (1 - frac)).pow(2).sum().sqrt())
            assert abs(z) <= 6, f"ranks share random numbers (z = {z:.1f})"
        elif i == 1:
            assert not torch.equal(decided[0], previous), "the same random numbers on two calls"
        previous = decided[0]
    z = float((ups.sum() - draws * frac.sum()) / torch.sqrt(draws * (frac * (1 - frac)).sum()))
    assert abs(z) <= 6, z


# ---- CPU: the interpreter child, and the torch path without it -------------------------------

def test_triton_comm_under_interpreter():
    """Re-runs this file's `test_interp_*` tests with TRITON_INTERPRET=1 and MEGAQ_KERNELS=triton."""
    run_interpreter_child(__file__, "MEGAQ_COMM_INTERP_CHILD", timeout=600)


def test_cpu_takes_the_torch_path(monkeypatch):
    x = torch.zeros(1000)
    monkeypatch.setenv("MEGAQ_KERNELS", "auto")
    assert not grad_comm.fused_supported(x, 128, 8)           # CPU tensors: the torch path
    monkeypatch.setenv("MEGAQ_KERNELS", "reference")
    assert not grad_comm.fused_supported(x, 128, 8)


def test_fused_support_rules(monkeypatch):
    monkeypatch.setattr(grad_comm.dispatch, "_use_triton", lambda *t: True)
    x = torch.zeros(1000)
    assert grad_comm.fused_supported(x, 128, 8) and grad_comm.fused_supported(x.bfloat16(), 32, 4)
    assert not grad_comm.fused_supported(x, 100, 8)           # not a power of two
    assert not grad_comm.fused_supported(x, 2048, 8)          # beyond one program's row
    assert not grad_comm.fused_supported(x.double(), 128, 8)
    assert not grad_comm.fused_supported(torch.zeros(2000)[::2], 128, 8)
    assert grad_comm.segment_bytes(3, 128, 8) == 400 and grad_comm.segment_bytes(3, 128, 4) == 208


def test_buffers_are_checked():
    send = grad_comm.exchange_buffer(2, 4, 128, 8, "cpu")
    with pytest.raises(ValueError, match="send buffer"):
        grad_comm.worker_quantize(torch.zeros(1000), None, send[:, :-16], 4, 128, 8)
    with pytest.raises(ValueError, match="does not fit"):
        grad_comm.worker_quantize(torch.zeros(1025), None, send, 4, 128, 8)
    with pytest.raises(ValueError, match="rounding"):
        grad_comm.worker_quantize(torch.zeros(1000), None, send, 4, 128, 8, rounding="up")
    with pytest.raises(ValueError, match="worker residual"):
        grad_comm.worker_quantize(torch.zeros(1000), torch.zeros(1000), send, 4, 128, 8)


# ---- interpreter (run by the child above) ----------------------------------------------------

INTERP_CASES = [
    # world, n, block, bits, dtype, error feedback, average
    (2, 1000, 128, 8, torch.float32, True, True),
    (2, 100, 128, 4, torch.bfloat16, True, True),          # shorter than one block
    (4, 1600 * 384 + 7, 128, 8, torch.bfloat16, True, True),
    (4, 1600 * 384 + 7, 32, 4, torch.float32, True, True),
    (3, 5000, 32, 8, torch.float16, False, False),
    (2, 3000, 1024, 4, torch.float32, True, False),
]


@interp_only
@pytest.mark.parametrize("world,n,block,bits,dtype,ef,average", INTERP_CASES)
def test_interp_matches_the_torch_path(world, n, block, bits, dtype, ef, average):
    check_matches_torch(world, n, block, bits, dtype, ef, average)


@interp_only
def test_interp_output_dtypes():
    check_out_dtypes()


@interp_only
@pytest.mark.parametrize("bits", [8, 4])
def test_interp_nonfinite_propagates_and_drops_the_residuals(bits):
    check_nonfinite(2, 1000, 128, bits)
    check_nonfinite(2, 70, 32, bits)


@interp_only
@pytest.mark.parametrize("bits", [8, 4])
def test_interp_stochastic_rounding(bits):
    check_stochastic(32, bits)


def _fused_vs_torch_over_gloo(rank, world):
    """compressed_all_reduce_ through the fused kernels (MEGAQ_KERNELS=triton) and through the torch
    path (reference): two finite steps (live residuals), then an overflow in the first of the two
    buckets; INT8 and INT4. Returns per bits what the test asserts."""
    results = {}
    for bits in (8, 4):
        runs = {}
        for mode in ("triton", "reference"):
            gen = torch.Generator().manual_seed(10 + rank)
            state = GradCompressionState(bits=bits, bucket_numel=4096)  # 6100 elements: two buckets
            outs, residuals = [], []
            with _kernels(mode), track_comm() as stats:
                for step in range(3):
                    grads = [torch.randn(40, 130, generator=gen), torch.randn(900, generator=gen).bfloat16()]
                    if step == 2 and rank == 1:
                        grads[0][7, 3] = float("inf")        # element 913: the first bucket
                    compressed_all_reduce_(grads, None, state)
                    outs.append([g.clone() for g in grads])
                    residuals.append({k[1]: (w.clone(), s.clone()) for k, (w, s) in state.residuals.items()})
            runs[mode] = (outs, residuals, stats.as_dict())
        (fo, fr, fs), (ro, rr, rs) = runs["triton"], runs["reference"]
        results[bits] = dict(
            outputs=all(_bits_equal(a, b) for fa, ra in zip(fo, ro) for a, b in zip(fa, ra)),
            residuals=all(f.keys() == r.keys() == {0, 1} and all(_bits_equal(f[k][i], r[k][i])
                                                                 for k in f for i in (0, 1))
                          for f, r in zip(fr, rr)),
            stats=fs == rs and fs["grad_all_reduce[int%d]" % bits]["calls"] == 12,
            live=[float(fr[1][part][0].abs().max()) for part in (0, 1)],
            after_overflow=[float(fr[2][part][i].abs().max()) for part in (0, 1) for i in (0, 1)],
            overflow_nan=int(torch.isnan(fo[2][0]).sum()))
    return results


@interp_only
def test_interp_compressed_all_reduce_over_gloo():
    from distributed_utils import run_distributed
    for rank_result in run_distributed(_fused_vs_torch_over_gloo, 2, timeout=300):
        for bits, r in rank_result.items():
            assert r["outputs"] and r["residuals"] and r["stats"], (bits, r)
            assert min(r["live"]) > 0, (bits, r)
            # the overflowing bucket drops both residuals, the other bucket keeps its own
            assert r["after_overflow"][:2] == [0.0, 0.0] and min(r["after_overflow"][2:]) > 0, (bits, r)
            assert r["overflow_nan"] == 128, bits                # the Inf's block, on both ranks


# ---- GPU ---------------------------------------------------------------------------------------

GPU_N = (1 << 22) + 5


@gpu
@pytest.mark.parametrize("world,block,bits,dtype", [(2, 128, 8, torch.bfloat16), (4, 128, 8, torch.float32),
                                                    (4, 128, 4, torch.bfloat16), (2, 32, 4, torch.float32)])
def test_gpu_matches_the_torch_path(world, block, bits, dtype):
    check_matches_torch(world, GPU_N, block, bits, dtype, device="cuda")


@gpu
def test_gpu_nonfinite_stochastic_and_output_dtypes():
    check_out_dtypes("cuda", exact=True)
    for bits in (8, 4):
        check_nonfinite(4, GPU_N, 128, bits, device="cuda")
        check_stochastic(128, bits, device="cuda", draws=32)
