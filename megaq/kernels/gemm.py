"""`scaled_mm` of megaq.kernels: A · Bᵀ of two block-scaled `QuantizedTensor`s on the GPU.

    scaled_mm(a, b, out_dtype=torch.float32, bias=None, out_block=(1, 128), out_rounding="nearest",
              gelu_grad_of=None)

Which implementation runs, in the order `scaled_mm` asks: packed INT4 operands with one scale per row
go to csrc/int4_gemm where `_native_int4_eligible` says so (`MEGAQ_INT4_GEMM`); the `megaq.quant`
reference where `megaq.kernels.dispatch` says so or the blocks do not line up (`_gemm_plan`); on sm_90
the CUDA kernel of csrc/int8_gemm where `_cuda_int8_mode` picks it (`MEGAQ_INT8_GEMM`); else the
Triton kernel of `megaq.kernels.triton_gemm` with the tiles of `gemm_config` (GEMM_CONFIGS, overridden
by `dispatch.config_override`).
"""

from __future__ import annotations

import math
import os

import torch

from . import dispatch
from .dispatch import (_capability, _cdiv, _kernel, _placeholder, _pow2, _quant, _ref, _rint_libdevice,
                       _seed_tensor)
from .quantizers import quantize


# Default tile configurations; keys: (mode, G) -> config.
GEMM_CONFIGS = {
    # swept on an H100 SXM (2026-11, triton 3.6; tools/bench_kernels.py --sweep, docs/PERFORMANCE.md).
    # (mode, K granularity G, B scale per tile is a scalar) -> tile configuration
    ("rowcol", 0, True): dict(BM=128, BN=128, BK=128, J=1, CVT=0, GROUP_M=16, num_warps=4, num_stages=3),
    ("blocked", 128, True): dict(BM=128, BN=128, BK=128, J=1, CVT=0, GROUP_M=8, num_warps=8, num_stages=4),
    ("blocked", 128, False): dict(BM=64, BN=128, BK=128, J=1, CVT=0, GROUP_M=8, num_warps=4, num_stages=3),
    ("blocked", 256, False): dict(BM=64, BN=128, BK=256, J=1, CVT=0, GROUP_M=8, num_warps=4, num_stages=2),
    ("blocked", 64, False): dict(BM=64, BN=128, BK=64, J=1, CVT=0, GROUP_M=8, num_warps=4, num_stages=4),
    ("blocked", 32, False): dict(BM=64, BN=128, BK=32, J=1, CVT=0, GROUP_M=8, num_warps=4, num_stages=4),
}


_GEMM_KEYS = ("BM", "BN", "BK", "J", "CVT", "GROUP_M", "num_warps", "num_stages", "USE_TMA", "WS")


def gemm_config(mode: str, g: int, M: int, N: int, K: int, device=None, rb: int = 1) -> dict:
    g = g if mode == "blocked" else 0
    scalar_b = mode == "rowcol" or rb % 128 == 0 or rb >= N
    cfg = GEMM_CONFIGS.get((mode, g, scalar_b)) or GEMM_CONFIGS[(mode, g, not scalar_b)]
    cfg = dict(cfg)
    if device is not None and device.type == "cuda" and _capability(device.index or 0) < (9, 0):
        # sm_80/86/89: less shared memory per SM than sm_90's 228 KB
        cfg["num_stages"] = min(cfg["num_stages"], 3)
        cfg["BN"] = min(cfg["BN"], 128)
    if dispatch._CONFIG_OVERRIDE:
        cfg.update({k: v for k, v in dispatch._CONFIG_OVERRIDE.items() if k in _GEMM_KEYS})
    if mode == "blocked":
        cfg["BK"] = g
    # keep the operand ring inside shared memory (228 KB on sm_90, ~164 KB on sm_80)
    limit = 200 * 1024
    if device is not None and device.type == "cuda" and _capability(device.index or 0) < (9, 0):
        limit = 140 * 1024
    per_stage = (cfg["BM"] + cfg["BN"]) * cfg["BK"] * cfg.get("J", 1)
    while cfg["num_stages"] > 1 and cfg["num_stages"] * per_stage > limit:
        cfg["num_stages"] -= 1
    return cfg


