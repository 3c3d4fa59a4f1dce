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
    """p_i = min(1, c·score_i) with c chosen so that Σ p_i = expected_kept (at most the number of
    non-zero scores).

    Water filling in closed form, without a host synchronization: with the scores sorted in
    decreasing order s_0 ≥ s_1 ≥ …, the k largest saturate at p = 1 for the smallest k with
    (B − k)·s_k < Σ_{i≥k} s_i, and the rest get c = (B − k) / Σ_{i≥k} s_i."""
    scores = scores.float()
    n = scores.numel()
    if n == 0:
        return scores.clone()
    sorted_scores, order = torch.sort(scores, descending=True)
    suffix = sorted_scores.flip(0).cumsum(0).flip(0)              # Σ_{i≥k} s_i
    positive = sorted_scores > 0
    n_positive = positive.sum()
    # torch.full, not as_tensor: a host-to-device copy of a Python float waits for the GPU stream
    budget = torch.full((), max(float(expected_kept), 0.0), device=scores.device)
    budget = torch.minimum(budget, n_positive.float())
    k = torch.arange(n, device=scores.device, dtype=torch.float32)
    fits = positive & ((budget - k) * sorted_scores < suffix)
    first = torch.where(fits.any(), torch.argmax(fits.int()), n_positive)  # saturated count
    tail_sum = suffix.gather(0, first.clamp(max=n - 1).reshape(1)).reshape(())  # indexing by a 0-dim tensor would .item()
    c = torch.where(tail_sum > 0, (budget - first.float()) / tail_sum, torch.zeros_like(tail_sum))
    probs_sorted = torch.where(k < first.float(), torch.ones_like(sorted_scores), c * sorted_scores)
    probs_sorted = torch.where(positive, probs_sorted, torch.zeros_like(probs_sorted)).clamp_(0.0, 1.0)
    return torch.empty_like(probs_sorted).scatter_(0, order, probs_sorted)


def leverage_score_weights(scores: torch.Tensor, keep_ratio: float = 0.5, mode: str = "sample",
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """The same choice as `leverage_score_sample`, as a dense FP32 weight per row: 1/p_i for a kept
    row, 0 for a dropped one. Shape-static (no data-dependent indexing), so it needs no host
    synchronization on a GPU."""
    if mode == "drop_zero":
        return (scores > 0).float()
    if mode != "sample":
        raise ValueError(f"LSS mode must be one of {LSS_MODES}; got {mode!r}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"LSS keep_ratio must be in (0, 1]; got {keep_ratio}")
    probs = keep_probabilities(scores, keep_ratio * scores.numel())
    u = torch.rand(probs.shape, device=probs.device, generator=generator)
    kept = u < probs
    return torch.where(kept, 1.0 / probs.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(probs))


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
    weights = leverage_score_weights(scores, keep_ratio, mode, generator)
    kept = torch.nonzero(weights > 0, as_tuple=False).flatten()
    return kept, weights[kept]
