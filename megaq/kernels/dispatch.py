"""The one place that decides which implementation runs: Triton kernels on CUDA, the `megaq.quant`
reference elsewhere (CPU tensors, no Triton, unsupported shapes/blocks).

`MEGAQ_KERNELS=reference|triton|auto` (default auto) forces a path. `triton` on CPU tensors needs
`TRITON_INTERPRET=1` (set before triton is imported): that is how CI runs these kernels.

Layering of megaq.kernels:
    dispatch      this module: the path choice (`kernel_mode`, `_use_triton`, `_has_tma`), the launch
                  settings (`config_override` / `_cfg`, one state: `_CONFIG_OVERRIDE`), the lazy
                  import of a triton_* module's kernel (`_kernel`) and the helpers the launchers share
                  (Philox seeds, placeholder tensors, the NaN flag, the ±1 Hadamard matrix, `_cdiv` ...).
                  It imports no other megaq.kernels module when it is imported.
    quantizers    quantize, quantize_dual, hadamard_quantize, hadamard_quantize_dual,
                  hadamard_quantize_delayed, requantize_transposed, dequantize and their launchers
                  (the kernels of triton_quant).
    gemm          scaled_mm: the Triton kernel (triton_gemm) and its tile configurations
                  (GEMM_CONFIGS), csrc/int8_gemm on sm_90 (`MEGAQ_INT8_GEMM`, `_cuda_int8_mode`),
                  csrc/int4_gemm (`MEGAQ_INT4_GEMM`, `_native_int4_eligible`).
    int4, dataflow, cross_entropy, grad_comm: further kernel families on the same rule.
quantizers and gemm import their helpers from here and read the settings and the path choice through
this module (`dispatch._CONFIG_OVERRIDE`, `dispatch._use_triton`, `dispatch._has_tma`), so patching one
of those here reaches their launchers too. A launcher or constant of quantizers or gemm is read in its
own module: patch it there (`quantizers._launch_twopass`, `gemm.GEMM_CONFIGS`), not here.

Public functions (re-exported by `megaq.kernels`; this module hands them out too, on first access, so
`from megaq.kernels.dispatch import scaled_mm` keeps working):
    kernel_mode(), triton_available(), config_override(**cfg)                      (this module)
    quantize, quantize_dual, hadamard_quantize, hadamard_quantize_dual, dequantize  (quantizers)
    scaled_mm                                                                       (gemm)
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

_MODES = ("reference", "triton", "auto")
_CONFIG_OVERRIDE: dict | None = None


# --------------------------------------------------------------------------------------------------
# choosing the path
def kernel_mode() -> str:
    mode = os.environ.get("MEGAQ_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"MEGAQ_KERNELS must be one of {list(_MODES)}; got {mode!r}")
    return mode


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _use_triton(*tensors: torch.Tensor) -> bool:
    mode = kernel_mode()
    if mode == "reference":
        return False
    devices = {t.device.type for t in tensors}
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("MEGAQ_KERNELS=triton but triton cannot be imported")
        if devices != {"cuda"} and not _interpreting():
            raise RuntimeError("MEGAQ_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 "
                               "(set before triton is imported)")
        return True
    # auto: Triton on CUDA GPUs with INT8 tensor cores (sm_80+), the reference otherwise
    if devices != {"cuda"} or not triton_available() or _interpreting():
        return False
    return _capability(tensors[0].device.index or 0) >= (8, 0)


def _has_tma(device: torch.device) -> bool:
    if device.type != "cuda":
        return _interpreting()
    return _capability(device.index or 0) >= (9, 0)


@contextlib.contextmanager
def config_override(**cfg):
    """Force kernel tile configurations (tests use tiny tiles under the interpreter; the benchmark
    sweeps). GEMM keys: BM, BN, BK, J, CVT, GROUP_M, num_warps, num_stages, USE_TMA, WS. Quantizer
    keys: QUANT_ROWS, QUANT_COLS, QUANT_WARPS, QUANT_STAGES, QUANT_PER_SM, QUANT_PER_STRIP (the two-pass
    kernels' programs per strip), DUAL_FUSED, ROW_KERNEL, RESIDENT_TILE."""
    global _CONFIG_OVERRIDE
    old = _CONFIG_OVERRIDE
    _CONFIG_OVERRIDE = dict(cfg)
    try:
        yield
    finally:
        _CONFIG_OVERRIDE = old


def _cfg(key: str, default=None):
    """A launch setting: `config_override`'s value for `key` when one is active and sets it, else `default`."""
    return (_CONFIG_OVERRIDE or {}).get(key, default)


# --------------------------------------------------------------------------------------------------
# what the launchers share (megaq.kernels' quantizers, gemm, int4, dataflow, cross_entropy, grad_comm)
def _ref():
    from . import reference
    return reference


def _quant():
    import megaq.quant as q
    return q


def _rint_libdevice() -> bool:
    return not _interpreting()


@functools.lru_cache(maxsize=None)
def _kernel(module: str, name: str):
    """The `@triton.jit` function `name` of `megaq.kernels.<module>` (imported on first use: Triton is
    an optional dependency)."""
    import importlib
    return getattr(importlib.import_module(f"megaq.kernels.{module}"), name)


@functools.lru_cache(maxsize=None)
def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for pointer arguments a kernel variant never touches (allocated once per
    device: an allocation per launch is measurable host time)."""
    return torch.empty(1, dtype=dtype, device=device)


def _seed_tensor(device: torch.device, generator: torch.Generator | None, n: int = 2) -> torch.Tensor:
    """Seeds for Philox drawn from torch's generator (the device's default one unless given), so
    stochastic rounding follows torch's RNG state (checkpointed runs reproduce). Stays on device."""
    gdev = generator.device if generator is not None else device
    seeds = torch.randint(0, 2 ** 62, (n,), dtype=torch.int64, device=gdev, generator=generator)
    return seeds.to(device, non_blocking=True)


def _check_flag(flag: torch.Tensor | None, x: torch.Tensor, name: str) -> None:
    if flag is not None and int(flag.item()):
        # the device flag says NaN/Inf is somewhere: let the reference check count and name it
        _quant().check_finite(x, name)
        raise _quant().NonFiniteError(f"{name} of shape {tuple(x.shape)} holds NaN or Inf values")


def _qmax(bits: int) -> int:
    return _quant().qmax_for_bits(bits)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _rotation_matrix(hadamard: int, x_dtype: torch.dtype, device) -> torch.Tensor:
    """The ±1 Hadamard matrix in the dtype the rotation kernels multiply an `x_dtype` input with:
    FP32 under the interpreter (its 16-bit dots are wrong), the input's own dtype for BF16/FP16, BF16
    for FP32 inputs (rotated as three BF16 slices against the exact ±1 matrix)."""
    if _interpreting():
        dtype = torch.float32
    else:
        dtype = x_dtype if x_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    return _hadamard_pm1(hadamard, dtype, str(device))


@functools.lru_cache(maxsize=32)
def _hadamard_pm1(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h.to(dtype=dtype, device=device).contiguous()


# --------------------------------------------------------------------------------------------------
# the public functions of quantizers and gemm, handed out here on first access (those modules import
# this one, so it cannot import them while it loads)
_REEXPORTS = {"quantize": "quantizers", "quantize_dual": "quantizers", "hadamard_quantize": "quantizers",
              "hadamard_quantize_dual": "quantizers", "dequantize": "quantizers", "scaled_mm": "gemm"}


def __getattr__(name: str):
    module = _REEXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"megaq.kernels.{module}"), name)
    globals()[name] = value     # later look-ups find it without this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_REEXPORTS))
