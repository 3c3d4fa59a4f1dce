"""The GPT-2 transformer block, tensor parallel: causal self-attention, MLP, pre-LayerNorm residuals.

Activations are sequence-first, ``[T, B, C]``, as in Megatron: with sequence parallelism each
rank then holds one contiguous chunk ``[T/tp, B, C]``, and the sequence collectives need no
transposes. Inside the attention and MLP each rank works on its own heads / hidden units:

    x --LN--> qkv (column-parallel, heads split) --SDPA--> out_proj (row-parallel) --+--> x
    x --LN--> fc1 (column-parallel) --GELU--> fc2 (row-parallel) --------------------+--> x

With ``cfg.data_flow == "int8"`` the block runs the INT8 data flow (``megaq.ops.dataflow_linear``
says which scales travel where): the LayerNorms (the second fused with the attention residual add)
and the GELU write INT8 GEMM operands, fc1 writes INT8 from its epilogue, and only INT8 activations
are saved for backward, except what attention keeps: BF16 q, k, v and output by default, INT8
copies with ``cfg.attention_saves == "int8"`` (megaq.ops.attention). Same parameters, same module
tree: a checkpoint loads into either path.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from megaq.nn import ColumnParallelLinear, LayerNorm, ParallelDropout, RowParallelLinear
from megaq.ops import (Int8Operand, causal_attention, data_flow_format, dataflow_linear, gelu_operand,
                       layernorm_operand, split_heads)
from megaq.parallel import get_tensor_parallel_world_size, tp_rng_fork

if TYPE_CHECKING:
    from megaq.models.gpt import GPTConfig


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; rank r computes heads [r*H/tp, (r+1)*H/tp).

    The fused QKV weight is column-parallel with partition stride 3, so this rank's output is
    ``[q_r, k_r, v_r]`` for its own heads. Attention runs in the activations' dtype through
    PyTorch's SDPA (flash / memory-efficient kernels on GPU); only the projections are quantized.
    ``cfg.attention_saves`` chooses what it keeps for backward (megaq.ops.causal_attention).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head_local = cfg.n_head // get_tensor_parallel_world_size()
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.attention_saves = cfg.attention_saves
        self.qkv = ColumnParallelLinear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias, recipe=cfg.recipe,
                                        sequence_parallel=cfg.sequence_parallel,
                                        partition_stride=3, skip_init=True,
                                        comm_dtype=cfg.comm_dtype, comm_config=cfg.comm_config)
        self.out_proj = RowParallelLinear(cfg.n_embd, cfg.n_embd, bias=cfg.bias, recipe=cfg.recipe,
                                          input_is_parallel=True,
                                          sequence_parallel=cfg.sequence_parallel, skip_init=True,
                                          comm_dtype=cfg.comm_dtype, comm_config=cfg.comm_config)
        # NaN/Inf check before attention's INT8 saves: the recipe's switch (read once: benchmark
        # peers may swap the projections for plain nn.Linear)
        self.check_finite = self.qkv.recipe.check_finite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.attend(self.qkv(x)))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Causal attention over this rank's heads: ``qkv [T, B, 3 * C/tp]`` (full T even under
        sequence parallelism) -> ``[T, B, C/tp]``."""
        seq, batch, _ = qkv.shape
        # [T, B, 3, h, d] -> [3, B, h, T, d]: SDPA's layout, batch and heads leading (views).
        q, k, v = split_heads(qkv, self.n_head_local)
        dropout_p = self.dropout if self.training else 0.0
        # The attention probabilities are this rank's heads only: draw their mask per rank.
        with tp_rng_fork() if dropout_p > 0.0 else contextlib.nullcontext():
            y = causal_attention(q, k, v, dropout_p, saves=self.attention_saves,
                                 check=self.check_finite)
        return y.permute(2, 0, 1, 3).reshape(seq, batch, self.n_head_local * self.head_dim)