def _gemm_plan(a, b):
    """(mode, G, ratio_a, ratio_b, stride_sak, stride_sbk) or None when the blocks don't line up."""
    M, K = a.shape
    ga, gb = a.block[1], b.block[1]
    a_row, b_row = ga >= K, gb >= K
    if a_row and b_row:
        return "rowcol", 0, 1, 1, 0, 0
    gs = [g for g, r in ((ga, a_row), (gb, b_row)) if not r]
    g = min(gs)
    if g not in (32, 64, 128, 256) or any(x % g for x in gs):
        return None
    ratio_a = 1 if a_row else ga // g
    ratio_b = 1 if b_row else gb // g
    if not (_pow2(ratio_a) and _pow2(ratio_b)):
        return None
    sak = 0 if a_row else a.scale.stride(1)
    sbk = 0 if b_row else b.scale.stride(1)
    return "blocked", g, ratio_a, ratio_b, sak, sbk


def scaled_mm(a, b, out_dtype: torch.dtype = torch.float32, bias: torch.Tensor | None = None, *,
              out_block: tuple[int, int] = (1, 128), out_rounding: str = "nearest",
              generator: torch.Generator | None = None, gelu_grad_of=None):
    """`A · Bᵀ` for `QuantizedTensor`s quantized along their shared last dim (K), each with its own
    block scales: Σ_kb s_a[m, kb] s_b[n, kb] Σ_{k∈kb} a[m, k] b[n, k] (+ bias[n]).

    out_dtype float32/bfloat16/float16 returns a tensor; `torch.int8` returns the output requantized
    per `out_block` (1 × QB) as a `QuantizedTensor` (the INT8 data flow), rounding `out_rounding`. On
    sm_90 the (1, 128) nearest case runs in the CUDA kernel's epilogue, which gives a block holding a
    NaN a NaN scale (the reference and the Triton epilogue give it scale 1).

    gelu_grad_of (an INT8 `QuantizedTensor` [M, N] in (1, 128) blocks: a GELU's saved input h): the
    product times GELU'(h), i.e. the GELU's backward applied to the product (the INT8 data flow's fc2
    dgrad, whose product is the gradient of the GELU's output). On sm_90 with a per-row × per-column
    plan, BF16 out, no bias and N % 8 == 0 it runs in the CUDA kernel's epilogue (the same roundings);
    elsewhere the product is written in `out_dtype` and `dataflow.gelu_backward` applied to it.
    """
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"scaled_mm: reduction sizes differ: A {a.shape} vs B {b.shape}")
    if gelu_grad_of is not None:
        return _scaled_mm_gelu_backward(a, b, out_dtype, bias, gelu_grad_of)
    int8_out = out_dtype == torch.int8
    if _native_int4_eligible(a, b, out_dtype):
        from .cuda_ext import int4_gemm
        out = int4_gemm(a.data, b.data, a.scale, b.scale, out_dtype=out_dtype)
        return out + bias.to(out.dtype) if bias is not None else out
    plan = _gemm_plan(a, b) if dispatch._use_triton(a.data, b.data) else None
    if plan is None or (bias is not None and bias.device != a.data.device) or 0 in (*a.shape, b.shape[0]):
        out = _ref().scaled_mm(a, b, torch.float32, bias)
        if int8_out:
            return quantize(out, out_block, 8, out_rounding, generator, check=False)
        return out.to(out_dtype)
    return _gpu_scaled_mm(a, b, plan, out_dtype, bias, out_block, out_rounding, generator)


