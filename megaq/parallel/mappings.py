"""Megatron's tensor-parallel mappings: collectives with the backward that makes gradients right.

Each mapping is an autograd Function whose backward is the collective that is *dual* to its
forward (identity <-> all-reduce, split <-> all-gather, all-gather <-> reduce-scatter), so that a
tensor-parallel network computes the same gradients as the unsplit network.

Two families:
  - tensor-parallel region, last dimension (hidden / vocab shards):
      copy_to_tp_region        fwd identity        bwd all-reduce
      reduce_from_tp_region    fwd all-reduce      bwd identity
      scatter_to_tp_region     fwd split last dim  bwd all-gather last dim
      gather_from_tp_region    fwd all-gather      bwd split last dim
  - sequence-parallel region, dimension 0 (the sequence dimension of the [T, B, C] activations
    that megaq's transformer blocks use, so that every shard is one contiguous chunk):
      scatter_to_sequence_parallel_region          fwd split dim 0     bwd all-gather dim 0
      gather_from_sequence_parallel_region         fwd all-gather      bwd reduce-scatter (or split)
      reduce_scatter_to_sequence_parallel_region   fwd reduce-scatter  bwd all-gather dim 0

All of them are the identity when the TP world size is 1 (or model parallelism is not
initialized). None of them modifies its input: the forward all-reduce works on a copy.

Every collective is counted in megaq.parallel.quantized_comm's CommStats (kinds
``all_reduce[bf16]``, ``all_gather[bf16]``, ``reduce_scatter[bf16]`` ... by the tensor's dtype), with
the same wire-byte formulas as the INT8 mappings, so the two can be compared per training step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaq.parallel.quantized_comm import record_exact_collective
from megaq.parallel.state import get_tensor_parallel_group, get_tensor_parallel_rank, \
    get_tensor_parallel_world_size

# torch >= 2.12 renamed the single-tensor collectives; the old names still work but warn.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---- the collectives themselves (no autograd) ------------------------------------------------

def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    world = get_tensor_parallel_world_size()
    if world == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, group=get_tensor_parallel_group())
    record_exact_collective("all_reduce", out.numel() * out.element_size(), out.dtype, world)
    return out


def _split_along_dim(x: torch.Tensor, dim: int) -> torch.Tensor:
    world = get_tensor_parallel_world_size()
    if world == 1:
        return x
    if x.size(dim) % world != 0:
        raise ValueError(f"cannot split dimension {dim} of size {x.size(dim)} evenly over "
                         f"{world} tensor-parallel ranks")
    chunk = x.size(dim) // world
    # contiguous: a narrowed view would keep the whole tensor alive and confuse later collectives
    return x.narrow(dim, get_tensor_parallel_rank() * chunk, chunk).contiguous()


def _all_gather_along_first_dim(x: torch.Tensor) -> torch.Tensor:
    world = get_tensor_parallel_world_size()
    if world == 1:
        return x
    x = x.contiguous()
    out = torch.empty((world * x.size(0),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=get_tensor_parallel_group())
    record_exact_collective("all_gather", x.numel() * x.element_size(), x.dtype, world)
    return out


def _all_gather_along_last_dim(x: torch.Tensor) -> torch.Tensor:
    world = get_tensor_parallel_world_size()
    if world == 1:
        return x
    # Gather rank-major along a new leading dim (one contiguous collective), then move it next
    # to the last dim: [world, ..., n] -> [..., world, n] -> [..., world * n].
    stacked = _all_gather_along_first_dim(x.unsqueeze(0))
    return stacked.movedim(0, -2).reshape(*x.shape[:-1], world * x.size(-1))


def _reduce_scatter_along_first_dim(x: torch.Tensor) -> torch.Tensor:
    world = get_tensor_parallel_world_size()
    if world == 1:
        return x
    if x.size(0) % world != 0:
        raise ValueError(f"cannot reduce-scatter dimension 0 of size {x.size(0)} evenly over "
                         f"{world} tensor-parallel ranks")
    x = x.contiguous()
    out = torch.empty((x.size(0) // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x, group=get_tensor_parallel_group())
    record_exact_collective("reduce_scatter", x.numel() * x.element_size(), x.dtype, world)
    return out


def _split_along_last_dim(x: torch.Tensor) -> torch.Tensor:
    return _split_along_dim(x, x.dim() - 1)


def _split_along_first_dim(x: torch.Tensor) -> torch.Tensor:
    return _split_along_dim(x, 0)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _dual_pair(name: str, forward_collective, backward_collective) -> type[torch.autograd.Function]:
    """The autograd Function ``name`` (a module-level name: dynamo finds the class through it) that
    applies ``forward_collective`` to its input and ``backward_collective`` to the gradient."""
    def forward(ctx, x):
        return forward_collective(x)

    def backward(ctx, grad):
        return backward_collective(grad)

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


# ---- tensor-parallel region (last dimension) -------------------------------------------------

_CopyToTensorParallelRegion = _dual_pair("_CopyToTensorParallelRegion", _identity, _all_reduce)
_ReduceFromTensorParallelRegion = _dual_pair("_ReduceFromTensorParallelRegion", _all_reduce, _identity)
_ScatterToTensorParallelRegion = _dual_pair("_ScatterToTensorParallelRegion", _split_along_last_dim,
                                            _all_gather_along_last_dim)
_GatherFromTensorParallelRegion = _dual_pair("_GatherFromTensorParallelRegion", _all_gather_along_last_dim,
                                             _split_along_last_dim)


def copy_to_tp_region(x: torch.Tensor) -> torch.Tensor:
    """Enter a TP region with a replicated tensor: identity forward, all-reduce of the gradient.

    Also used on parameters that are replicated but see only this rank's tokens (LayerNorm and
    row-parallel bias under sequence parallelism): the all-reduce sums their partial gradients.
    """
    return _CopyToTensorParallelRegion.apply(x)


def reduce_from_tp_region(x: torch.Tensor) -> torch.Tensor:
    """Leave a TP region by summing the partial results of all ranks (all-reduce)."""
    return _ReduceFromTensorParallelRegion.apply(x)


def scatter_to_tp_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's chunk of the last dimension; the gradient is all-gathered."""
    return _ScatterToTensorParallelRegion.apply(x)


