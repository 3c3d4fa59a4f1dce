"""The C++/CUDA extension `megaq._C` (sources in csrc/): loader and Python wrappers.

`load_extension()` returns the extension module, or None where it cannot exist (no CUDA build of
PyTorch, no GPU, no nvcc, no sources); `extension_unavailable_reason()` then says why. It is found
in this order:
  1. `megaq._C`, built by setup.py (`pip install -e . --no-build-isolation` on a CUDA machine);
  2. a JIT build with `torch.utils.cpp_extension.load` from the csrc/ of a source checkout, cached
     under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), done once per source change,
     only when a GPU, a CUDA build of PyTorch and nvcc are present. `MEGAQ_JIT=0` turns it off;
     `MEGAQ_JIT_VERBOSE=1` shows the compiler's output.
Nothing is imported or compiled until the first call. This module never decides which kernel runs:
that is megaq.kernels.gemm's job (`_cuda_int8_mode`, `_native_int4_eligible`).

Kernels:
  int4_gemm(a_packed, b_packed, scale_a, scale_b, out_dtype)  -- INT4 x INT4 tensor-core GEMM
    (mma.sync m16n8k64 s4), native on sm_80/86/89, emulated (slow, correctness only) on sm_90.
  int8_gemm(a, b, scale_a, scale_b, mode=...)  -- INT8 scaled_mm on Hopper (wgmma s8, TMA, warp
    specialization; sm_90 only, built for sm_90a), per-row x per-column or per-128-of-K scales.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "load_extension",
    "extension_unavailable_reason",
    "int4_gemm",
    "int4_gemm_available",
    "has_native_int4_mma",
    "int8_gemm",
    "int8_gemm_available",
    "csrc_dir",
]

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "reason": "not loaded yet"}


def csrc_dir() -> Path:
    """csrc/ of the source checkout this package was imported from (may not exist when installed)."""
    return Path(__file__).resolve().parents[2] / "csrc"


def _sources() -> list[str]:
    root = csrc_dir()
    if not root.is_dir():
        return []
    return sorted(str(p) for p in list(root.rglob("*.cpp")) + list(root.rglob("*.cu")))


def _jit_arch_flags() -> list[str]:
    """-gencode flags for the visible GPUs, sm_90 as sm_90a: the INT8 GEMM's wgmma / setmaxnreg exist
    only in the arch-specific target, which torch's default flags (plain sm_90) leave out. An explicit
    TORCH_CUDA_ARCH_LIST is respected as given (write 9.0a there for the INT8 GEMM)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    flags = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
        flag = f"-gencode=arch=compute_{arch},code=sm_{arch}"
        if flag not in flags:
            flags.append(flag)
    return flags


def _jit_build() -> tuple[ModuleType | None, str | None]:
    if os.environ.get("MEGAQ_JIT", "1").strip() == "0":
        return None, "JIT build disabled by MEGAQ_JIT=0"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return None, "no CUDA device is available"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return None, "nvcc / the CUDA toolkit was not found for a JIT build (set CUDA_HOME)"
    sources = _sources()
    if not sources:
        return None, f"no CUDA sources at {csrc_dir()} (JIT needs a source checkout)"
    try:
        module = cpp_extension.load(
            name="megaq_C",
            sources=sources,
            extra_include_paths=[str(csrc_dir())],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo", "--expt-relaxed-constexpr", *_jit_arch_flags()],
            verbose=os.environ.get("MEGAQ_JIT_VERBOSE", "0") == "1",
        )
    except Exception as exc:  # compiler error, missing ninja, ...
        return None, f"JIT build of csrc/ failed: {exc.__class__.__name__}: {exc}"
    return module, None


def load_extension() -> ModuleType | None:
    """The `megaq._C` module (prebuilt, else JIT-built), or None; see extension_unavailable_reason()."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        try:
            from megaq import _C as module  # type: ignore[attr-defined]

            reason = None
        except ImportError as exc:
            prebuilt = f"megaq._C is not built ({exc})"
            module, jit_reason = _jit_build()
            reason = None if module is not None else f"{prebuilt}; {jit_reason}"
        _state.update(tried=True, module=module, reason=reason)
        return module


def extension_unavailable_reason() -> str | None:
    """None when the extension is loaded, else why it is not (tries to load it first)."""
    load_extension()
    return _state["reason"]


def has_native_int4_mma(device: torch.device | int | str | None = None) -> bool:
    """True where INT4 mma.sync runs on real INT4 tensor cores (sm_80, 86, 87, 89). On sm_90 it is
    emulated (~50 TOPS, slower than INT8 there) and newer architectures are not claimed."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major == 8


