"""Column- and row-parallel linear layers (Megatron), with every GEMM a ``megaq.ops.quantized_linear``.

A pair ``ColumnParallelLinear -> RowParallelLinear`` (QKV -> out-projection, fc1 -> fc2) needs
one all-reduce forward and one backward:

    x (replicated) --copy--> X W_r^T  (rank r: out/tp columns) --> ... --> Y_r W2_r^T --all-reduce--> y

With sequence parallelism the replicated input is instead sharded along the sequence (dim 0 of
the [T, B, C] activations): the column layer all-gathers it, the row layer reduce-scatters its
output, which moves the same bytes as the all-reduce but keeps LayerNorm/dropout/residual work
and memory split over the ranks.

The layers only choose where the collectives go; the recipe decides how the GEMM is computed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from megaq.ops import Recipe, get_recipe, quantized_linear
from megaq.parallel import (copy_to_tp_region, gather_from_tp_region, get_tensor_parallel_world_size,
                            initialize_from_full_, mark_sequence_parallel, mark_tensor_parallel,
                            scatter_to_tp_region)
from megaq.parallel.quantized_comm import QuantizedCommConfig, TPMappings, tp_mappings

InitFn = Callable[[torch.Tensor, "torch.Generator | None"], None]


def normal_init(std: float) -> InitFn:
    """GPT-2's initializer: N(0, std^2), drawn from ``generator`` (None: torch's default one)."""
    def init(t: torch.Tensor, generator: torch.Generator | None) -> None:
        t.normal_(0.0, std, generator=generator)
    return init


def zeros_init(t: torch.Tensor, generator: torch.Generator | None = None) -> None:
    t.zero_()


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts != 0:
        raise ValueError(f"{what} ({n}) must be divisible by {parts}")
    return n // parts


def column_parallel_input(x: torch.Tensor, *, sequence_parallel: bool = False,
                          comm: TPMappings | None = None) -> torch.Tensor:
    """The input of a column-parallel GEMM: ``x`` as every rank must see it (all-gathered along the
    sequence under sequence parallelism), with the backward that sums the ranks' partial gradients.
    Also the fused LM head + cross entropy's input (``megaq.nn.fused_cross_entropy``)."""
    comm = comm or tp_mappings("bf16")
    if sequence_parallel:
        return comm.gather_from_sequence_parallel_region(x)  # backward: reduce-scatter of the partial grads
    return comm.copy_to_tp_region(x)  # backward: all-reduce of the partial grads


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           recipe: Recipe, *, sequence_parallel: bool = False,
                           gather_output: bool = False, comm: TPMappings | None = None) -> torch.Tensor:
    """``x W^T + b`` with ``weight`` this rank's rows ``[out/tp, in]``; also the vocab-parallel
    lm_head, whose weight is the (tied) embedding shard. ``comm`` picks exact (default) or INT8
    collectives (``megaq.parallel.quantized_comm.tp_mappings``)."""
    x = column_parallel_input(x, sequence_parallel=sequence_parallel, comm=comm)
    y = quantized_linear(x, weight, bias, recipe)
    return gather_from_tp_region(y) if gather_output else y


class _ParallelLinear(nn.Module):
    """What Column- and RowParallelLinear share: the recipe, the TP collectives (``comm``) and the
    parameter shards, left uninitialized here. The subclass gives the shards' shapes, marks how
    they split the full parameters, then initializes them (``reset_parameters`` reads the marks)."""

    def __init__(self, in_features: int, out_features: int, weight_shape: tuple[int, int],
                 bias_size: int | None, *, recipe: "str | dict | Recipe", sequence_parallel: bool,
                 comm_dtype: str, comm_config: "QuantizedCommConfig | dict | None"):
        super().__init__()
        self.comm_dtype = comm_dtype
        self.comm = tp_mappings(comm_dtype, comm_config)
        self.in_features = in_features
        self.out_features = out_features
        self.sequence_parallel = sequence_parallel
        self.recipe = get_recipe(recipe)
        self.weight = nn.Parameter(torch.empty(weight_shape))
        if bias_size is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.empty(bias_size))

    def reset_parameters(self, init_method: InitFn = normal_init(0.02),
                         generator: torch.Generator | None = None) -> None:
        """Initialize this rank's shards of a full weight drawn from ``generator`` (the default
        generator when None, which must then be in the same state on all TP ranks); the bias to zero."""
        initialize_from_full_(self.weight, init_method, generator)
        if self.bias is not None:
            initialize_from_full_(self.bias, zeros_init, generator)


class ColumnParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W split along its output dimension: rank r holds ``[out/tp, in]``.

    Args:
        gather_output: all-gather the output's last dim (otherwise each rank returns its
            ``out/tp`` columns, ready for a RowParallelLinear).
        sequence_parallel: the input is this rank's chunk of the sequence (dim 0) and is
            all-gathered before the GEMM.
        partition_stride: the output dim is ``stride`` equal blocks, each split over the ranks
            (3 for a fused QKV, so each rank holds whole heads of q, k and v).
        skip_init: leave the parameters uninitialized (the caller initializes them).
        comm_dtype: "bf16" (exact collectives in the activations' dtype) or "int8" (INT8 payload +
            block scales, ``comm_config`` says how).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 recipe: "str | dict | Recipe" = "bf16", gather_output: bool = False,
                 sequence_parallel: bool = False, partition_stride: int = 1,
                 init_method: InitFn = normal_init(0.02), skip_init: bool = False,
                 comm_dtype: str = "bf16", comm_config: "QuantizedCommConfig | dict | None" = None):
        tp = get_tensor_parallel_world_size()
        if out_features % (partition_stride * tp) != 0:
            raise ValueError(f"out_features ({out_features}) must be divisible by partition_stride "
                             f"x tensor-parallel size ({partition_stride} x {tp})")
        if gather_output and partition_stride != 1:
            # The gathered output would be [q0 k0 v0 q1 k1 v1], not the layout of the full layer.
            raise ValueError("gather_output is not supported with partition_stride > 1")
        super().__init__(in_features, out_features, (out_features // tp, in_features),
                         out_features // tp if bias else None, recipe=recipe,
                         sequence_parallel=sequence_parallel, comm_dtype=comm_dtype, comm_config=comm_config)
        self.gather_output = gather_output
        mark_tensor_parallel(self.weight, partition_dim=0, partition_stride=partition_stride)
        if self.bias is not None:
            mark_tensor_parallel(self.bias, partition_dim=0, partition_stride=partition_stride)
        if not skip_init:
            self.reset_parameters(init_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel_linear(x, self.weight, self.bias, self.recipe,
                                      sequence_parallel=self.sequence_parallel,
                                      gather_output=self.gather_output, comm=self.comm)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, recipe={self.recipe.name}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}, "
                f"comm_dtype={self.comm_dtype}")


class RowParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W split along its input dimension: rank r holds ``[out, in/tp]``.

    Each rank computes a partial product over its slice of ``in``; the partial outputs are summed
    by an all-reduce (or, with ``sequence_parallel``, a reduce-scatter along the sequence). The
    bias is replicated and added once, after the reduction (in the GEMM's epilogue when there is
    no reduction: one rank per TP group).

    Args:
        input_is_parallel: the input already holds this rank's ``in/tp`` features (the output of
            a ColumnParallelLinear); otherwise the full input is split here.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 recipe: "str | dict | Recipe" = "bf16", input_is_parallel: bool = True,
                 sequence_parallel: bool = False, init_method: InitFn = normal_init(0.02),
                 skip_init: bool = False, comm_dtype: str = "bf16",
                 comm_config: "QuantizedCommConfig | dict | None" = None):
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel requires input_is_parallel=True")
        tp = get_tensor_parallel_world_size()
        super().__init__(in_features, out_features, (out_features, _divide(in_features, tp, "in_features")),
                         out_features if bias else None, recipe=recipe, sequence_parallel=sequence_parallel,
                         comm_dtype=comm_dtype, comm_config=comm_config)
        self.input_is_parallel = input_is_parallel
        mark_tensor_parallel(self.weight, partition_dim=1)
        if self.bias is not None and sequence_parallel:
            mark_sequence_parallel(self.bias)
        if not skip_init:
            self.reset_parameters(init_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x)
        if get_tensor_parallel_world_size() == 1:
            # nothing to reduce: the bias goes into the GEMM's epilogue (and, under INT8, its gradient
            # into the ∇Y quantizer) instead of a broadcast add and a sum over the tokens of its own
            return quantized_linear(x, self.weight, self.bias, self.recipe)
        y = quantized_linear(x, self.weight, None, self.recipe)
        if self.sequence_parallel:
            y = self.comm.reduce_scatter_to_sequence_parallel_region(y)
        else:
            y = self.comm.reduce_from_tp_region(y)
        if self.bias is not None:
            # Under sequence parallelism each rank sees only its tokens: the all-reduce in the
            # backward of copy_to_tp_region sums the bias's partial gradients.
            bias = copy_to_tp_region(self.bias) if self.sequence_parallel else self.bias
            y = y + bias
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, recipe={self.recipe.name}, "
                f"input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}, comm_dtype={self.comm_dtype}")
