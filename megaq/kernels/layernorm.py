"""Residual add + LayerNorm in the activations' dtype (`megaq.ops.add_layernorm`, the BF16 data flow's
LayerNorms): Triton kernels (`megaq.kernels.triton_layernorm`) on the path `megaq.kernels.dispatch`
picks (CUDA sm_80+, or `MEGAQ_KERNELS=triton` under the interpreter). Elsewhere the caller keeps its
torch path (`F.layer_norm`).

    s, y, mean, rstd = add_layernorm_forward(x, r, w, b, eps)       s = x + r (r None: s is x), y = LN(s)
    ds, dw, db = add_layernorm_backward(dy, s, w, mean, rstd, ds_in, has_bias)

x, r, s, y, dy, ds_in, ds: contiguous ``[rows, N]`` in one float dtype; w, b: ``[N]``; mean, rstd: FP32
``[rows]``. What they reproduce (tests/test_layernorm_kernels.py): s bit for bit the eager add; y, ∇s,
∇w, ∇b those of `x + r` then `F.layer_norm` within FP32 summation order (relative 1e-5 in FP32 tensors,
one unit in the last place of BF16 outputs). Why: PyTorch runs the add, the normalization, its input
gradient and its weight gradient (GammaBetaBackward) as four kernels in the eager BF16 block, plus the
add of the residual stream's two gradients; measured in a 1.3B step on an H100 those took ~150 ms of
2.2 s (docs/PERFORMANCE.md). No host synchronization: the launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch

from . import dispatch
from .dispatch import _cdiv, _cfg, _next_pow2

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
MAX_WIDTH = 16384
# programs of the backward per SM: each sums its rows' ∇w and ∇b into one FP32 row of the partials
_BWD_PROGRAMS_PER_SM = 4


def _kernel(name: str):
    return dispatch._kernel("triton_layernorm", name)


def kernels_supported(x: torch.Tensor) -> bool:
    """Whether the kernels run for activations like x: a float dtype, a width up to MAX_WIDTH, and the
    Triton path by dispatch's rule."""
    return x.dtype in _FLOATS and 0 < x.shape[-1] <= MAX_WIDTH and dispatch._use_triton(x)


def _warps(block: int) -> int:
    return _cfg("LN_WARPS", 4 if block <= 1024 else 8 if block <= 4096 else 16)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2          # the interpreter: a few programs, so that tests walk several rows per program
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> None:
    if tuple(t.shape) != shape or not t.is_contiguous() or (dtype is not None and t.dtype != dtype):
        raise ValueError(f"add_layernorm: {name} must be a contiguous {tuple(shape)} tensor"
                         + (f" of {dtype}" if dtype is not None else "")
                         + f"; got {t.dtype} {tuple(t.shape)} (contiguous: {t.is_contiguous()})")


def add_layernorm_forward(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                          bias: torch.Tensor | None, eps: float):
    if x.dim() != 2 or x.dtype not in _FLOATS or not 0 < x.shape[1] <= MAX_WIDTH:
        raise ValueError(f"add_layernorm: x must be a 2-D float tensor [rows, N] with 0 < N <= {MAX_WIDTH}; "
                         f"got {x.dtype} {tuple(x.shape)}")
    rows, n = x.shape
    _check("x", x, (rows, n))
    if residual is not None:
        _check("residual", residual, (rows, n), x.dtype)
    _check("weight", weight, (n,))
    if bias is not None:
        _check("bias", bias, (n,))
    s = torch.empty_like(x) if residual is not None else x
    y = torch.empty_like(x)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block = _next_pow2(n)
    if rows:
        _kernel("_add_layernorm_fwd_kernel")[(rows,)](
            x, residual if residual is not None else x, s, y, weight, bias if bias is not None else weight,
            mean, rstd, n, float(eps), HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=_warps(block))
    return s, y, mean, rstd


def add_layernorm_backward(dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                           rstd: torch.Tensor, ds_in: torch.Tensor | None, has_bias: bool):
    """∇s (plus ds_in, the gradient s gets from elsewhere), ∇w and ∇b (None without bias) in weight's dtype."""
    rows, n = s.shape
    _check("dy", dy, (rows, n), s.dtype)
    if ds_in is not None:
        _check("ds_in", ds_in, (rows, n), s.dtype)
    for name, t in (("mean", mean), ("rstd", rstd)):
        _check(name, t, (rows,), torch.float32)
    ds = torch.empty_like(s)
    programs = max(1, min(rows, _sm_count(s.device) * _cfg("LN_BWD_PER_SM", _BWD_PROGRAMS_PER_SM)))
    per_program = _cdiv(rows, programs) if rows else 1
    programs = _cdiv(rows, per_program) if rows else 1
    # every program writes its row of the partials (no rows: none runs, and the sums are zeros)
    alloc = torch.empty if rows else torch.zeros
    dw_part = alloc((programs, n), dtype=torch.float32, device=s.device)
    db_part = alloc((programs, n), dtype=torch.float32, device=s.device) if has_bias else dw_part
    block = _next_pow2(n)
    if rows:
        _kernel("_add_layernorm_bwd_kernel")[(programs,)](
            dy, s, weight, mean, rstd, ds_in if ds_in is not None else dy, ds, dw_part, db_part, rows, n,
            per_program, HAS_DS_IN=ds_in is not None, HAS_BIAS=has_bias, BLOCK=block,
            num_warps=_warps(block))
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else None
    return ds, dw, db
