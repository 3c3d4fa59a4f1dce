"""Tensor-parallel building blocks: parallel linears, vocab-parallel embedding and loss."""

from megaq.nn.cross_entropy import vocab_parallel_cross_entropy
from megaq.nn.dropout import ParallelDropout
from megaq.nn.embedding import VocabParallelEmbedding
from megaq.nn.fused_cross_entropy import fused_linear_cross_entropy
from megaq.nn.layernorm import LayerNorm
from megaq.nn.linear import (ColumnParallelLinear, RowParallelLinear,
                             column_parallel_input, column_parallel_linear, normal_init,
                             zeros_init)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "column_parallel_input", "column_parallel_linear",
           "VocabParallelEmbedding", "vocab_parallel_cross_entropy", "fused_linear_cross_entropy", "LayerNorm",
           "ParallelDropout", "normal_init", "zeros_init"]
