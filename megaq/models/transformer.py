"""The GPT-2 transformer block, tensor parallel: causal self-attention, MLP, pre-LayerNorm residuals.

Activations are sequence-first, ``[T, B, C]``, as in Megatron: with sequence parallelism each
rank then holds one contiguous chunk ``[T/tp, B, C]``, and the sequence collectives need no
transposes. Inside the attention and MLP each rank works on its own heads / hidden units:

    x --LN--> qkv (column-parallel, heads split) --SDPA--> out_proj (row-parallel) --+--> x
    x --LN--> fc1 (column-parallel) --GELU--> fc2 (row-parallel) --------------------+--> x
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from megaq.nn import ColumnParallelLinear, LayerNorm, ParallelDropout, RowParallelLinear
from megaq.parallel import get_tensor_parallel_world_size, tp_rng_fork

if TYPE_CHECKING:
    from megaq.models.gpt import GPTConfig


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; rank r computes heads [r*H/tp, (r+1)*H/tp).

    The fused QKV weight is column-parallel with partition stride 3, so this rank's output is
    ``[q_r, k_r, v_r]`` for its own heads. Attention runs in the activations' dtype through
    PyTorch's SDPA (flash / memory-efficient kernels on GPU); only the projections are quantized.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head_local = cfg.n_head // get_tensor_parallel_world_size()
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = ColumnParallelLinear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias, recipe=cfg.recipe,
                                        sequence_parallel=cfg.sequence_parallel,
                                        partition_stride=3, skip_init=True,
                                        comm_dtype=cfg.comm_dtype, comm_config=cfg.comm_config)
        self.out_proj = RowParallelLinear(cfg.n_embd, cfg.n_embd, bias=cfg.bias, recipe=cfg.recipe,
                                          input_is_parallel=True,
                                          sequence_parallel=cfg.sequence_parallel, skip_init=True,
                                          comm_dtype=cfg.comm_dtype, comm_config=cfg.comm_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # [T, B, 3 * C/tp] (full T even under sequence parallelism)
        seq, batch, _ = qkv.shape
        # [T, B, 3, h, d] -> [3, B, h, T, d]: SDPA's layout, batch and heads leading.
        q, k, v = qkv.view(seq, batch, 3, self.n_head_local, self.head_dim) \
                     .permute(2, 1, 3, 0, 4).unbind(0)
        dropout_p = self.dropout if self.training else 0.0
        # The attention probabilities are this rank's heads only: draw their mask per rank.
        with tp_rng_fork() if dropout_p > 0.0 else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        y = y.permute(2, 0, 1, 3).reshape(seq, batch, self.n_head_local * self.head_dim)
        return self.out_proj(y)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.ln_attn(x)))
        x = x + self.resid_dropout(self.mlp(self.ln_mlp(x)))
        return x
