"""The INT4 tensor-core GEMM of csrc/int4_gemm (megaq._C.int4_gemm via megaq.kernels.cuda_ext).

GPU tests (marked `gpu`, skipped without CUDA) compare it with an exact reference: the unpacked INT4
values multiplied in float64 (exact: |acc| <= 64*K << 2^53). Bounds:
  * int32 output (raw accumulators): bit-exact;
  * float32 output: relative error <= 2.5e-7 against acc * scale_a * scale_b in float64
    (two FP32 roundings: scale_a*scale_b, then acc*that; float(acc) itself is exact, |acc| < 2^24);
  * bfloat16 output: relative error <= 2^-8 (one more rounding to 8 significant bits).
On sm_90 (H100) the s4 mma is emulated: these tests check correctness there, not speed.

Run as a script on a GPU for a timing of the s4 GEMM against torch._int_mm:
    python tests/test_int4_cuda.py [M N K ...]
The nvcc compile check of csrc/ for sm_80/sm_89/sm_90a is .ci/check_cuda.sh (run by .ci/run).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaq.kernels import cuda_ext
from megaq.quant import pack_int4, quantize_blockwise, unpack_int4

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "int4_gemm" / "int4_gemm.h"

# (M, N, K): awkward shapes -- tails in M, N and K; N > 4096 (Jetfire never wrote columns past
# 4096); K not a multiple of the 128-wide K tile; K not even a multiple of 32 (wrapper pads).
SHAPES = [
    (1000, 1600, 384),
    (77, 200, 128),
    (65, 4200, 256),
    (257, 300, 2112),
    (1, 1, 64),
    (33, 17, 100),
    (128, 128, 1600),
]


def _rand_int4(rows: int, cols: int, gen: torch.Generator, device) -> torch.Tensor:
    # full two's complement range, -8 included, so the sign extension of every nibble is exercised
    return torch.randint(-8, 8, (rows, cols), generator=gen, dtype=torch.int8).to(device)


def _operands(m, n, k, seed=0, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    a = _rand_int4(m, k, gen, device)
    b = _rand_int4(n, k, gen, device)
    sa = (torch.rand(m, generator=gen) * 0.1 + 1e-3).to(device)
    sb = (torch.rand(n, generator=gen) * 0.1 + 1e-3).to(device)
    return a, b, sa, sb


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.double() @ b.double().T


# ---------------------------------------------------------------------------------------------- CPU


def test_packing_convention_matches_kernel_header():
    """csrc/int4_gemm/int4_gemm.h documents: element 2i -> low nibble, 2i+1 -> high nibble."""
    values = torch.tensor([[1, -2, 7, -8, 3]], dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 3)
    assert packed[0, 0].item() == (0x1 | (0xE << 4))  # 1 low, -2 = 0xE high
    assert packed[0, 1].item() == (0x7 | (0x8 << 4))
    assert packed[0, 2].item() == 0x3  # odd length: zero high nibble
    assert torch.equal(unpack_int4(packed, 5), values)
    text = HEADER.read_text()
    assert "LOW" in text and "element 2i" in text


def test_wrapper_pads_k_to_whole_16_byte_chunks():
    gen = torch.Generator().manual_seed(1)
    packed = pack_int4(_rand_int4(5, 100, gen, "cpu"))  # 50 bytes
    padded = cuda_ext._prepare_packed(packed, 64, "a")
    assert padded.shape == (5, 64)
    assert torch.equal(padded[:, :50], packed) and not padded[:, 50:].any()
    assert torch.equal(unpack_int4(padded, 128)[:, :100], unpack_int4(packed, 100))


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only behaviour")
def test_extension_reports_why_it_is_unavailable_without_cuda():
    assert cuda_ext.load_extension() is None
    reason = cuda_ext.extension_unavailable_reason()
    assert reason and "megaq._C" in reason
    assert not cuda_ext.int4_gemm_available()
    with pytest.raises(RuntimeError, match="megaq._C"):
        cuda_ext.int4_gemm(torch.zeros(1, 16, dtype=torch.uint8), torch.zeros(1, 16, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def ext():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("INT4 mma needs compute capability >= 8.0")
    module = cuda_ext.load_extension()
    if module is None:
        pytest.fail(f"CUDA GPU present but the extension is unavailable: "
                    f"{cuda_ext.extension_unavailable_reason()}")
    return module


@gpu
@needs_cuda
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int4_gemm_int32_is_exact(ext, m, n, k):
    a, b, _, _ = _operands(m, n, k)
    acc = cuda_ext.int4_gemm(pack_int4(a), pack_int4(b), out_dtype=torch.int32)
    torch.cuda.synchronize()
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    ref = _exact(a, b).to(torch.int32)
    mismatch = (acc != ref).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} wrong entries, first at {mismatch[:5].tolist()}"


@gpu
@needs_cuda
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("out_dtype,rtol",
                         [(torch.float32, 2.5e-7), (torch.bfloat16, 2.0**-8 + 1e-6)])
def test_int4_gemm_scaled_output(ext, m, n, k, out_dtype, rtol):
    a, b, sa, sb = _operands(m, n, k, seed=2)
    out = cuda_ext.int4_gemm(pack_int4(a), pack_int4(b), sa, sb, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    ref = _exact(a, b) * sa.double()[:, None] * sb.double()[None, :]
    err = (out.double() - ref).abs()
    bound = rtol * ref.abs()
    assert bool((err <= bound).all()), f"max rel err {(err / ref.abs().clamp_min(1e-30)).max():.3g} > {rtol}"


@gpu
@needs_cuda
def test_int4_gemm_on_quantized_tensors_matches_dequantized_product(ext):
    """What megaq.ops will do: per-token X and per-output-channel W INT4 from megaq.quant."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 1600, generator=gen).cuda()
    w = torch.randn(384, 1600, generator=gen).cuda()
    qx = quantize_blockwise(x, (1, -1), bits=4)
    qw = quantize_blockwise(w, (1, -1), bits=4)
    y = cuda_ext.int4_gemm(qx.data, qw.data, qx.scale, qw.scale, out_dtype=torch.float32)
    ref = _exact(qx.int_values(), qw.int_values()) * qx.scale.double() * qw.scale.double().T
    torch.testing.assert_close(y.double(), ref, rtol=2.5e-7, atol=0)
    # and the dequantized product, which is what the GEMM stands for
    deq = qx.dequantize(torch.float64) @ qw.dequantize(torch.float64).T
    torch.testing.assert_close(y.double(), deq, rtol=1e-5, atol=1e-5 * deq.abs().max().item())


