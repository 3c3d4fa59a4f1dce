"""Deterministic, resumable sampling of sample indices for data-parallel training.

The global order is one infinite stream of sample indices: epoch e contributes a permutation of
range(num_samples) seeded by (seed, e), epochs back to back. A training step takes the next
micro_batch_size * dp_size indices of the stream; data-parallel rank r takes its contiguous slice
of them. The stream depends only on (num_samples, seed), so a run resumed from `consumed_samples`
(the global count of samples taken so far) continues exactly where an uninterrupted run would be,
even if micro batch size or data-parallel size changed in between. No sample is dropped at an
epoch boundary: a step may take the end of one epoch and the start of the next.
"""

from __future__ import annotations

import numpy as np


class ResumableSampler:
    """Iterating yields, forever, this rank's micro batches as lists of sample indices."""

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 consumed_samples: int = 0, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples} (is the dataset empty?)")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.num_samples = int(num_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.consumed_samples = int(consumed_samples)
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def global_batch_size(self) -> int:
        """Samples one iteration consumes across all data-parallel ranks."""
        return self.micro_batch_size * self.dp_size

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            # A step touches at most the current and next epoch; keep only those.
            for old in [e for e in self._permutations if e < epoch - 1]:
                del self._permutations[old]
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples)
            self._permutations[epoch] = perm
        return self._permutations[epoch]

    def indices_at(self, consumed_samples: int) -> list[int]:
        """This rank's micro batch of the step that starts after `consumed_samples` samples."""
        first = consumed_samples + self.dp_rank * self.micro_batch_size
        positions = np.arange(first, first + self.micro_batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_samples)
        out = np.empty(self.micro_batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self._permutation(int(e))[offsets[mask]]
        return out.tolist()

    def __iter__(self):
        while True:
            batch = self.indices_at(self.consumed_samples)
            self.consumed_samples += self.global_batch_size
            yield batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "num_samples": self.num_samples,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        # A different dataset size or seed would silently change the order being resumed.
        for key in ("num_samples", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}; the resumed data order would differ")
        consumed = state.get("consumed_samples")
        if not isinstance(consumed, (int, np.integer)) or consumed < 0:
            raise ValueError(f"sampler state: consumed_samples must be a non-negative int, got {consumed!r}")
        self.consumed_samples = int(consumed)
