"""Fixed-length language-model samples cut from an indexed dataset.

The documents of a split are joined into one conceptual token stream, each followed by the
end-of-document id. The stream is never materialized: a small table of pieces (where each
document's tokens start in the memory-mapped .bin, how long it is, whether an EOD follows) maps a
stream position to a token, so a corpus of any size costs O(documents) memory.

Sample i is the stream window [i*T, i*T + T + 1): input_ids = window[:-1], labels = window[1:].
Consecutive windows share their boundary token, so every token of the split except the first is a
label exactly once, and no two samples predict the same position (Megatron's convention).

Train / valid split: the last `valid_fraction` of the documents (at least one, when the fraction
is positive) are validation. A corpus of a single document (a book, tiny-shakespeare) is split by
tokens instead: the first (1 - valid_fraction) of its tokens train, the rest validate.
The training documents are shuffled (seeded by `seed`) before joining, so that corpora stored in
a meaningful order (by source, by date) do not put related documents side by side in one sample;
validation keeps the stored order.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .indexed_dataset import IndexedDataset

SPLITS = ("train", "valid")


class GPTDataset(Dataset):
    def __init__(self, indexed: IndexedDataset | str | os.PathLike, seq_len: int, split: str = "train",
                 valid_fraction: float = 0.05, seed: int = 1234, eod_id: int | None = None,
                 shuffle_documents: bool = True) -> None:
        if not isinstance(indexed, IndexedDataset):
            indexed = IndexedDataset(indexed)
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not 0.0 <= valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
        if eod_id is None:
            eod_id = indexed.eod_id
            if eod_id is None:
                raise ValueError(f"{indexed.prefix}.idx records no end-of-document id; pass eod_id")
        elif indexed.eod_id is not None and eod_id != indexed.eod_id:
            raise ValueError(f"eod_id {eod_id} differs from the id {indexed.eod_id} recorded in "
                             f"{indexed.prefix}.idx by the tokenizer that wrote it")
        if len(indexed) == 0:
            raise ValueError(f"indexed dataset {indexed.prefix} has no documents")

        self.indexed = indexed
        self.seq_len = int(seq_len)
        self.split = split
        self.eod_id = int(eod_id)
        self._tokens = indexed.tokens

        starts, lengths, eod_after = self._split_pieces(indexed, split, valid_fraction, seed, shuffle_documents)
        self.num_documents = len(starts)
        self._piece_starts = starts                       # index of each piece's first token in .bin
        self._piece_lengths = lengths                     # tokens of the piece (without EOD)
        stream_lengths = lengths + eod_after
        self._piece_stream_ends = np.cumsum(stream_lengths)
        self._piece_stream_starts = self._piece_stream_ends - stream_lengths
        self.num_tokens = int(self._piece_stream_ends[-1]) if len(stream_lengths) else 0
        if self.num_tokens < self.seq_len + 1:
            raise ValueError(f"the {split!r} split of {indexed.prefix} has {self.num_tokens} tokens "
                             f"(EOD included); a sample of seq_len={self.seq_len} needs {self.seq_len + 1}")
        self._num_samples = (self.num_tokens - 1) // self.seq_len

    @staticmethod
    def _split_pieces(indexed: IndexedDataset, split: str, valid_fraction: float, seed: int,
                      shuffle: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(indexed)
        starts = indexed.doc_starts.astype(np.int64)
        lengths = np.asarray(indexed.doc_lengths, dtype=np.int64)
        if n == 1:
            # One document: split its tokens (as nanoGPT does: train = first int((1-f)*L) tokens).
            total = int(lengths[0])
            boundary = int((1.0 - valid_fraction) * total)
            if split == "train":
                # The train part ends mid-document, so no EOD follows it unless it is the whole document.
                return starts[:1], np.array([boundary]), np.array([int(boundary == total)])
            return starts[:1] + boundary, np.array([total - boundary]), np.array([1])
        n_valid = 0 if valid_fraction == 0 else min(n - 1, max(1, int(round(valid_fraction * n))))
        if split == "train":
            docs = np.arange(n - n_valid)
            if shuffle:
                docs = np.random.default_rng(seed).permutation(docs)
        else:
            docs = np.arange(n - n_valid, n)
        return starts[docs], lengths[docs], np.ones(len(docs), dtype=np.int64)

    # DataLoader workers started with spawn receive a pickled dataset: re-map the tokens there
    # instead of copying the whole memory map through the pickle.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_tokens"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tokens = self.indexed.tokens

    def __len__(self) -> int:
        return self._num_samples

    def window(self, i: int) -> np.ndarray:
        """The seq_len + 1 stream tokens of sample i, as int64."""
        n = self._num_samples
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for the {self.split!r} split ({n} samples)")
        i = int(i) % n
        positions = np.arange(i * self.seq_len, i * self.seq_len + self.seq_len + 1, dtype=np.int64)
        piece = np.searchsorted(self._piece_stream_ends, positions, side="right")
        within = positions - self._piece_stream_starts[piece]
        is_token = within < self._piece_lengths[piece]
        out = np.full(positions.shape, self.eod_id, dtype=np.int64)
        out[is_token] = self._tokens[self._piece_starts[piece[is_token]] + within[is_token]]
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = torch.from_numpy(self.window(i))
        return {"input_ids": w[:-1], "labels": w[1:]}
