"""Tensor x data parallelism: process groups, Megatron mappings, RNG streams, sharding layout."""

from megaq.parallel.mappings import (copy_to_tp_region, gather_from_sequence_parallel_region,
                                     gather_from_tp_region, reduce_from_tp_region,
                                     reduce_scatter_to_sequence_parallel_region,
                                     scatter_to_sequence_parallel_region, scatter_to_tp_region)
from megaq.parallel.random import (TensorParallelRNGTracker, get_model_parallel_seed,
                                   get_rng_tracker, init_seed_for, model_parallel_seed,
                                   tp_rng_fork)
from megaq.parallel.sharding import (full_shape, initialize_from_full_, is_tensor_parallel,
                                     mark_sequence_parallel, mark_tensor_parallel, merge_shards,
                                     shard_tensor)
from megaq.parallel.state import (DeepSpeedMPU, destroy_model_parallel, get_data_parallel_group,
                                  get_data_parallel_group_ranks, get_data_parallel_rank,
                                  get_data_parallel_world_size, get_tensor_parallel_group,
                                  get_tensor_parallel_rank, get_tensor_parallel_src_rank,
                                  get_tensor_parallel_world_size, initialize_model_parallel,
                                  is_initialized)

__all__ = [
    "initialize_model_parallel", "destroy_model_parallel", "is_initialized",
    "get_tensor_parallel_group", "get_tensor_parallel_rank", "get_tensor_parallel_world_size",
    "get_tensor_parallel_src_rank",
    "get_data_parallel_group", "get_data_parallel_rank", "get_data_parallel_world_size",
    "get_data_parallel_group_ranks", "DeepSpeedMPU",
    "copy_to_tp_region", "reduce_from_tp_region", "scatter_to_tp_region", "gather_from_tp_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "model_parallel_seed", "get_model_parallel_seed", "get_rng_tracker", "tp_rng_fork",
    "TensorParallelRNGTracker", "init_seed_for",
    "shard_tensor", "merge_shards", "mark_tensor_parallel", "mark_sequence_parallel",
    "is_tensor_parallel", "full_shape", "initialize_from_full_",
]
