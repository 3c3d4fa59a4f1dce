"""Vocab-parallel token embedding: each TP rank holds a contiguous range of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaq.nn.linear import InitFn, normal_init
from megaq.parallel import (get_tensor_parallel_rank, get_tensor_parallel_world_size,
                            initialize_from_full_, mark_tensor_parallel, reduce_from_tp_region)


class VocabParallelEmbedding(nn.Module):
    """Embedding table ``[num_embeddings, dim]`` split along the vocabulary.

    Rank r holds rows ``[r * V/tp, (r + 1) * V/tp)``. A token outside this range looks up row 0
    and has its vector zeroed, so summing over the ranks (all-reduce) gives every token exactly
    its one row. ``num_embeddings`` must be divisible by the TP size (pad the vocabulary).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 init_method: InitFn = normal_init(0.02), skip_init: bool = False):
        super().__init__()
        tp = get_tensor_parallel_world_size()
        if num_embeddings % tp != 0:
            raise ValueError(f"num_embeddings ({num_embeddings}) must be divisible by the "
                             f"tensor-parallel size ({tp}); pad the vocabulary")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_rank = num_embeddings // tp
        self.vocab_start = get_tensor_parallel_rank() * self.num_embeddings_per_rank
        self.vocab_end = self.vocab_start + self.num_embeddings_per_rank
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim))
        mark_tensor_parallel(self.weight, partition_dim=0)
        if not skip_init:
            self.reset_parameters(init_method)

    def reset_parameters(self, init_method: InitFn = normal_init(0.02),
                         generator: torch.Generator | None = None) -> None:
        initialize_from_full_(self.weight, init_method, generator)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if get_tensor_parallel_world_size() == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = torch.where(outside, 0, ids - self.vocab_start)
        out = F.embedding(local_ids, self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(out)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"vocab_range=[{self.vocab_start}, {self.vocab_end})")