class MLP(nn.Module):
    """fc1 (column-parallel, 4C/tp hidden units per rank) -> GELU (tanh, as GPT-2) -> fc2
    (row-parallel)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = 4 * cfg.n_embd
        self.fc1 = ColumnParallelLinear(cfg.n_embd, hidden, bias=cfg.bias, recipe=cfg.recipe,
                                        sequence_parallel=cfg.sequence_parallel, skip_init=True,
                                        comm_dtype=cfg.comm_dtype, comm_config=cfg.comm_config)
        self.fc2 = RowParallelLinear(hidden, cfg.n_embd, bias=cfg.bias, recipe=cfg.recipe,
                                     input_is_parallel=True,
                                     sequence_parallel=cfg.sequence_parallel, skip_init=True,
                                     comm_dtype=cfg.comm_dtype, comm_config=cfg.comm_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + drop(attn(ln(x)))``, then ``x + drop(mlp(ln(x)))``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        sp = cfg.sequence_parallel
        self.ln_attn = LayerNorm(cfg.n_embd, cfg.layer_norm_eps, cfg.bias, sequence_parallel=sp)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = LayerNorm(cfg.n_embd, cfg.layer_norm_eps, cfg.bias, sequence_parallel=sp)
        self.mlp = MLP(cfg)
        # The residual stream is replicated over the TP ranks, or sharded along the sequence
        # under sequence parallelism; the dropout mask must follow.
        self.resid_dropout = ParallelDropout(cfg.dropout, input_is_sharded=sp)
        self.data_flow = cfg.data_flow
        # the GEMM operand layout the INT8 producers write (validated with the config)
        self.operand_format = data_flow_format(cfg.recipe) if cfg.data_flow == "int8" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_flow == "int8":
            return self._forward_int8(x)
        # On GPUs each LayerNorm is one kernel forward and one backward, with the residual stream's add
        # (and, in backward, the sum of the stream's two gradients) fused in: megaq.ops.add_layernorm
        x, h = self.ln_attn(x, carry=True)
        a = self.resid_dropout(self.attn(h))
        x, h = self.ln_mlp(x, residual=a)
        return x + self.resid_dropout(self.mlp(h))

    def _forward_int8(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.operand_format
        check = self.attn.qkv.recipe.check_finite
        ln = self.ln_attn
        # carry: the stream's gradient from the second LayerNorm is summed in this one's backward
        x, h = layernorm_operand(x, ln.weight, ln.bias, ln.eps, *fmt, carry=True, check=check)
        y = self.attn.attend(_column_parallel(self.attn.qkv, h))
        a = self.resid_dropout(_row_parallel(self.attn.out_proj, y))
        ln = self.ln_mlp
        x, h = layernorm_operand(x, ln.weight, ln.bias, ln.eps, *fmt, residual=a, check=check)
        u = _column_parallel(self.mlp.fc1, h, int8_output=True)
        m = _row_parallel(self.mlp.fc2, gelu_operand(u, *fmt))
        return x + self.resid_dropout(m)


def _column_parallel(linear: ColumnParallelLinear, x: Int8Operand, int8_output: bool = False):
    """`linear` on an INT8 operand (no sequence parallelism: the config refuses it with the data
    flow): the replicated input enters the TP region through its autograd handle. Under TP the
    LayerNorm's gradient is the all-reduced sum of the ranks' ∇X, not one rank's INT8 ∇X: no
    `grad_slot` then (the LayerNorm would detect the mismatch, but the INT8 copy would be wasted)."""
    x = x._replace(carrier=linear.comm.copy_to_tp_region(x.carrier),
                   grad_slot=x.grad_slot if get_tensor_parallel_world_size() == 1 else None)
    return dataflow_linear(x, linear.weight, linear.bias, linear.recipe, int8_output=int8_output)


def _row_parallel(linear: RowParallelLinear, x: "Int8Operand | torch.Tensor") -> torch.Tensor:
    """`linear` on this rank's input features: partial products summed over the TP ranks, then the
    replicated bias (as RowParallelLinear.forward)."""
    if get_tensor_parallel_world_size() == 1:   # nothing to reduce: the bias in the GEMM's epilogue
        return dataflow_linear(x, linear.weight, linear.bias, linear.recipe)
    y = linear.comm.reduce_from_tp_region(dataflow_linear(x, linear.weight, None, linear.recipe))
    return y + linear.bias if linear.bias is not None else y
