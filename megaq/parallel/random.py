"""Random number streams for tensor-parallel training.

Two kinds of randomness need different streams:
  - computation on *replicated* tensors (dropout on the residual stream outside sequence-parallel
    regions, the embedding dropout) must draw the same numbers on every TP rank, or the replicas
    diverge. It uses torch's default generators, seeded identically on all ranks.
  - computation on *sharded* tensors (attention dropout on this rank's heads, dropout inside
    sequence-parallel regions) must draw different numbers on each TP rank, or the shards get
    correlated masks. It runs inside ``tp_rng_fork()``, which swaps in a per-TP-rank stream.

``model_parallel_seed(seed)`` sets both, and records ``seed`` for the weight initialization
(``init_seed_for``): weights are drawn from a generator seeded by (seed, parameter name) so that the
same seed gives the same model whatever the TP size (see ``megaq.parallel.sharding``).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch

from megaq.parallel.state import get_tensor_parallel_rank, get_tensor_parallel_world_size

TP_RNG_STREAM = "tensor-parallel"
# Offset of the TP stream from the global seed (Megatron's constant), so that the two streams of
# TP rank 0 are not the same sequence.
_TP_SEED_OFFSET = 2718

_MODEL_PARALLEL_SEED: int | None = None


def _cuda_ready() -> bool:
    # is_available, not is_initialized: a stream seeded before CUDA's first use must still carry
    # a CUDA state, or dropout on GPU tensors would silently draw from the shared default stream.
    return torch.cuda.is_available()


class TensorParallelRNGTracker:
    """Named RNG states that ``fork(name)`` swaps in for the default generators.

    Device-general version of Megatron's CudaRNGStatesTracker: it tracks the CPU generator and,
    where CUDA is in use, the current CUDA device's generator, so dropout on either device draws
    from the forked stream.
    """

    def __init__(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor]] = {}

    def reset(self) -> None:
        self._states = {}

    def names(self) -> list[str]:
        return list(self._states)

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        saved = self._capture()
        torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
        self._states[name] = self._capture()
        self._restore(saved)

    def get_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of all streams (for checkpoints)."""
        return {name: {dev: s.clone() for dev, s in st.items()} for name, st in self._states.items()}

    def set_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        self._states = {name: {dev: s.clone() for dev, s in st.items()} for name, st in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TP_RNG_STREAM) -> Iterator[None]:
        if name not in self._states:
            raise RuntimeError(f"RNG stream {name!r} does not exist; call "
                               f"megaq.parallel.model_parallel_seed(seed) first")
        saved = self._capture()
        self._restore(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._capture()
            self._restore(saved)

    @staticmethod
    def _capture() -> dict[str, torch.Tensor]:
        states = {"cpu": torch.get_rng_state()}
        if _cuda_ready():
            states["cuda"] = torch.cuda.get_rng_state()
        return states

    @staticmethod
    def _restore(states: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(states["cpu"])
        if "cuda" in states and _cuda_ready():
            torch.cuda.set_rng_state(states["cuda"])


_TRACKER = TensorParallelRNGTracker()


def get_rng_tracker() -> TensorParallelRNGTracker:
    return _TRACKER


def model_parallel_seed(seed: int) -> None:
    """Seed all streams. Call on every rank with the same ``seed``, after
    ``initialize_model_parallel`` (the TP stream depends on the TP rank)."""
    global _MODEL_PARALLEL_SEED
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _MODEL_PARALLEL_SEED = seed
    torch.manual_seed(seed)  # replicated stream: identical on all ranks
    _TRACKER.reset()
    _TRACKER.add(TP_RNG_STREAM, seed + _TP_SEED_OFFSET + get_tensor_parallel_rank())


def get_model_parallel_seed() -> int | None:
    """The seed given to ``model_parallel_seed``, or None if it was never called."""
    return _MODEL_PARALLEL_SEED


@contextlib.contextmanager
def tp_rng_fork() -> Iterator[None]:
    """Run random ops on TP-sharded tensors in the per-TP-rank stream.

    With TP size 1 there is no other rank to differ from, so an unseeded process may use the
    default stream; with TP > 1 ``model_parallel_seed`` must have been called.
    """
    if TP_RNG_STREAM not in _TRACKER.names() and get_tensor_parallel_world_size() == 1:
        yield
        return
    with _TRACKER.fork(TP_RNG_STREAM):
        yield


def init_seed_for(name: str, seed: int | None = None) -> int:
    """Seed of the generator that initializes parameter ``name``: a stable hash of
    (seed, name), independent of the process, the TP size and the order of initialization.

    ``seed`` defaults to the one given to ``model_parallel_seed``.
    """
    if seed is None:
        seed = _MODEL_PARALLEL_SEED
    if seed is None:
        raise RuntimeError("no initialization seed: call megaq.parallel.model_parallel_seed(seed) "
                           "or pass a seed")
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
