"""Helpers the kernel test files share: the relative error they bound, and the random test inputs."""

from __future__ import annotations

import torch


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ‖a − b‖ / ‖b‖ in FP64 (on the CPU, autograd detached)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def random_input(shape, device, dtype=torch.float32, seed=0, outliers: float = 0.0) -> torch.Tensor:
    """2·N(0, 1) from a seeded CPU generator (the same values on every device); with `outliers`, every
    37th column multiplied by it (outlier channels, what the per-block and rotated scalings are for)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0
    if outliers:
        x[:, ::37] *= outliers
    return x.to(device=device, dtype=dtype)


def gpt2_head_inputs(tokens=4096, hidden_size=768, vocab_rows=50304, vocab=50257, weight_std=0.02):
    """BF16 CUDA inputs of GPT-2 124M's output layer + loss: hidden [tokens, C], the padded
    vocabulary's weight [vocab_rows, C] (padding rows zero), targets with every 11th ignored (-100);
    returns (hidden, weight, target, vocab)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(vocab_rows, hidden_size, device="cuda", generator=g) * weight_std).bfloat16()
    weight[vocab:] = 0
    target = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    target[::11] = -100
    return hidden, weight, target, vocab