@gpu
@needs_cuda
def test_int4_gemm_strided_misaligned_and_out_argument(ext):
    m, n, k = 70, 90, 256
    a, b, sa, sb = _operands(m, n, k, seed=4)
    pa, pb = pack_int4(a), pack_int4(b)  # [m, 128] bytes
    wide = torch.zeros(m, 128 + 48, dtype=torch.uint8, device="cuda")
    wide[:, 16:144] = pa
    strided = wide[:, 16:144]  # row stride 176 bytes (16-aligned), offset 16: used as is
    wide2 = torch.zeros(m, 128 + 8, dtype=torch.uint8, device="cuda")
    wide2[:, 8:] = pa
    misaligned = wide2[:, 8:]  # offset 8 bytes: the wrapper copies it
    out = torch.full((m, n), float("nan"), device="cuda")
    ref = (_exact(a, b) * sa.double()[:, None] * sb.double()[None, :])
    for operand in (strided, misaligned):
        res = cuda_ext.int4_gemm(operand, pb, sa[:, None], sb[:, None], out=out)
        assert res.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out.double(), ref, rtol=2.5e-7, atol=0)


def _check_bad_arguments() -> None:
    ext = cuda_ext.load_extension()
    pa = torch.zeros(4, 32, dtype=torch.uint8, device="cuda")
    out = torch.empty(4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ext.int4_gemm(pa.cpu(), pa.cpu(), torch.empty(4, 4), None, None)
    with pytest.raises(RuntimeError, match="got 8 bytes"):
        ext.int4_gemm(pa[:, :8], pa[:, :8], out, None, None)
    with pytest.raises(RuntimeError, match="float32"):
        ext.int4_gemm(pa, pa, out, torch.ones(4, device="cuda", dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match=r"M = 4 elements; got shape \[3\]"):
        ext.int4_gemm(pa, pa, out, torch.ones(3, device="cuda"), None)
    with pytest.raises(RuntimeError, match=r"out must be \[4, 4\]; got \[4, 5\]"):
        ext.int4_gemm(pa, pa, torch.empty(4, 5, device="cuda"), None, None)
    with pytest.raises(RuntimeError, match="raw accumulators"):
        ext.int4_gemm(pa, pa, out.int(), torch.ones(4, device="cuda"), None)
    with pytest.raises(ValueError, match="same packed K"):
        cuda_ext.int4_gemm(pa, pa[:, :16])
    with pytest.raises(TypeError, match="uint8"):
        cuda_ext.int4_gemm(pa.float(), pa.float())
    print("all bad arguments rejected")


@gpu
@needs_cuda
def test_int4_gemm_rejects_bad_arguments_clearly(ext):
    """In a subprocess: a broken error path (a toolchain whose static libstdc++ cannot format numbers
    crashed here once) must fail this test, not kill the whole session."""
    code = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); "
            "runpy.run_path(sys.argv[2])['_check_bad_arguments']()")
    res = subprocess.run([sys.executable, "-c", code, str(ROOT), __file__], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and "all bad arguments rejected" in res.stdout, (
        f"exit code {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


# ------------------------------------------------------------------------------------ timing (script)


def _time_ms(fn, iters=20, warmup=5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def benchmark(shapes=((4096, 4096, 4096),)) -> list[dict]:
    """Median time and TOP/s of the s4 GEMM (bf16 output with row/col scales) vs torch._int_mm."""
    rows = []
    name = torch.cuda.get_device_name()
    for m, n, k in shapes:
        a, b, sa, sb = _operands(m, n, k, seed=5)
        pa, pb = pack_int4(a), pack_int4(b)
        a8, b8 = a.contiguous(), b.contiguous()  # b8.T: [K, N] column-major, the "NT" layout
        ops = 2.0 * m * n * k
        t_s4 = _time_ms(lambda: cuda_ext.int4_gemm(pa, pb, sa, sb, out_dtype=torch.bfloat16))
        t_s4_i32 = _time_ms(lambda: cuda_ext.int4_gemm(pa, pb, out_dtype=torch.int32))
        t_i8 = _time_ms(lambda: torch._int_mm(a8, b8.T))
        a16, b16 = a.bfloat16(), b.bfloat16()
        t_bf16 = _time_ms(lambda: a16 @ b16.T)
        row = dict(device=name, m=m, n=n, k=k,
                   s4_bf16_out_ms=t_s4, s4_bf16_out_tops=ops / t_s4 / 1e9,
                   s4_int32_out_ms=t_s4_i32, s4_int32_out_tops=ops / t_s4_i32 / 1e9,
                   int_mm_s8_ms=t_i8, int_mm_s8_tops=ops / t_i8 / 1e9,
                   bf16_ms=t_bf16, bf16_tflops=ops / t_bf16 / 1e9)
        rows.append(row)
        print(f"{name} {m}x{n}x{k}: s4 (bf16 out) {row['s4_bf16_out_tops']:.1f} TOP/s "
              f"({t_s4:.3f} ms) | s4 (int32 out) {row['s4_int32_out_tops']:.1f} | torch._int_mm s8 "
              f"{row['int_mm_s8_tops']:.1f} TOP/s ({t_i8:.3f} ms) | bf16 {row['bf16_tflops']:.1f} "
              f"TFLOP/s", flush=True)
    return rows


if __name__ == "__main__":
    args = [int(v) for v in sys.argv[1:]]
    shapes = [tuple(args[i:i + 3]) for i in range(0, len(args), 3)] or [(4096, 4096, 4096)]
    benchmark(shapes)


# ------------------------------------------------------------------- dispatch: megaq.kernels.scaled_mm

def test_dispatch_keeps_int4_on_the_reference_off_gpu(monkeypatch):
    monkeypatch.setenv("MEGAQ_INT4_GEMM", "native")
    from megaq.kernels import gemm
    a = quantize_blockwise(torch.randn(5, 64), (1, -1), bits=4)
    assert not gemm._native_int4_eligible(a, a, torch.float32)


@gpu
@needs_cuda
@pytest.mark.parametrize("m,n,k", [(77, 200, 128), (300, 1600, 384)])
def test_scaled_mm_dispatches_per_row_int4_to_the_native_gemm(ext, monkeypatch, m, n, k):
    # forced on wherever the extension runs (on sm_90 the s4 mma is emulated: correctness only)
    from megaq import kernels
    from megaq.kernels import gemm
    from megaq.quant import hq_quantize
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(m, k, generator=gen).cuda()
    w = torch.randn(n, k, generator=gen).cuda()
    qx, qw = hq_quantize(x, 32), hq_quantize(w, 32)
    expected = qx.dequantize() @ qw.dequantize().t()
    monkeypatch.setenv("MEGAQ_INT4_GEMM", "native")
    assert gemm._native_int4_eligible(qx, qw, torch.float32)
    bias = torch.randn(n, generator=gen).cuda()
    got = kernels.scaled_mm(qx, qw, torch.float32, bias)
    rel = float((got - bias - expected).norm() / expected.norm())
    assert rel < 1e-6, rel   # INT32 accumulation is exact; only the FP32 scaling rounds
