"""Tokenize document sources into an indexed dataset (prefix.bin / prefix.idx) with a worker pool.

Documents are stored as the tokenizer produces them, without an end-of-document id: GPTDataset
adds it when it joins documents. The tokenizer's vocabulary size and EOD id go into the index
header so that readers need not be told which tokenizer wrote the files.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import time
from typing import Iterable, Iterator, Sequence

import numpy as np

from .indexed_dataset import IndexedDatasetBuilder, best_dtype
from .readers import read_documents
from .tokenizers import build_tokenizer

logger = logging.getLogger(__name__)

# Set in each worker process by _init_worker (a tokenizer is built once per process, not per task).
_worker_tokenizer = None
_worker_dtype = None


def _init_worker(spec: dict, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer = build_tokenizer(spec)
    _worker_dtype = np.dtype(dtype)


def _encode(item: tuple[int, str]) -> np.ndarray:
    index, text = item
    try:
        ids = _worker_tokenizer.encode(text)
    except ValueError as e:
        raise ValueError(f"document {index}: {e}") from None
    # A compact array pickles back to the parent far faster than a list of Python ints.
    return np.asarray(ids, dtype=_worker_dtype)


def _batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _mp_context():
    # fork starts workers in milliseconds and needs no re-import; spawn where fork is unavailable.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def tokenize_documents(documents: Iterable[str], tokenizer_spec: dict, workers: int = 1,
                       chunk_size: int = 64) -> Iterator[np.ndarray]:
    """Yield each document's token ids (in input order), tokenizing on `workers` processes."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = best_dtype(build_tokenizer(tokenizer_spec).vocab_size).str
    numbered = enumerate(documents)
    if workers == 1:
        _init_worker(tokenizer_spec, dtype)
        for item in numbered:
            yield _encode(item)
        return
    with _mp_context().Pool(workers, initializer=_init_worker, initargs=(tokenizer_spec, dtype)) as pool:
        # Pool.imap reads its whole input ahead of the workers; feeding it bounded batches keeps
        # memory flat on corpora larger than RAM while preserving document order.
        for batch in _batched(numbered, workers * chunk_size * 8):
            yield from pool.imap(_encode, batch, chunksize=chunk_size)


def preprocess(inputs: str | os.PathLike | Sequence[str | os.PathLike], output_prefix: str | os.PathLike,
               tokenizer_spec: dict, input_format: str = "auto", json_key: str = "text",
               split_lines: bool = False, whole_file: bool = False, split: str | None = None,
               workers: int = 1, chunk_size: int = 64, progress: bool = True) -> dict:
    """Read, tokenize and write `output_prefix.bin/.idx`. Empty documents are skipped.

    Returns statistics: documents, tokens, skipped_empty, seconds, prefix.
    """
    tokenizer = build_tokenizer(tokenizer_spec)
    documents = read_documents(inputs, input_format=input_format, json_key=json_key,
                               split_lines=split_lines, whole_file=whole_file, split=split)
    skipped = 0

    def non_empty(docs: Iterable[str]) -> Iterator[str]:
        nonlocal skipped
        for d in docs:
            if d:
                yield d
            else:
                skipped += 1

    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(unit="docs", unit_scale=True, desc=f"tokenizing -> {output_prefix}", mininterval=0.5)
    builder = IndexedDatasetBuilder(output_prefix, best_dtype(tokenizer.vocab_size),
                                    vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod_id)
    try:
        with builder:
            for ids in tokenize_documents(non_empty(documents), tokenizer_spec, workers, chunk_size):
                builder.add_document(ids)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(tokens=f"{builder.total_tokens:,}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    if builder.num_documents == 0:
        logger.warning("preprocess: %s holds no documents (inputs were empty)", output_prefix)
    stats = {"prefix": os.fspath(output_prefix), "documents": builder.num_documents,
             "tokens": builder.total_tokens, "skipped_empty": skipped, "seconds": seconds}
    logger.info("wrote %s.bin/.idx: %d documents, %d tokens in %.1f s", output_prefix,
                stats["documents"], stats["tokens"], seconds)
    return stats
