"""Triton kernels of the fused LM head + cross entropy's per-chunk softmax gradient
(`megaq.nn.fused_cross_entropy`): two reads of a logits chunk instead of ~10 FP32 elementwise passes.
The launchers and what each kernel must reproduce are in `megaq.kernels.cross_entropy`.

A chunk is L ``[rows, cols]`` (cols = this rank's vocabulary, contiguous rows) in BF16/FP16/FP32;
columns >= ``real_cols`` are padding (logit -inf). One program takes BR rows and walks their columns
in tiles of BC, all math in FP32:
- `_row_stats_kernel`: per row the max m, the sum of exp(L - m) (online softmax: each tile's sum is
  rescaled by exp(m_old - m_new) as the max grows), and the logit at the row's local target (0 where
  the target is not on this rank, -1 in the target vector).
- `_softmax_grad_kernel`: G = (exp(L - M) / S - onehot(target)) * grad_scale[row], written in L's dtype
  over L (in place: each tile is read before the same program writes it), from the merged (global)
  max M and sum S.

Non-finite values: NaN in a row makes its sum NaN (exp(NaN - m) is NaN, whatever the max does with
it), +Inf makes exp(Inf - Inf) = NaN: either way the loss log(S) + M - target is NaN, as the torch path
gives. A max of -inf (a row that is all padding so far) shifts by 0 instead, so that masked tiles add
exp(-inf) = 0 rather than exp(-inf - -inf) = NaN.
"""

import triton
import triton.language as tl


@triton.jit
def _row_stats_kernel(logits_ptr, rows, cols, real_cols, target_ptr, max_ptr, sum_ptr, target_logit_ptr,
                      BR: tl.constexpr, BC: tl.constexpr):
    """Rows [pid*BR, pid*BR + BR): max_ptr[r] = max_c L[r, c], sum_ptr[r] = sum_c exp(L[r, c] - max)
    over the real columns c < real_cols, target_logit_ptr[r] = L[r, target[r]] (-inf for a padding
    target, 0 for target -1)."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    live = r < rows
    row_ptr = logits_ptr + r.to(tl.int64) * cols
    m = tl.full([BR], float("-inf"), tl.float32)
    s = tl.zeros([BR], tl.float32)
    for start in range(0, real_cols, BC):
        c = start + tl.arange(0, BC)
        x = tl.load(row_ptr[:, None] + c[None, :], mask=live[:, None] & (c < real_cols)[None, :],
                    other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        m = m_new
    t = tl.load(target_ptr + r, mask=live, other=-1)
    ours = live & (t >= 0)
    x_t = tl.load(row_ptr + t, mask=ours & (t < real_cols), other=float("-inf")).to(tl.float32)
    tl.store(max_ptr + r, m, mask=live)
    tl.store(sum_ptr + r, s, mask=live)
    tl.store(target_logit_ptr + r, tl.where(ours, x_t, 0.0), mask=live)


@triton.jit
def _softmax_grad_kernel(logits_ptr, rows, cols, real_cols, target_ptr, max_ptr, sum_ptr, scale_ptr,
                         BR: tl.constexpr, BC: tl.constexpr):
    """Rows [pid*BR, pid*BR + BR): L[r, c] <- (exp(L[r, c] - M[r]) / S[r] - [c == target[r]]) * g[r]
    for every column c < cols (padding columns c >= real_cols count as -inf logits)."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    live = r < rows
    row_ptr = logits_ptr + r.to(tl.int64) * cols
    m = tl.load(max_ptr + r, mask=live, other=0.0)
    g = tl.load(scale_ptr + r, mask=live, other=0.0)
    coef = g / tl.load(sum_ptr + r, mask=live, other=1.0)
    t = tl.load(target_ptr + r, mask=live, other=-1)
    for start in range(0, cols, BC):
        c = start + tl.arange(0, BC)
        ptrs = row_ptr[:, None] + c[None, :]
        in_rows = live[:, None] & (c < cols)[None, :]
        x = tl.load(ptrs, mask=in_rows, other=0.0).to(tl.float32)
        x = tl.where((c < real_cols)[None, :], x, float("-inf"))
        p = tl.exp(x - m[:, None]) * coef[:, None]
        p = tl.where(c[None, :] == t[:, None], p - g[:, None], p)
        tl.store(ptrs, p.to(logits_ptr.dtype.element_ty), mask=in_rows)
