"""Leverage score sampling (LSS) for the INT4 backward (ALGORITHMS.md §2).

A gradient GEMM that reduces over rows, `Σ_i a_iᵀ b_i`, is a sum of rank-1 terms. Keeping term i with
probability p_i and weighting it by 1/p_i keeps the sum unbiased; choosing p_i ∝ ‖a_i‖·‖b_i‖ (the
leverage score) minimises the variance for a given expected number of kept terms.

Two modes:
- "sample": real Bernoulli sampling, E[#kept] = keep_ratio · n (the paper's method, which its public
  code never exercised);
- "drop_zero": deterministic, keeps every row with a non-zero score at weight 1 (what the public code
  actually did).
"""

from __future__ import annotations

import torch

LSS_MODES = ("sample", "drop_zero")


def leverage_scores(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Row scores ‖a_i‖ (dgrad) or ‖a_i‖·‖b_i‖ (wgrad), FP32 `[n]`."""
    scores = a.float().norm(dim=1)
    if b is not None:
        if b.shape[0] != a.shape[0]:
            raise ValueError(f"leverage_scores: row counts differ ({a.shape[0]} vs {b.shape[0]})")
        scores = scores * b.float().norm(dim=1)
    return scores


def keep_probabilities(scores: torch.Tensor, expected_kept: float) -> torch.Tensor:
    """p_i = min(1, c·score_i) with c chosen so that Σ p_i = expected_kept.

    Rows whose scaled score exceeds 1 are clamped to 1 and the budget is re-spread over the rest
    (water filling); at most n rounds, usually two or three."""
    scores = scores.float()
    n_positive = int((scores > 0).sum())
    budget = min(float(expected_kept), float(n_positive))
    probs = torch.zeros_like(scores)
    if budget <= 0:
        return probs
    saturated = torch.zeros_like(scores, dtype=torch.bool)
    for _ in range(scores.numel()):
        free = (~saturated) & (scores > 0)
        remaining = budget - float(saturated.sum())
        free_total = scores[free].sum()
        if remaining <= 0 or free_total <= 0:
            break
        candidate = torch.where(free, scores * (remaining / free_total), probs)
        newly = free & (candidate >= 1.0)
        probs = torch.where(saturated, torch.ones_like(probs), candidate)
        if not bool(newly.any()):
            break
        saturated |= newly
        probs = torch.where(saturated, torch.ones_like(probs), probs)
    return probs.clamp_(0.0, 1.0)


def leverage_score_sample(scores: torch.Tensor, keep_ratio: float = 0.5, mode: str = "sample",
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose rows to keep. Returns `(indices, weights)`: int64 row indices and FP32 weights 1/p_i,
    so `Σ_{kept} w_i · term_i` is an unbiased estimate of `Σ_i term_i`."""
    if mode == "drop_zero":
        kept = torch.nonzero(scores > 0, as_tuple=False).flatten()
        return kept, torch.ones(kept.numel(), dtype=torch.float32, device=scores.device)
    if mode != "sample":
        raise ValueError(f"LSS mode must be one of {LSS_MODES}; got {mode!r}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"LSS keep_ratio must be in (0, 1]; got {keep_ratio}")
    probs = keep_probabilities(scores, keep_ratio * scores.numel())
    u = torch.rand(probs.shape, device=probs.device, generator=generator)
    kept = torch.nonzero(u < probs, as_tuple=False).flatten()
    return kept, 1.0 / probs[kept]
