"""The LM head and the vocab-parallel cross entropy in one chunked pass: the ``[tokens, vocab]`` logits,
softmax and logit gradient exist one chunk of tokens at a time, never whole.

Why: at GPT-2 124M with 16 x 1024 tokens per micro batch, ``logits = H W^T`` followed by
``vocab_parallel_cross_entropy`` saves an FP32 softmax of 16384 x 50304 (3.09 GiB) for the backward,
and the backward then materializes the BF16 logit gradient (1.65 GiB) before its two GEMMs. Here
each chunk of tokens computes its logits, its loss and right away its share of both gradients

    G = (softmax - onehot(target)) / n_valid      FP32 math, then the weight's dtype
    dH[chunk] = G W                               (hidden's dtype)
    dW += G^T H[chunk]                            (accumulated in FP32)

so what autograd keeps is dH ``[tokens, C]`` and dW ``[vocab/tp, C]``; the backward only scales them
by the incoming (scalar) gradient. The same three GEMMs as the unfused head run, just in the forward
(Liger-Kernel's FusedLinearCrossEntropy, the "cut cross entropy" idea). Consequences:
- a forward that will not be differentiated must not pay for the gradients: with grad disabled, or
  when neither ``hidden`` nor ``weight`` requires grad, only the loss is computed (still chunked);
  only the gradients that are needed are computed;
- the backward runs once per forward, as with any autograd graph: a second backward raises unless
  the first passed ``retain_graph=True`` (then it returns the same gradients again);
- the loss and the gradients belong to the mean over the targets that are not ``ignore_index``:
  a loss multiplied by a constant (loss scaling, 1/gradient-accumulation) is fine, since the
  incoming gradient is a scalar.

Tensor parallelism: ``weight`` is this rank's vocabulary rows; per chunk the max, the target logit
and the sum of exponentials are all-reduced over the TP group (as in ``megaq.nn.cross_entropy``).
dH is this rank's partial gradient: the caller passes ``hidden`` through the same TP mapping as a
column-parallel linear's input (``megaq.nn.linear.column_parallel_input``), whose backward sums the
partial gradients (all-reduce, or reduce-scatter under sequence parallelism).

Padded vocabulary (rows of global id >= ``vocab_size``): their logits are -inf, as the unfused model
makes them, so they get zero probability and zero gradient.

The per-chunk softmax and its gradient: on CUDA two Triton passes over the chunk's logits, kept in the
weight's dtype (``megaq.kernels.cross_entropy``): ``row_stats`` (max, sum of exponentials, target
logit per row, FP32 math) and, after the TP all-reduces, ``softmax_grad_``, which writes G over the
logits in place. Elsewhere (CPU, or ``FUSED_KERNELS = False``) the torch path: FP32 logits and about
ten elementwise passes; it is the reference the kernels are tested against.

No host synchronization and shapes fixed per chunk (the last chunk may be shorter), so the op can be
captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from megaq.kernels import cross_entropy as ce_kernels
from megaq.nn.cross_entropy import _all_reduce_tp, shifted_exp_over_tp
from megaq.parallel import get_tensor_parallel_rank, get_tensor_parallel_world_size

CHUNK_LOGITS_BYTES = 256 * 2**20  # bound on one chunk's logits (as held) when the chunk size is automatic
# False: the torch path even where the Triton kernels run (tools/bench_fused_ce.py times both)
FUSED_KERNELS = True
# True: a BF16/FP16 chunk's weight gradient is accumulated into the FP32 buffer by the GEMM itself
# (addmm with out_dtype=float32, where this torch supports it on the device: torch 2.11 on CUDA does)
# instead of a BF16 GEMM output added afterwards (a [vocab/tp, C] temporary, one more rounding and two
# more passes over it). H100, 16384 tokens, chunk 2560: 8.88 vs 9.62 ms, peak 417 vs 491 MiB.
WGRAD_INTO_FP32 = True


def default_chunk_tokens(vocab_per_rank: int, logit_bytes: int = 4) -> int:
    """Tokens per chunk whose logits ``[tokens, vocab_per_rank]`` of ``logit_bytes`` each (4: the torch
    path's FP32 copy; the kernels keep the weight's dtype) fit in CHUNK_LOGITS_BYTES, rounded down to
    a multiple of 128 (GEMM-friendly) when that leaves at least 128."""
    tokens = max(1, CHUNK_LOGITS_BYTES // (logit_bytes * vocab_per_rank))
    return tokens // 128 * 128 if tokens >= 128 else tokens


def _uses_kernels(weight: torch.Tensor) -> bool:
    return FUSED_KERNELS and ce_kernels.kernels_supported(weight)


@functools.lru_cache(maxsize=None)
def _addmm_into_fp32_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc32, a, b, out_dtype=torch.float32, out=acc32)`` runs for a, b of
    ``dtype`` on ``device`` (CUDA only, and only in torch versions whose check lets ``self`` be FP32).
    Probed once on 2 x 2 tensors; no host synchronization."""
    if device.type != "cuda":
        return False
    a = torch.zeros(2, 2, dtype=dtype, device=device)
    acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _accumulate_weight_grad(acc32: torch.Tensor, grad: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc32 += grad^T hidden (the GEMM accumulates in FP32 inside)."""
    if grad.dtype == torch.float32:
        acc32.addmm_(grad.t(), hidden)
    elif WGRAD_INTO_FP32 and _addmm_into_fp32_supported(acc32.device, grad.dtype):
        torch.addmm(acc32, grad.t(), hidden, out_dtype=torch.float32, out=acc32)
    else:
        # the GEMM's output is rounded to grad's dtype once per chunk before the FP32 sum
        acc32.add_(grad.t().mm(hidden))


class _Head:
    """What every chunk shares: the weight shard, the targets and where this rank's vocabulary lies."""

    def __init__(self, weight: torch.Tensor, target: torch.Tensor, ignore_index: int,
                 vocab_size: int | None):
        self.weight = weight
        self.per_rank = weight.size(0)
        self.vocab_start = get_tensor_parallel_rank() * self.per_rank
        # rows of this shard that are real vocabulary entries (<= 0: all padding)
        self.real_rows = self.per_rank if vocab_size is None else vocab_size - self.vocab_start
        self.target = target
        self.ignore_index = ignore_index
        self.kernels = _uses_kernels(weight)

    def chunk(self, hidden: torch.Tensor, start: int, end: int, grad_scale: torch.Tensor | None):
        """The summed loss of tokens [start, end) and, when ``grad_scale`` (per-token 1/n_valid or
        0) is given, their logit gradient ``[end - start, vocab/tp]`` in the weight's dtype."""
        logits = hidden[start:end].mm(self.weight.t())
        if self.kernels:
            return self._chunk_kernels(logits, start, end, grad_scale)
        logits = logits.float()  # rebound: the GEMM's output is not kept beside its FP32 copy
        return self._chunk_torch(logits, start, end, grad_scale)

    def _chunk_kernels(self, logits: torch.Tensor, start: int, end: int, grad_scale: torch.Tensor | None):
        """``chunk`` with the Triton passes: the logits stay in the weight's dtype and become the
        gradient in place."""
        target = self.target[start:end]
        valid = target != self.ignore_index
        local_target = target - self.vocab_start
        local_target = torch.where(valid & (local_target >= 0) & (local_target < self.per_rank),
                                   local_target, -1)
        stats = ce_kernels.row_stats(logits, local_target, self.real_rows)
        row_max, sum_exp, target_logit = stats
        if get_tensor_parallel_world_size() > 1:
            global_max = row_max.clone()
            _all_reduce_tp(global_max, dist.ReduceOp.MAX)
            # this rank's sum of exponentials relative to the global max (0 for a rank of padding only)
            sum_exp.mul_(torch.exp(row_max - global_max))
            _all_reduce_tp(stats[1:], dist.ReduceOp.SUM)  # the sums and the target logit (0 elsewhere)
            row_max = global_max
        loss_sum = torch.where(valid, sum_exp.log() + row_max - target_logit, 0.0).sum()
        if grad_scale is None:
            return loss_sum, None
        grad = ce_kernels.softmax_grad_(logits, local_target, self.real_rows, row_max, sum_exp,
                                        grad_scale[start:end])
        return loss_sum, grad

    def _chunk_torch(self, logits: torch.Tensor, start: int, end: int, grad_scale: torch.Tensor | None):
        """``chunk`` in FP32 torch operations on the FP32 logits (the reference)."""
        if self.real_rows < self.per_rank:
            logits[:, max(self.real_rows, 0):] = float("-inf")
        exp, sum_exp, target_logit, valid, local_target, on_this_rank = shifted_exp_over_tp(
            logits, self.target[start:end], self.vocab_start, self.ignore_index)
        local_target = local_target.unsqueeze(-1)
        loss_sum = torch.where(valid, sum_exp.log() - target_logit, 0.0).sum()
        if grad_scale is None:
            return loss_sum, None

        grad = exp.div_(sum_exp.unsqueeze(-1))  # softmax
        grad.scatter_add_(-1, local_target, -on_this_rank.to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_scale[start:end].unsqueeze(-1))
        return loss_sum, grad.to(self.weight.dtype)


def _chunks(n_tokens: int, chunk_tokens: int):
    return ((start, min(start + chunk_tokens, n_tokens)) for start in range(0, n_tokens, chunk_tokens))


def _loss_only(hidden: torch.Tensor, head: _Head, chunk_tokens: int) -> torch.Tensor:
    total = hidden.new_zeros((), dtype=torch.float32)
    for start, end in _chunks(hidden.size(0), chunk_tokens):
        total += head.chunk(hidden, start, end, None)[0]
    return total / (head.target != head.ignore_index).sum()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int,
                chunk_tokens: int, vocab_size: int | None):
        head = _Head(weight, target, ignore_index, vocab_size)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = target != ignore_index
        n_valid = valid.sum()
        # 1/n_valid for the counted tokens, 0 for the ignored ones (and no NaN when all are
        # ignored: zero gradients, as F.cross_entropy gives).
        grad_scale = torch.where(valid, 1.0 / n_valid, 0.0)
        grad_hidden = torch.empty_like(hidden) if need_dh else None
        grad_weight32 = torch.zeros_like(weight, dtype=torch.float32) if need_dw else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start, end in _chunks(hidden.size(0), chunk_tokens):
            loss_sum, grad = head.chunk(hidden, start, end, grad_scale)
            total += loss_sum
            if need_dh:
                torch.mm(grad, weight, out=grad_hidden[start:end])
            if need_dw:
                _accumulate_weight_grad(grad_weight32, grad, hidden[start:end])
            del grad  # the chunk's [tokens, vocab/tp] gradient goes before the next one is made
        grad_weight = grad_weight32.to(weight.dtype) if need_dw else None
        del grad_weight32
        ctx.computed = (need_dh, need_dw)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        saved = iter(ctx.saved_tensors)  # raises on a second backward without retain_graph
        need_dh, need_dw = ctx.computed
        grad_hidden = next(saved) * grad_loss if need_dh else None
        grad_weight = next(saved) * grad_loss if need_dw else None
        return grad_hidden, grad_weight, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               ignore_index: int = -100, chunk_tokens: int | None = None,
                               vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross entropy of the logits ``hidden @ weight.T`` against ``target``, over the targets that
    are not ``ignore_index`` (NaN when there are none, as in PyTorch), without materializing the
    logits: ``vocab_parallel_cross_entropy(hidden @ weight.T, target)`` in chunks of tokens.

    Args:
        hidden: ``[..., C]`` (e.g. ``[T, B, C]`` or ``[N, C]``), in the weight's dtype, already through
            the TP mapping of a column-parallel input (``column_parallel_input``).
        weight: this rank's vocabulary rows ``[vocab/tp, C]``.
        target: ``hidden.shape[:-1]``, global token ids.
        chunk_tokens: tokens per chunk; None: ``default_chunk_tokens`` (a chunk's logits <= 256 MiB:
            FP32 on the torch path, the weight's dtype with the kernels).
        vocab_size: the real (unpadded) vocabulary; rows of global id >= it are padding (-inf
            logits). None: no padding.

    The gradients are computed in the forward (module doc); the loss is FP32. With every target
    ignored the gradients are zero, as F.cross_entropy's (the unfused ``vocab_parallel_cross_entropy``
    gives NaN gradients there).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab/tp, hidden], got shape {tuple(weight.shape)}")
    if hidden.dim() < 2 or hidden.size(-1) != weight.size(1):
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [..., {weight.size(1)}] to match "
                         f"weight {tuple(weight.shape)}")
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and target {tuple(target.shape)} disagree: "
                         f"expected target of shape hidden.shape[:-1]")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype "
                         f"(the logits are computed in it)")
    if target.dtype.is_floating_point or target.dtype.is_complex:
        raise ValueError(f"target must hold integer token ids, got {target.dtype}")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.size(0),
                                            weight.element_size() if _uses_kernels(weight) else 4)
    elif isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive integer or None, got {vocab_size!r}")

    hidden2d = hidden.reshape(-1, hidden.size(-1))
    target1d = target.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss = _FusedLinearCrossEntropy.apply(hidden2d, weight, target1d, ignore_index, chunk_tokens,
                                              vocab_size)
    else:
        loss = _loss_only(hidden2d, _Head(weight, target1d, ignore_index, vocab_size), chunk_tokens)
    return loss
