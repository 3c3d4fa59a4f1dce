"""Benchmark peers: the same GPT, data and optimizer, with the blocks' linear layers trained by
another library instead of a megaq recipe (`quant.peer`), so that tools/bench_e2e.py compares
end-to-end training against them through the real trainer.

torchao's float8 training (`torchao_float8_tensorwise`, `torchao_float8_rowwise`) swaps
`nn.Linear` modules for its `Float8Linear`. megaq's blocks hold Column/RowParallelLinear modules,
which at tensor-parallel size 1 with the BF16 recipe compute exactly `F.linear(x, W, b)` (the TP
collectives are identities). So each of them is first replaced by an `nn.Linear` that shares its
weight and bias Parameters (same names, same initialization, same optimizer groups, checkpoints
unchanged), and torchao converts those. The lm_head (tied to the embedding) stays BF16, as it does
under megaq's recipes.

torchao is optional: imported only here, only when a peer is asked for.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from megaq.nn import ColumnParallelLinear, RowParallelLinear
from megaq.training.config import ConfigError

logger = logging.getLogger(__name__)

# quant.peer -> torchao Float8LinearConfig recipe name
TORCHAO_FLOAT8_RECIPES = {"torchao_float8_tensorwise": "tensorwise", "torchao_float8_rowwise": "rowwise"}

# torch._scaled_mm's float8 GEMMs need compute capability 8.9 (Ada) or 9.0 (Hopper) and above.
_FLOAT8_MIN_CAPABILITY = (8, 9)


def as_plain_linear(layer: nn.Module) -> nn.Linear:
    """An nn.Linear computing what a TP-size-1 Column/RowParallelLinear under the BF16 recipe
    computes, holding the same Parameter objects."""
    if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
        raise TypeError(f"expected a ColumnParallelLinear or RowParallelLinear, got {type(layer).__name__}")
    if layer.recipe.is_quantized:
        raise ValueError(f"{layer!r} runs the quantized recipe {layer.recipe.name!r}; only a BF16 layer is "
                         f"the same computation as nn.Linear")
    out_features, in_features = layer.weight.shape
    if (out_features, in_features) != (layer.out_features, layer.in_features):
        raise ValueError(f"{layer!r} holds a tensor-parallel shard {tuple(layer.weight.shape)}; a peer needs "
                         f"tensor-parallel size 1")
    with torch.device("meta"):  # no throw-away allocation: the parameters are replaced right away
        linear = nn.Linear(in_features, out_features, bias=layer.bias is not None)
    linear.weight = layer.weight
    linear.bias = layer.bias
    return linear


def swap_parallel_linears(model: nn.Module) -> list[str]:
    """Replace every Column/RowParallelLinear inside `model.blocks` by its `as_plain_linear`.
    Returns the swapped modules' names."""
    swapped = []
    for block_name, block in list(model.blocks.named_modules(prefix="blocks")):
        for child_name, child in list(block.named_children()):
            if isinstance(child, (ColumnParallelLinear, RowParallelLinear)):
                setattr(block, child_name, as_plain_linear(child))
                swapped.append(f"{block_name}.{child_name}")
    return swapped


def _import_torchao_float8(peer: str):
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ConfigError(f"quant.peer={peer!r} needs torchao (pip install torchao), which cannot be "
                          f"imported: {e}") from None
    return Float8LinearConfig, convert_to_float8_training


def check_float8_device(peer: str, device_type: str) -> None:
    if device_type != "cuda":
        raise ConfigError(f"quant.peer={peer!r} trains with float8 GEMMs, which need a CUDA GPU (none found)")
    capability = torch.cuda.get_device_capability()
    if capability < _FLOAT8_MIN_CAPABILITY:
        raise ConfigError(f"quant.peer={peer!r}: this GPU ({torch.cuda.get_device_name()}, compute capability "
                          f"{capability[0]}.{capability[1]}) has no float8 tensor cores; they need "
                          f"{_FLOAT8_MIN_CAPABILITY[0]}.{_FLOAT8_MIN_CAPABILITY[1]} or newer")


def apply_peer(model: nn.Module, peer: str, device_type: str) -> None:
    """Convert `model`'s transformer-block linears in place as `peer` says (see the module doc)."""
    if peer not in TORCHAO_FLOAT8_RECIPES:
        raise ConfigError(f"quant.peer={peer!r} is not a known peer; known: {sorted(TORCHAO_FLOAT8_RECIPES)}")
    Float8LinearConfig, convert_to_float8_training = _import_torchao_float8(peer)
    check_float8_device(peer, device_type)
    swapped = set(swap_parallel_linears(model))
    if not swapped:
        raise ValueError("quant.peer: the model has no Column/RowParallelLinear in model.blocks to convert")
    config = Float8LinearConfig.from_recipe_name(TORCHAO_FLOAT8_RECIPES[peer])
    convert_to_float8_training(model, config=config, module_filter_fn=lambda module, fqn: fqn in swapped)
    converted = [name for name, module in model.named_modules()
                 if name in swapped and type(module) is not nn.Linear]
    if len(converted) != len(swapped):
        missed = sorted(swapped - set(converted))
        raise RuntimeError(f"quant.peer={peer!r}: torchao left {len(missed)} linear layers unconverted "
                           f"(e.g. {missed[:3]})")
    logger.info(f"peer {peer}: {len(converted)} block linear layers trained by torchao float8 "
                f"({TORCHAO_FLOAT8_RECIPES[peer]} scaling); the lm_head stays BF16")