def gather_from_tp_region(x: torch.Tensor) -> torch.Tensor:
    """All-gather the last dimension (rank order); the gradient is split back."""
    return _GatherFromTensorParallelRegion.apply(x)


# ---- sequence-parallel region (dimension 0) --------------------------------------------------

_ScatterToSequenceParallelRegion = _dual_pair("_ScatterToSequenceParallelRegion", _split_along_first_dim,
                                              _all_gather_along_first_dim)
_ReduceScatterToSequenceParallelRegion = _dual_pair("_ReduceScatterToSequenceParallelRegion",
                                                    _reduce_scatter_along_first_dim, _all_gather_along_first_dim)


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tensor_parallel_output_grad):
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _all_gather_along_first_dim(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            # The consumer is a TP region: each rank holds a partial gradient of the full
            # sequence, so sum them and keep this rank's chunk.
            return _reduce_scatter_along_first_dim(grad), None
        return _split_along_first_dim(grad), None


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's chunk of dimension 0 (the sequence); the gradient is all-gathered."""
    return _ScatterToSequenceParallelRegion.apply(x)


def gather_from_sequence_parallel_region(x: torch.Tensor,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """All-gather dimension 0. Backward: reduce-scatter when the result feeds a TP region (each
    rank then produces a partial gradient, the default), else just split."""
    return _GatherFromSequenceParallelRegion.apply(x, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Sum the partial results of all ranks and keep this rank's chunk of dimension 0."""
    return _ReduceScatterToSequenceParallelRegion.apply(x)