def _scaled_mm_gelu_backward(a, b, out_dtype, bias, h):
    """`scaled_mm(..., gelu_grad_of=h)`: the CUDA epilogue where it applies, else the two steps."""
    M, N = a.shape[0], b.shape[0]
    if h.bits != 8 or tuple(h.shape) != (M, N) or h.block != (1, 128):
        raise ValueError(f"scaled_mm: gelu_grad_of must be an INT8 [{M}, {N}] QuantizedTensor in (1, 128) "
                         f"blocks; got {h!r}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"scaled_mm: gelu_grad_of needs a floating out_dtype; got {out_dtype}")
    plan = _gemm_plan(a, b) if dispatch._use_triton(a.data, b.data, h.data) else None
    if plan is not None and bias is None and out_dtype == torch.bfloat16 and a.bits == b.bits == 8 and N % 8 == 0:
        mode = plan[0]
        K = a.shape[1]
        ad, bd = a.int_values().contiguous(), b.int_values().contiguous()
        if mode == "rowcol" and K * 127 * 127 < 2 ** 31 \
                and _cuda_int8_mode(a, b, ad, bd, mode, *plan[1:4], out_dtype) == "rowcol":
            from .cuda_ext import int8_gemm
            return int8_gemm(ad, bd, a.scale.float(), b.scale.float(), mode="rowcol", out_dtype=out_dtype,
                             gelu_input=(h.data, h.scale))
    from .dataflow import gelu_backward
    return gelu_backward(h, scaled_mm(a, b, out_dtype, bias))


def _native_int4_eligible(a, b, out_dtype) -> bool:
    """The csrc/ INT4 tensor-core GEMM takes two packed INT4 operands with one scale per row each, on
    GPUs whose INT4 mma is native (sm_80/86/89). `MEGAQ_INT4_GEMM=native` forces it wherever it runs
    (sm_90 too, where it is emulated: for testing), `=int8` never uses it."""
    choice = os.environ.get("MEGAQ_INT4_GEMM", "auto")
    if choice == "int8" or a.bits != 4 or b.bits != 4 or not a.data.is_cuda:
        return False
    if out_dtype not in (torch.float32, torch.bfloat16):
        return False
    per_row = a.block == (1, a.shape[1]) and b.block == (1, b.shape[1])
    if not per_row:
        return False
    from .cuda_ext import has_native_int4_mma, int4_gemm_available
    if not int4_gemm_available(a.data.device):
        return False
    return choice == "native" or has_native_int4_mma(a.data.device)


_INT8_GEMM_CHOICES = ("auto", "cuda", "triton")
# The csrc/int8_gemm modes that `auto` routes to: those measured faster than the Triton kernel on the
# H100 (tools/bench_kernels.py, 2026-11-22, TOPS CUDA / Triton on the five GEMM shapes of the issue):
# rowcol 1.04-1.21x on all five; block128 with 128x128 B blocks 0.94-1.15x (one shape slower),
# with a B scale per row 0.98-1.30x (one slower). Keys: (mode, B scale layout: "row" one per row of
# B, "block" one per 128-row block, "-" for rowcol).
_CUDA_INT8_AUTO = {("rowcol", "-"), ("block128", "block"), ("block128", "row")}


def _cuda_int8_mode(a, b, ad, bd, mode, g, ratio_a, ratio_b, out_dtype, int8_out_plain=False) -> str | None:
    """"rowcol" / "block128" when the sm_90 CUDA kernel (megaq.kernels.cuda_ext.int8_gemm) runs this
    GEMM, else None (Triton). `MEGAQ_INT8_GEMM=auto|cuda|triton` (default auto): auto takes the CUDA
    kernel for the plans in _CUDA_INT8_AUTO, cuda for every plan it supports (and fails where the
    kernel is unavailable), triton never. The CUDA kernel supports rowcol and K-blocks of 128 with one A
    scale per row (per K-block), B scales per row or per 128-row block, FP32/BF16 output, or INT8 output
    requantized per (1, 128) block with nearest rounding (`int8_out_plain`), K % 16 == 0.
    While config_override sets GEMM keys (Triton tile settings) auto stays on Triton."""
    choice = os.environ.get("MEGAQ_INT8_GEMM", "auto").strip().lower() or "auto"
    if choice not in _INT8_GEMM_CHOICES:
        raise ValueError(f"MEGAQ_INT8_GEMM must be one of {list(_INT8_GEMM_CHOICES)}; got {choice!r}")
    if choice == "triton" or ad.device.type != "cuda":
        return None
    if out_dtype not in (torch.float32, torch.bfloat16) and not (out_dtype == torch.int8 and int8_out_plain):
        return None
    if choice == "auto" and any(k in (dispatch._CONFIG_OVERRIDE or {}) for k in _GEMM_KEYS):
        return None
    rb = b.block[0]
    if a.block[0] != 1 or a.shape[1] % 16 or ad.data_ptr() % 16 or bd.data_ptr() % 16:
        return None
    if mode == "rowcol" and rb == 1:
        key = ("rowcol", "-")
    elif mode == "blocked" and g == 128 and ratio_a == ratio_b == 1 and (rb == 1 or rb % 128 == 0):
        key = ("block128", "row" if rb == 1 else "block")
    else:
        return None
    from .cuda_ext import extension_unavailable_reason, int8_gemm_available
    if not int8_gemm_available(ad.device):
        if choice == "cuda":
            raise RuntimeError(f"MEGAQ_INT8_GEMM=cuda but the sm_90 INT8 GEMM cannot run on {ad.device} "
                               f"(capability {torch.cuda.get_device_capability(ad.device)}; extension: "
                               f"{extension_unavailable_reason() or 'loaded'})")
        return None
    return key[0] if choice == "cuda" or key in _CUDA_INT8_AUTO else None


def _gpu_scaled_mm(a, b, plan, out_dtype, bias, out_block, out_rounding, generator):
    """`scaled_mm` on the GPU (or the interpreter): csrc/int8_gemm where `_cuda_int8_mode` picks it,
    else the Triton kernel."""
    mode, g, ratio_a, ratio_b, sak, sbk = plan
    M, K = a.shape
    N = b.shape[0]
    dev = a.data.device
    ad = a.int_values().contiguous()
    bd = b.int_values().contiguous()
    sa = a.scale.float().contiguous() if a.scale.dtype != torch.float32 else a.scale
    sb = b.scale.float().contiguous() if b.scale.dtype != torch.float32 else b.scale
    if mode == "rowcol" and K * 127 * 127 >= 2 ** 31:
        mode, g = "blocked", 128            # keep INT32 partials from overflowing
        ratio_a = ratio_b = 1
        sak = sbk = 0
    # the CUDA kernel's INT8 epilogue: (1, 128) blocks, nearest rounding (stochastic stays on Triton)
    int8_out_plain = out_dtype == torch.int8 and out_rounding == "nearest" \
        and _quant().resolve_block(out_block, (M, N)) == (1, 128)
    cuda_mode = _cuda_int8_mode(a, b, ad, bd, mode, g, ratio_a, ratio_b, out_dtype, int8_out_plain)
    if cuda_mode is not None:
        from .cuda_ext import int8_gemm
        out = int8_gemm(ad, bd, sa, sb, mode=cuda_mode, scale_b_rows=b.block[0], bias=bias,
                        out_dtype=out_dtype)
        if out_dtype == torch.int8:
            return _quant().QuantizedTensor(out[0], out[1], (1, 128), 8, (M, N))
        return out
    cfg = gemm_config(mode, g, M, N, K, dev, b.block[0])
    BM, BN, BK, J = cfg["BM"], cfg["BN"], cfg["BK"], cfg["J"]
    ra, rb = a.block[0], b.block[0]
    sa_scalar = ra % BM == 0 or ra >= M
    sb_scalar = rb % BN == 0 or rb >= N
    int8_out = out_dtype == torch.int8
    qb = 0
    if int8_out:
        qb = _quant().resolve_block(out_block, (M, N))[1]
        if out_block[0] != 1 or not _pow2(qb) or qb < 16 or qb > BN or BN % qb:
            out = _gpu_scaled_mm(a, b, plan, torch.float32, bias, out_block, out_rounding, generator)
            return quantize(out, out_block, 8, out_rounding, generator, check=False)
        c = torch.empty((M, N), dtype=torch.int8, device=dev)
        cs = torch.empty((M, math.ceil(N / qb)), dtype=torch.float32, device=dev)
    else:
        c = torch.empty((M, N), dtype=out_dtype, device=dev)
        cs = None
    use_tma = cfg.get("USE_TMA", True) and dispatch._has_tma(dev) and K % 16 == 0 \
        and ad.data_ptr() % 16 == 0 and bd.data_ptr() % 16 == 0
    a_desc = b_desc = None
    a_ptr, b_ptr = ad, bd
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        a_desc = TensorDescriptor.from_tensor(ad, [BM, BK])
        b_desc = TensorDescriptor.from_tensor(bd, [BN, BK])
        a_ptr = b_ptr = None
    dummy = _placeholder(dev, torch.float32)
    stochastic = int8_out and out_rounding == "stochastic"
    seed = _seed_tensor(dev, generator) if stochastic else dummy
    has_bias = bias is not None
    grid = (_cdiv(M, BM) * _cdiv(N, BN),)
    _kernel("triton_gemm", "_scaled_mm_kernel")[grid](
        a_ptr, a_desc, b_ptr, b_desc, sa, sb, c, cs if cs is not None else dummy,
        bias.contiguous() if has_bias else dummy, seed,
        M, N, K, ad.stride(0), bd.stride(0), c.stride(0),
        sa.stride(0), sak, sb.stride(0), sbk, cs.stride(0) if cs is not None else 0,
        ra, rb, sa.shape[1] if sak else 2 ** 30, sb.shape[1] if sbk else 2 ** 30,
        MODE=0 if mode == "rowcol" else 1, BM=BM, BN=BN, BK=BK, J=J, GROUP_M=cfg["GROUP_M"],
        RATIO_A=ratio_a, RATIO_B=ratio_b, SA_SCALAR=sa_scalar, SB_SCALAR=sb_scalar,
        CVT=cfg["CVT"], HAS_BIAS=has_bias, OUT_MODE=1 if int8_out else 0, OUT_QB=max(qb, 1),
        OUT_STOCHASTIC=stochastic, USE_TMA=use_tma, EVEN_K=K % (BK * J) == 0,
        RINT_LIBDEVICE=_rint_libdevice(), WS=bool(cfg.get("WS", False)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if int8_out:
        return _quant().QuantizedTensor(c, cs, (1, qb), 8, (M, N))
    return c