def int4_gemm_available(device: torch.device | int | str | None = None) -> bool:
    """True when int4_gemm can run on `device` (extension loaded, compute capability >= 8.0)."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8 and load_extension() is not None


def _prepare_packed(t: torch.Tensor, k_bytes: int, name: str) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"int4_gemm: {name} must be 2-D [rows, K/2] packed INT4; got {tuple(t.shape)}")
    if t.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"int4_gemm: {name} must be packed INT4 as uint8 (megaq.quant.pack_int4); "
                        f"got {t.dtype}")
    if t.shape[1] != k_bytes:
        t = torch.nn.functional.pad(t, (0, k_bytes - t.shape[1]))  # zero nibbles add nothing
    if t.stride(-1) != 1 or t.data_ptr() % 16 or (t.shape[0] > 1 and t.stride(0) % 16):
        t = t.contiguous() if not t.is_contiguous() else t.clone()
    return t


def _prepare_scale(s: torch.Tensor | None, n: int, name: str, device) -> torch.Tensor | None:
    if s is None:
        return None
    if s.numel() != n:
        raise ValueError(f"int4_gemm: {name} must hold {n} scales (one per row); got shape "
                         f"{tuple(s.shape)}")
    return s.to(device=device, dtype=torch.float32).reshape(n).contiguous()


def int4_gemm(a_packed: torch.Tensor, b_packed: torch.Tensor, scale_a: torch.Tensor | None = None,
              scale_b: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """`out = (A @ B.T) * scale_a[:, None] * scale_b[None, :]` on INT4 tensor cores.

    a_packed: uint8 [M, ceil(K/2)], b_packed: uint8 [N, ceil(K/2)] -- INT4 packed two per byte as
    megaq.quant.pack_int4 does (element 2i in the low nibble, 2i+1 in the high nibble, two's
    complement), on the same CUDA device. Any K: the packed K is zero-padded to a multiple of 32
    values when needed (a copy). scale_a: [M] (or [M, 1]), scale_b: [N] (or [N, 1]), any float
    dtype (used as FP32), or None for ones. out_dtype: torch.float32 or torch.bfloat16, or
    torch.int32 for the raw, exact INT32 accumulators (then no scales). `out` (optional):
    a preallocated [M, N] tensor of out_dtype with contiguous rows.

    The INT32 accumulation is exact; float32 output is float(acc) * (scale_a[m] * scale_b[n]) in
    FP32 (relative error <= ~2 ulp vs an exact product); bfloat16 rounds that once more.
    """
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"int4_gemm needs the CUDA extension megaq._C: {_state['reason']}")
    if a_packed.dim() != 2 or b_packed.dim() != 2:
        raise ValueError(f"int4_gemm: operands must be 2-D; got {tuple(a_packed.shape)} and "
                         f"{tuple(b_packed.shape)}")
    if a_packed.shape[1] != b_packed.shape[1]:
        raise ValueError(f"int4_gemm: a and b must have the same packed K; got "
                         f"{tuple(a_packed.shape)} and {tuple(b_packed.shape)}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.int32):
        raise ValueError(f"int4_gemm: out_dtype must be float32, bfloat16 or int32; got {out_dtype}")
    if out_dtype == torch.int32 and (scale_a is not None or scale_b is not None):
        raise ValueError("int4_gemm: int32 output is the raw accumulator; pass no scales")
    m, n = a_packed.shape[0], b_packed.shape[0]
    k_bytes = -(-a_packed.shape[1] // 16) * 16
    a = _prepare_packed(a_packed, k_bytes, "a_packed")
    b = _prepare_packed(b_packed, k_bytes, "b_packed")
    sa = _prepare_scale(scale_a, m, "scale_a", a.device)
    sb = _prepare_scale(scale_b, n, "scale_b", a.device)
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    elif out.dtype != out_dtype or tuple(out.shape) != (m, n):
        raise ValueError(f"int4_gemm: out must be [{m}, {n}] {out_dtype}; got "
                         f"{tuple(out.shape)} {out.dtype}")
    return ext.int4_gemm(a, b, out, sa, sb)


_INT8_MODES = ("rowcol", "block128")
_int8_ready: dict[int, bool] = {}


def int8_gemm_available(device: torch.device | int | str | None = None) -> bool:
    """True when int8_gemm runs on `device`: an sm_90 GPU (H100 / H200) and an extension built with
    sm_90a code. The first call per device asks the extension (a synchronous read); inside a CUDA graph
    capture that cannot happen, so an unanswered device reads False there."""
    if not torch.cuda.is_available():
        return False
    if isinstance(device, int):
        index = device
    else:
        device = torch.device("cuda") if device is None else torch.device(device)
        if device.type != "cuda":
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _int8_ready:
        return _int8_ready[index]
    if torch.cuda.get_device_capability(index) != (9, 0):
        _int8_ready[index] = False
        return False
    if torch.cuda.is_current_stream_capturing():
        return False
    ext = load_extension()
    if ext is None:
        _int8_ready[index] = False
        return False
    with torch.cuda.device(index):
        _int8_ready[index] = bool(ext.int8_gemm_supported())
    return _int8_ready[index]


def _int8_scale(s: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"int8_gemm: {name} must be a tensor of FP32 scales; got {type(s).__name__}")
    return s if s.dtype == torch.float32 else s.float()


def int8_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, *,
              mode: str = "rowcol", scale_b_rows: int = 1, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
              tile: int = 0, group_m: int = 0,
              gelu_input: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`scaled_mm` of two INT8 operands on Hopper tensor cores (csrc/int8_gemm, sm_90 only).

    a: int8 [M, K], b: int8 [N, K], rows K-contiguous, K a multiple of 16, on one CUDA device.
    mode "rowcol":   out[m, n] = float(Σ_k a[m, k] b[n, k]) · scale_a[m] · scale_b[n] (+ bias[n]);
                     scale_a [M] or [M, 1], scale_b [N] or [N, 1]; the INT32 sum is exact (K ≤ 133143).
    mode "block128": out[m, n] = Σ_kb scale_a[m, kb] · scale_b[n // scale_b_rows, kb] · P_kb[m, n]
                     (+ bias[n]), P_kb the exact INT32 product over K-block kb of 128, promoted to FP32;
                     scale_a [M, ceil(K/128)], scale_b [ceil(N/scale_b_rows), ceil(K/128)] (any strides;
                     [rows, 1] = one scale per row), scale_b_rows 1 (per row of B) or a multiple of 128.
    Scales are used as FP32; bias (any float dtype, [N]) is added in FP32. out_dtype: torch.bfloat16
    or torch.float32; `out` (optional) a preallocated [M, N] tensor of that dtype with contiguous rows.
    out_dtype torch.int8 (the INT8 data flow's epilogue) returns `(q, scales)`: the FP32 result
    requantized per (1, 128) block of each row, nearest — the scales of
    `megaq.quant.quantize_blockwise(fp32_out, (1, 128))` bit for bit, the values times the reciprocal
    scale (one step apart from the reference's division within 1.5 ulp of a tie), and a NaN scale for
    a block holding a NaN (the reference's would be 1) — as int8 [M, N] and float32 scales
    [M, ceil(N/128)].
    gelu_input `(q, scales)` (bfloat16 out, mode rowcol, no bias, default tile): the GELU's backward in
    the epilogue — out[m, n] = product · GELU'(q[m, n] · scales[m, n // 128]), q int8 [M, N] and
    scales float32 [M, ceil(N/128)] (the GELU's INT8 input in (1, 128) blocks), the product rounded
    to BF16, then multiplied in FP32 and rounded again (the INT8 data flow's fc2 dgrad writing the
    GELU input's gradient). Needs N % 8 == 0 (TMA-stored rows).
    tile / group_m: the kernel's tile configuration and raster group (0 = default; for benchmarks).
    FP32 output of rowcol rounds float(acc) (exact below 2^24) and the product with sa·sb: relative
    error ≤ ~2^-22; block128 adds one FP32 rounding per K-block; bf16 rounds once more."""
    if mode not in _INT8_MODES:
        raise ValueError(f"int8_gemm: mode must be one of {list(_INT8_MODES)}; got {mode!r}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.int8):
        raise ValueError(f"int8_gemm: out_dtype must be torch.float32, torch.bfloat16 or torch.int8; got "
                         f"{out_dtype}")
    if gelu_input is not None and out_dtype != torch.bfloat16:
        raise ValueError(f"int8_gemm: the GELU-backward epilogue (gelu_input) writes bfloat16; got out_dtype "
                         f"{out_dtype}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"int8_gemm: operands must be 2-D; got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (a.is_cuda and b.is_cuda):
        raise ValueError(f"int8_gemm: operands must be CUDA tensors; got {a.device} and {b.device}")
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"int8_gemm needs the CUDA extension megaq._C: {_state['reason']}")
    if not int8_gemm_available(a.device):
        raise RuntimeError(f"int8_gemm runs on sm_90 GPUs only (with an sm_90a build of megaq._C); "
                           f"{a.device} is {torch.cuda.get_device_name(a.device)}, capability "
                           f"{torch.cuda.get_device_capability(a.device)}")
    m, n = a.shape[0], b.shape[0]
    sa, sb = _int8_scale(scale_a, "scale_a"), _int8_scale(scale_b, "scale_b")
    if bias is not None:
        bias = bias.to(device=a.device, dtype=torch.float32).contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    elif out.dtype != out_dtype or tuple(out.shape) != (m, n):
        raise ValueError(f"int8_gemm: out must be [{m}, {n}] {out_dtype}; got {tuple(out.shape)} {out.dtype}")
    if out_dtype == torch.int8:
        out_scale = torch.empty((m, -(-n // 128)), dtype=torch.float32, device=a.device)
        ext.int8_gemm(a, b, out, sa, sb, bias, mode, scale_b_rows, tile, group_m, out_scale)
        return out, out_scale
    if gelu_input is not None:
        q, qs = gelu_input
        return ext.int8_gemm(a, b, out, sa, sb, bias, mode, scale_b_rows, tile, group_m, None,
                             q.contiguous(), _int8_scale(qs, "gelu scales").contiguous())
    return ext.int8_gemm(a, b, out, sa, sb, bias, mode, scale_b_rows, tile, group_m)
