"""Cross-entropy on vocab-parallel logits, without gathering the full ``[tokens, vocab]`` matrix.

For a token with logits z split over the ranks and target t:
    loss = log(sum_j exp(z_j - m)) - (z_t - m),   m = max_j z_j
needs three small all-reduces over the TP group: the max (for stability), the target logit (held
by one rank, zero elsewhere), and the sum of exponentials. The gradient is softmax(z) - onehot(t),
which each rank computes for its own vocabulary range.

Logits of padded vocabulary entries may be -inf: they contribute exp(-inf) = 0 and get zero
gradient. The arithmetic is FP32 whatever the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaq.parallel import (get_tensor_parallel_group, get_tensor_parallel_rank,
                            get_tensor_parallel_world_size)


def _all_reduce_tp(x: torch.Tensor, op: dist.ReduceOp) -> None:
    """In-place all-reduce over the TP group. NCCL needs contiguous tensors, and these may not
    be (their layout follows the target's, e.g. a transposed label matrix)."""
    if get_tensor_parallel_world_size() == 1:
        return
    if x.is_contiguous():
        dist.all_reduce(x, op=op, group=get_tensor_parallel_group())
    else:
        buffer = x.contiguous()
        dist.all_reduce(buffer, op=op, group=get_tensor_parallel_group())
        x.copy_(buffer)


def shifted_exp_over_tp(logits32: torch.Tensor, target: torch.Tensor, vocab_start: int, ignore_index: int):
    """The softmax statistics of vocab-parallel FP32 logits ``[..., vocab/tp]``, computed IN PLACE:
    ``logits32`` becomes exp(z - m), m the max over the whole (TP-split) vocabulary. Returns
    (exp, sum_exp, target_logit, valid, local_target, on_this_rank): the sum of exponentials and the
    shifted target logit over every rank's range, which targets count, the target's index in this
    rank's range (0 where it is not here) and where it is here. Three small TP all-reduces."""
    global_max = logits32.amax(dim=-1)
    _all_reduce_tp(global_max, dist.ReduceOp.MAX)
    shifted = logits32.sub_(global_max.unsqueeze(-1))

    valid = target != ignore_index
    local_target = target - vocab_start
    on_this_rank = valid & (local_target >= 0) & (local_target < logits32.size(-1))
    local_target = torch.where(on_this_rank, local_target, 0)
    target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    # torch.where, not a product: target_logit may be -inf where it is not ours.
    target_logit = torch.where(on_this_rank, target_logit, 0.0)
    _all_reduce_tp(target_logit, dist.ReduceOp.SUM)

    exp = shifted.exp_()
    sum_exp = exp.sum(dim=-1)
    _all_reduce_tp(sum_exp, dist.ReduceOp.SUM)
    return exp, sum_exp, target_logit, valid, local_target, on_this_rank


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
        vocab_start = get_tensor_parallel_rank() * logits.size(-1)
        # a fresh FP32 tensor (float() of BF16 logits) or a copy of FP32 ones: the logits stay intact
        logits32 = logits.float() if logits.dtype != torch.float32 else logits.clone()
        exp, sum_exp, target_logit, valid, local_target, on_this_rank = shifted_exp_over_tp(
            logits32, target, vocab_start, ignore_index)

        loss = torch.where(valid, sum_exp.log() - target_logit, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, on_this_rank, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, on_this_rank, valid = ctx.saved_tensors
        # d loss / d z = softmax - onehot(target); the one-hot only on the rank that owns it.
        grad = softmax.scatter_add(-1, local_target.unsqueeze(-1),
                                   -on_this_rank.to(softmax.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` ``[..., vocab/tp]`` (this rank's vocabulary range) against
    ``target`` ``[...]`` (global token ids), like ``F.cross_entropy`` on the gathered logits.

    ``reduction``: "mean" over the targets that are not ``ignore_index`` (NaN if there are none,
    as in PyTorch), "sum", or "none" (per-token losses, 0 where ignored).
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: "
                         f"expected logits of shape target.shape + (vocab/tp,)")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    losses = _VocabParallelCrossEntropy.apply(logits, target, ignore_index)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (target != ignore_index).sum()
