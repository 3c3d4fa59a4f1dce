"""The fused cross entropy's per-chunk softmax passes (`megaq.nn.fused_cross_entropy`): Triton kernels
(`megaq.kernels.triton_ce`) on the path `megaq.kernels.dispatch` picks (CUDA sm_80+, or
`MEGAQ_KERNELS=triton` under the interpreter). Elsewhere the caller keeps its torch path.

For a logits chunk L ``[rows, cols]`` (this rank's vocabulary, columns >= ``real_cols`` padding) in
BF16/FP16/FP32 and local targets (column index, or -1: ignored or on another rank):

    m, s, t = row_stats(L, target, real_cols)       one read of L, FP32 [3, rows]
    (TP: M = all-reduce max of m; S = all-reduce sum of s * exp(m - M); T = all-reduce sum of t)
    softmax_grad_(L, target, real_cols, M, S, g)    one read + one write of L, in place

    loss[row] = log(S) + M - T
    G = (exp(L - M) / S - onehot(target)) * g[row]       in L's dtype, over L

What they reproduce (tests/test_kernels_ce.py): the torch path of `_Head.chunk` — the max exactly, the
target logit exactly, the sum of exponentials within FP32 summation-order and `exp` rounding
(relative 1e-5), G within one unit in the last place of L's dtype (plus FP32 rounding). NaN/Inf in a
row make its S NaN (so its loss is NaN), never silently dropped. No host synchronization: the
launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from . import dispatch
from .dispatch import _cdiv, _cfg, _next_pow2

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# columns per tile, elements per program tile (rows = tile // columns), warps; config_override keys
# CE_BLOCK, CE_TILE, CE_WARPS. H100, BF16 chunk [2560, 50304] (tools/bench_fused_ce.py --sweep,
# 2026-11-22): 4096 x 4 warps 0.310 ms for both passes (row_stats 2.26 TB/s, softmax_grad_ 2.63 TB/s);
# 2048..8192 columns, 4..16 warps all within 0.31..0.35 ms, 1024 x 4 0.385 ms.
_BLOCK = 4096
_TILE = 4096
_WARPS = 4



def _kernel(name: str):
    return dispatch._kernel("triton_ce", name)


def kernels_supported(logits: torch.Tensor) -> bool:
    """Whether the kernels run for logits of this device and dtype: the Triton path by dispatch's rule
    and a float dtype (the shape is checked at launch)."""
    return logits.dtype in _FLOATS and dispatch._use_triton(logits)


def _plan(cols: int) -> tuple[int, int, int]:
    """(rows per program, columns per tile, warps): tiles of CE_TILE elements, at most CE_BLOCK columns
    wide, narrower (and more rows per program) for a small vocabulary."""
    BC = min(_cfg("CE_BLOCK", _BLOCK), _next_pow2(max(cols, 1)))
    BR = max(1, _cfg("CE_TILE", _TILE) // BC)
    return BR, BC, _cfg("CE_WARPS", _WARPS)


def _check(logits: torch.Tensor, target: torch.Tensor, real_cols: int, rows_vectors: dict) -> int:
    """Validate the arguments; the real (non-padding) column count clipped to [0, cols]."""
    if logits.dim() != 2 or not logits.is_contiguous() or logits.dtype not in _FLOATS:
        raise ValueError(f"logits must be a contiguous 2-D float tensor [rows, vocab/tp] (fp32/bf16/fp16); "
                         f"got {logits.dtype} {tuple(logits.shape)} (contiguous: {logits.is_contiguous()})")
    rows = logits.size(0)
    vectors = {"target": target, **rows_vectors}
    for name, v in vectors.items():
        if v.dim() != 1 or v.numel() != rows or not v.is_contiguous() or v.device != logits.device:
            raise ValueError(f"{name} must be a contiguous 1-D tensor of {rows} entries (one per logits "
                             f"row) on {logits.device}; got {tuple(v.shape)} on {v.device}")
    if target.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"target must hold int32/int64 local column indices (-1: not here); got {target.dtype}")
    for name, v in rows_vectors.items():
        if v.dtype != torch.float32:
            raise ValueError(f"{name} must be FP32; got {v.dtype}")
    if isinstance(real_cols, bool) or not isinstance(real_cols, int):
        raise ValueError(f"real_cols must be an int (columns >= it are padding); got {real_cols!r}")
    return min(max(real_cols, 0), logits.size(1))


def row_stats(logits: torch.Tensor, target: torch.Tensor, real_cols: int) -> torch.Tensor:
    """Per row of logits ``[rows, cols]``, over its columns < real_cols: FP32 ``[3, rows]`` = (max,
    sum of exp(logit - max), logit at the local target (-inf at a padding column, 0 where target is
    -1)). One buffer, so that the TP merge sums rows 1 and 2 in one all-reduce."""
    real = _check(logits, target, real_cols, {})
    rows, cols = logits.shape
    stats = torch.empty((3, rows), dtype=torch.float32, device=logits.device)
    row_max, sum_exp, target_logit = stats
    BR, BC, nw = _plan(cols)
    if rows:
        _kernel("_row_stats_kernel")[(_cdiv(rows, BR),)](
            logits, rows, cols, real, target, row_max, sum_exp, target_logit, BR=BR, BC=BC, num_warps=nw)
    return stats


def softmax_grad_(logits: torch.Tensor, target: torch.Tensor, real_cols: int, row_max: torch.Tensor,
                  sum_exp: torch.Tensor, grad_scale: torch.Tensor) -> torch.Tensor:
    """logits <- (exp(logits - row_max) / sum_exp - onehot(target)) * grad_scale, per row, in place and
    in logits' dtype (padding columns >= real_cols get 0); returns logits. row_max and sum_exp are the
    merged (over the TP group) statistics, grad_scale the per-row factor (1/n_valid, 0 if ignored)."""
    real = _check(logits, target, real_cols, {"row_max": row_max, "sum_exp": sum_exp,
                                              "grad_scale": grad_scale})
    rows, cols = logits.shape
    BR, BC, nw = _plan(cols)
    if rows:
        _kernel("_softmax_grad_kernel")[(_cdiv(rows, BR),)](
            logits, rows, cols, real, target, row_max, sum_exp, grad_scale,
            BR=BR, BC=BC, num_warps=nw)
    return logits
