"""How a full (unsharded) tensor maps to the tensor-parallel shards, and back.

A TP-sharded parameter carries three attributes (Megatron's names, which DeepSpeed also reads to
avoid counting shards twice in gradient norms):
  ``tensor_model_parallel = True``, ``partition_dim`` (the split dimension) and
  ``partition_stride``: the full tensor is ``stride`` equal blocks along ``partition_dim`` and each
  block is split over the ranks separately. The fused QKV weight uses stride 3: the full weight is
  ``[q; k; v]`` and rank r holds ``[q_r; k_r; v_r]``, so each rank keeps whole heads of all three.
Replicated parameters updated from only this rank's tokens (sequence parallelism) carry
``sequence_parallel = True``.

Initialization draws the *full* tensor on the CPU from a generator seeded by (seed, parameter
name) and keeps this rank's shard. Every TP size therefore starts from the same model, bit for
bit, at the cost of materializing each full weight once per rank at start-up (fine up to a few
billion parameters; larger models would want per-shard seeding instead).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from megaq.parallel.state import get_tensor_parallel_rank, get_tensor_parallel_world_size


def shard_tensor(full: torch.Tensor, dim: int, rank: int, world_size: int,
                 stride: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` split along ``dim`` (see the module doc for ``stride``)."""
    size = full.size(dim)
    if size % (stride * world_size) != 0:
        raise ValueError(f"dimension {dim} of size {size} cannot be split into {stride} block(s) "
                         f"x {world_size} ranks")
    if world_size == 1:
        return full
    blocks = full.chunk(stride, dim)
    return torch.cat([block.chunk(world_size, dim)[rank] for block in blocks], dim)


def merge_shards(shards: Sequence[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of ``shard_tensor``: the full tensor from all ranks' shards, in rank order."""
    if len(shards) == 1:
        return shards[0]
    per_rank = [shard.chunk(stride, dim) for shard in shards]
    return torch.cat([per_rank[r][block] for block in range(stride) for r in range(len(shards))],
                     dim)


def mark_tensor_parallel(param: torch.Tensor, partition_dim: int, partition_stride: int = 1) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = partition_stride


def mark_sequence_parallel(param: torch.Tensor) -> None:
    param.sequence_parallel = True


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def full_shape(param: torch.Tensor, world_size: int | None = None) -> torch.Size:
    """Shape of the unsharded tensor whose shard ``param`` is."""
    if world_size is None:
        world_size = get_tensor_parallel_world_size()
    shape = list(param.shape)
    if is_tensor_parallel(param):
        shape[param.partition_dim] *= world_size
    return torch.Size(shape)


def initialize_from_full_(param: torch.Tensor,
                          init_fn: Callable[[torch.Tensor, torch.Generator | None], None],
                          generator: torch.Generator | None) -> None:
    """Fill ``param`` with this rank's shard of a full FP32 CPU tensor that ``init_fn(full,
    generator)`` initializes in place (``generator`` None: torch's default CPU generator)."""
    # Explicitly on the CPU (also inside a `with torch.device(...)` block): CPU generators give
    # the same numbers on every machine.
    full = torch.empty(full_shape(param), dtype=torch.float32, device="cpu")
    init_fn(full, generator)
    if is_tensor_parallel(param):
        full = shard_tensor(full, param.partition_dim, get_tensor_parallel_rank(),
                            get_tensor_parallel_world_size(), param.partition_stride)
    with torch.no_grad():
        param.copy_(full)
