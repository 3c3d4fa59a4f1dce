"""Per-layer quantization error of the forward GEMM, measured on the live activations.

On a logging step, a forward pre-hook on every quantized linear layer (a module with a `recipe`
whose `is_quantized` is true and a `weight`) takes the layer's actual input X and weight W and
computes, in FP32,

    error = || quantized_linear(X, W, recipe) - quantized_linear(X, W, bf16) || / || reference ||

i.e. the relative Frobenius error of this rank's GEMM output (for a tensor-parallel layer, its
shard). It is a pre-hook so that under ZeRO-3 the weight is already gathered; the extra GEMMs run
under no_grad and inside a forked RNG, so a measured step trains exactly like an unmeasured one.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from megaq.ops import get_recipe, quantized_linear


def quantized_linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    found = {}
    for name, module in model.named_modules():
        recipe = getattr(module, "recipe", None)
        weight = getattr(module, "weight", None)
        if recipe is not None and getattr(recipe, "is_quantized", False) and isinstance(weight, torch.Tensor):
            found[name] = module
    return found


def relative_gemm_error(x: torch.Tensor, weight: torch.Tensor, recipe) -> float:
    x = x.detach().float()
    w = weight.detach().float()
    reference = quantized_linear(x, w, None, get_recipe("bf16"))
    quantized = quantized_linear(x, w, None, recipe)
    denom = reference.norm()
    if denom == 0:
        return float((quantized - reference).norm())
    return float((quantized - reference).norm() / denom)


class QuantErrorProbe:
    """`with probe.measuring():` around one forward pass fills `probe.errors` {layer: error}."""

    def __init__(self, model: nn.Module, interval: int) -> None:
        self.interval = interval
        self.modules = quantized_linear_modules(model) if interval > 0 else {}
        self.errors: dict[str, float] = {}

    def due(self, step: int) -> bool:
        return self.interval > 0 and bool(self.modules) and step % self.interval == 0

    @contextlib.contextmanager
    def measuring(self):
        self.errors = {}
        handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if name in self.errors or not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            x, weight = inputs[0], module.weight
            if weight.numel() == 0 or x.shape[-1] != weight.shape[-1]:
                return  # a partitioned (ZeRO-3) or otherwise unexpected layout: nothing to measure
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                self.errors[name] = relative_gemm_error(x, weight, module.recipe)
        return hook

    def take(self) -> Optional[dict[str, float]]:
        errors, self.errors = self.errors, {}
        return errors or None
