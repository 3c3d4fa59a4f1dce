"""Process groups for tensor parallel (TP) x data parallel (DP) training.

Layout (Megatron's, TP-major): with world size W and TP size t, the ``t`` consecutive global ranks
``[k*t, ..., k*t + t - 1]`` form TP group ``k``, and ranks with the same TP rank form a DP group
``[r, r + t, r + 2t, ...]``. Consecutive ranks usually share a node, so the chatty TP collectives
(one all-reduce per linear layer pair) stay on NVLink while DP traffic crosses nodes.

Without ``initialize_model_parallel`` the getters describe a model that is not split: TP size 1,
TP rank 0, and every process a data-parallel replica (DP size = torch.distributed's world size, or
1 in a single process). The layers above therefore run unchanged in a plain single-process script.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class _ParallelState:
    tp_size: int
    dp_size: int
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    tp_ranks: tuple[int, ...]  # global ranks of this process's TP group
    dp_ranks: tuple[int, ...]  # global ranks of this process's DP group


_STATE: _ParallelState | None = None


def initialize_model_parallel(tensor_parallel_size: int) -> None:
    """Create this process's TP and DP groups. Every rank must call it, with the same size.

    Requires ``torch.distributed`` to be initialized (e.g. by ``deepspeed.init_distributed`` or
    ``torch.distributed.init_process_group``).
    """
    global _STATE
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "initialize_model_parallel requires torch.distributed to be initialized first "
            "(torch.distributed.init_process_group or deepspeed.init_distributed)")
    if _STATE is not None:
        raise RuntimeError("model parallel groups are already initialized; call "
                           "destroy_model_parallel() before initializing them again")
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) \
            or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
    world_size = dist.get_world_size()
    if world_size % tensor_parallel_size != 0:
        raise ValueError(f"world size {world_size} is not divisible by tensor_parallel_size "
                         f"{tensor_parallel_size}")
    tp = tensor_parallel_size
    dp = world_size // tp
    rank = dist.get_rank()

    # new_group is collective: every rank creates every group, in the same order, and keeps its own.
    tp_group = dp_group = None
    tp_ranks = dp_ranks = ()
    for k in range(dp):
        ranks = tuple(range(k * tp, (k + 1) * tp))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            tp_group, tp_ranks = group, ranks
    for r in range(tp):
        ranks = tuple(range(r, world_size, tp))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            dp_group, dp_ranks = group, ranks
    _STATE = _ParallelState(tp, dp, tp_group, dp_group, tp_ranks, dp_ranks)


def destroy_model_parallel() -> None:
    """Forget the groups made by ``initialize_model_parallel`` (a no-op when there are none)."""
    global _STATE
    if _STATE is None:
        return
    for group in (_STATE.tp_group, _STATE.dp_group):
        if dist.is_initialized():
            dist.destroy_process_group(group)
    _STATE = None


def is_initialized() -> bool:
    """True once ``initialize_model_parallel`` has run (and before ``destroy_model_parallel``)."""
    return _STATE is not None


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_tensor_parallel_group() -> dist.ProcessGroup | None:
    """This rank's TP group; None when model parallelism is not initialized (TP size 1)."""
    return _STATE.tp_group if _STATE is not None else None


def get_tensor_parallel_world_size() -> int:
    return _STATE.tp_size if _STATE is not None else 1


def get_tensor_parallel_rank() -> int:
    if _STATE is None:
        return 0
    return dist.get_rank(group=_STATE.tp_group)


def get_tensor_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group (the source for broadcasts inside it)."""
    if _STATE is None:
        return dist.get_rank() if _dist_active() else 0
    return _STATE.tp_ranks[0]


def get_data_parallel_group() -> dist.ProcessGroup | None:
    """This rank's DP group. Without model parallelism: the world group, or None in one process."""
    if _STATE is not None:
        return _STATE.dp_group
    return dist.group.WORLD if _dist_active() else None


def get_data_parallel_world_size() -> int:
    if _STATE is not None:
        return _STATE.dp_size
    return dist.get_world_size() if _dist_active() else 1


def get_data_parallel_rank() -> int:
    if _STATE is not None:
        return dist.get_rank(group=_STATE.dp_group)
    return dist.get_rank() if _dist_active() else 0


def get_data_parallel_group_ranks() -> list[int]:
    """Global ranks of this rank's DP group."""
    if _STATE is not None:
        return list(_STATE.dp_ranks)
    return list(range(dist.get_world_size())) if _dist_active() else [0]


class DeepSpeedMPU:
    """The ``mpu`` object ``deepspeed.initialize(..., mpu=DeepSpeedMPU())`` expects.

    DeepSpeed uses it to reduce gradients only over the DP group and to compute gradient norms
    without counting TP-sharded parameters twice (it recognizes them by the
    ``tensor_model_parallel`` attribute that megaq's parallel layers set). We have no pipeline
    stages, so "model parallel" here means tensor parallel. It needs initialized groups: without
    them the TP group would be None, which torch.distributed reads as the whole world.
    """

    def __init__(self) -> None:
        if not is_initialized():
            raise RuntimeError("DeepSpeedMPU needs initialize_model_parallel() to have run")

    def get_model_parallel_group(self):
        return get_tensor_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return get_tensor_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return get_tensor_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return get_tensor_parallel_src_rank()

    def get_data_parallel_group(self):
        return get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return get_data_parallel_group_ranks()
