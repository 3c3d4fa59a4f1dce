"""Batches for the training loop: a DataLoader driven by a ResumableSampler."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from .sampler import ResumableSampler


def collate_samples(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of {"input_ids": [T], "labels": [T]} dicts into {"input_ids": [B, T], ...}."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    keys = samples[0].keys()
    for i, s in enumerate(samples):
        if s.keys() != keys:
            raise ValueError(f"sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    batch = {}
    for k in keys:
        shapes = {tuple(s[k].shape) for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack {k!r}: samples have different shapes {sorted(shapes)}")
        batch[k] = torch.stack([s[k] for s in samples])
    return batch


class DataIterator:
    """Endless iterator over collated micro batches that knows how many samples it has delivered.

    With DataLoader workers the sampler runs ahead of the training loop (prefetching), so the
    sampler's own counter overstates progress; `consumed_samples` here counts only the batches
    handed out, and is what a checkpoint must store.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, num_workers: int = 0,
                 pin_memory: bool = False) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.sampler = sampler
        self._start = sampler.consumed_samples
        self._delivered = 0
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples,
                            num_workers=num_workers, pin_memory=pin_memory,
                            worker_init_fn=_ignore_stop_signals if num_workers else None)
        self._batches = iter(loader)

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._batches)
        self._delivered += 1
        return batch

    @property
    def consumed_samples(self) -> int:
        """Global samples (all data-parallel ranks) consumed by the batches delivered so far."""
        return self._start + self._delivered * self.sampler.global_batch_size

    def state_dict(self) -> dict:
        return {**self.sampler.state_dict(), "consumed_samples": self.consumed_samples}


def build_data_iterator(dataset: Dataset, sampler: ResumableSampler, num_workers: int = 0,
                        pin_memory: bool = False) -> DataIterator:
    return DataIterator(dataset, sampler, num_workers=num_workers, pin_memory=pin_memory)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGUSR1 / SIGINT to the training process.

    Schedulers signal every process of a job (SLURM's scancel and --signal, a launcher's process-group
    kill). A worker that died of it would make the loader raise before the training process finishes
    its step and saves; instead the workers ignore the signal, keep feeding the step, and exit when
    the loader shuts down or the training process is gone (PyTorch's worker watchdog)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
