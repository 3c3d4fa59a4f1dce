"""A memory-mapped dataset of tokenized documents: `prefix.bin` (token ids) + `prefix.idx` (index).

`prefix.bin` holds every document's tokens back to back, as uint16 when the vocabulary fits
(< 65536 ids) and int32 otherwise. End-of-document ids are NOT stored: consumers (GPTDataset)
insert them, so one .bin serves any joining policy.

`prefix.idx` layout, little-endian:
    offset  size  field
    0       8     magic b"MEGAQIDX"
    8       4     format version (uint32) = 1
    12      4     dtype code (uint32): 1 = uint16, 2 = int32
    16      8     document count N (uint64)
    24      8     total tokens (uint64)
    32      8     vocabulary size (int64), -1 if unknown
    40      8     end-of-document id (int64), -1 if unknown
    48      4*N   document lengths in tokens (int32)
    ...     0|4   zero padding so the next array starts at a multiple of 8
    ...     8*N   byte offset of each document in prefix.bin (int64)

Both files are written to temporary names and moved into place with os.replace, so a reader never
sees a half-written dataset, and concurrent writers of the same prefix (several ranks building
the same corpus) cannot corrupt each other.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

MAGIC = b"MEGAQIDX"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQqq")
HEADER_SIZE = _HEADER.size  # 48

_DTYPE_CODES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
_CODES_BY_DTYPE = {v: k for k, v in _DTYPE_CODES.items()}
_MAX_DOC_TOKENS = np.iinfo(np.int32).max


def best_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the file (and the page-cache footprint) whenever every id fits in it."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def _normalize_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"indexed dataset dtype must be uint16 or int32, got {dtype!r}") from e
    if dt not in _CODES_BY_DTYPE:
        raise ValueError(f"indexed dataset dtype must be uint16 or int32, got {dt}")
    return dt


def data_file(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def index_file(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def _lengths_end(num_docs: int) -> int:
    end = HEADER_SIZE + 4 * num_docs
    return end + (-end % 8)


class IndexedDatasetBuilder:
    """Append documents, then finalize() to publish prefix.bin / prefix.idx.

    Use as a context manager to discard the temporary files if an exception interrupts the build.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16, vocab_size: int | None = None,
                 eod_id: int | None = None) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = _normalize_dtype(dtype)
        info = np.iinfo(self.dtype)
        if vocab_size is not None and vocab_size - 1 > info.max:
            raise ValueError(f"vocab_size {vocab_size} does not fit dtype {self.dtype}; use int32")
        if eod_id is not None and vocab_size is not None and not 0 <= eod_id < vocab_size:
            raise ValueError(f"eod_id {eod_id} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.eod_id = eod_id
        # Token ids must lie below vocab_size when it is known, else within the dtype's range.
        self._max_id = (vocab_size - 1) if vocab_size is not None else int(info.max)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp.{os.getpid()}.{id(self):x}"
        self._tmp_bin = Path(f"{data_file(self.prefix)}{suffix}")
        self._tmp_idx = Path(f"{index_file(self.prefix)}{suffix}")
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list[int] = []
        self._total = 0
        self._finalized = False

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._finalized:
            self.finalize()

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    @property
    def total_tokens(self) -> int:
        return self._total

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        if self._finalized:
            raise RuntimeError(f"builder for {self.prefix} is already finalized")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size:
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > self._max_id:
                raise ValueError(f"document {len(self._lengths)}: token id {lo if lo < 0 else hi} outside "
                                 f"[0, {self._max_id}] (dtype {self.dtype}, vocab_size {self.vocab_size})")
        if arr.size > _MAX_DOC_TOKENS:
            raise ValueError(f"document {len(self._lengths)} has {arr.size} tokens; the limit is {_MAX_DOC_TOKENS}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(arr.size))
        self._total += int(arr.size)

    def finalize(self) -> str:
        """Write the index and move both files into place. Returns the prefix."""
        if self._finalized:
            raise RuntimeError(f"builder for {self.prefix} is already finalized")
        self._bin.close()
        n = len(self._lengths)
        lengths = np.asarray(self._lengths, dtype=np.int32)
        offsets = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=offsets[1:])
        header = _HEADER.pack(MAGIC, VERSION, _CODES_BY_DTYPE[self.dtype], n, self._total,
                              -1 if self.vocab_size is None else self.vocab_size,
                              -1 if self.eod_id is None else self.eod_id)
        with open(self._tmp_idx, "wb") as f:
            f.write(header)
            f.write(lengths.tobytes())
            f.write(b"\0" * (_lengths_end(n) - HEADER_SIZE - 4 * n))
            f.write(offsets.tobytes())
        # .bin first: a reader that finds the new .idx must also find the matching .bin.
        os.replace(self._tmp_bin, data_file(self.prefix))
        os.replace(self._tmp_idx, index_file(self.prefix))
        self._finalized = True
        return self.prefix

    def abort(self) -> None:
        """Discard the temporary files; the prefix's existing files (if any) are left untouched."""
        if not self._bin.closed:
            self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        self._finalized = True


class IndexedDataset:
    """Read-only, memory-mapped view of prefix.bin / prefix.idx. Item i = document i's tokens."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        self._open()

    def _open(self) -> None:
        idx_path, bin_path = index_file(self.prefix), data_file(self.prefix)
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise FileNotFoundError(f"indexed dataset file not found: {p}")
        idx_size = idx_path.stat().st_size
        if idx_size < HEADER_SIZE:
            raise ValueError(f"corrupt index {idx_path}: {idx_size} bytes, shorter than the {HEADER_SIZE}-byte header")
        with open(idx_path, "rb") as f:
            magic, version, code, n, total, vocab_size, eod_id = _HEADER.unpack(f.read(HEADER_SIZE))
        if magic != MAGIC:
            raise ValueError(f"{idx_path} is not a megaq index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise ValueError(f"{idx_path}: unsupported index format version {version} (this megaq reads {VERSION})")
        if code not in _DTYPE_CODES:
            raise ValueError(f"corrupt index {idx_path}: unknown dtype code {code}")
        self.dtype = _DTYPE_CODES[code]
        expected_idx = _lengths_end(n) + 8 * n
        if idx_size != expected_idx:
            raise ValueError(f"corrupt index {idx_path}: {idx_size} bytes, expected {expected_idx} for {n} documents")
        bin_size = bin_path.stat().st_size
        if bin_size != total * self.dtype.itemsize:
            raise ValueError(f"{bin_path} has {bin_size} bytes but {idx_path} describes {total} tokens "
                             f"({total * self.dtype.itemsize} bytes of {self.dtype}): truncated or mismatched files")

        if n:
            self._lengths = np.memmap(idx_path, dtype=np.int32, mode="r", offset=HEADER_SIZE, shape=(n,))
            self._offsets = np.memmap(idx_path, dtype=np.int64, mode="r", offset=_lengths_end(n), shape=(n,))
        else:
            self._lengths = np.zeros(0, dtype=np.int32)
            self._offsets = np.zeros(0, dtype=np.int64)
        # Consistency of the index with itself: catches bit flips and hand-edited files, which
        # would otherwise surface as silently wrong training data.
        lengths64 = np.asarray(self._lengths, dtype=np.int64)
        if n and (lengths64.min() < 0 or int(lengths64.sum()) != total):
            raise ValueError(f"corrupt index {idx_path}: document lengths do not add up to {total} tokens")
        expected_offsets = np.concatenate([[0], np.cumsum(lengths64[:-1])]) * self.dtype.itemsize if n else lengths64
        if not np.array_equal(np.asarray(self._offsets), expected_offsets):
            raise ValueError(f"corrupt index {idx_path}: document offsets are inconsistent with their lengths")

        self._num_docs = int(n)
        self._total = int(total)
        self.vocab_size = None if vocab_size < 0 else int(vocab_size)
        self.eod_id = None if eod_id < 0 else int(eod_id)
        # np.memmap cannot map an empty file.
        self._tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(total,)) if total
                        else np.zeros(0, dtype=self.dtype))

    # The memmaps must not be pickled (they would be copied in full into each DataLoader worker);
    # a worker re-opens the files instead.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return self._num_docs

    def __getitem__(self, i: int) -> np.ndarray:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"IndexedDataset index must be an integer, got {type(i).__name__}")
        n = self._num_docs
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {self.prefix} ({n} documents)")
        i = int(i) % n
        start = int(self._offsets[i]) // self.dtype.itemsize
        return self._tokens[start:start + int(self._lengths[i])]

    @property
    def total_tokens(self) -> int:
        return self._total

    @property
    def doc_lengths(self) -> np.ndarray:
        """Tokens per document (int32, memory-mapped)."""
        return self._lengths

    @property
    def doc_starts(self) -> np.ndarray:
        """Index of each document's first token in `tokens` (int64)."""
        return np.asarray(self._offsets) // self.dtype.itemsize

    @property
    def tokens(self) -> np.ndarray:
        """All documents' tokens back to back (memory-mapped, read-only)."""
        return self._tokens
