"""The training run's data: resolve `data` config to an indexed dataset, a tokenizer and the
train / validation GPT datasets, building what is missing (demo corpus, tokenized text files)
once rather than on every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megaq.data import GPTDataset, IndexedDataset, build_demo_corpus, build_tokenizer, preprocess
from megaq.training.config import ConfigError, MegaqConfig

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    tokenizer: object
    prefix: str
    train: GPTDataset
    valid: GPTDataset | None
    description: str


def build_in_order(build: Callable[[], str], rank: int, local_rank: int, barrier: Callable[[], None]) -> str:
    """Run `build` on global rank 0 first, then on each node's first rank, then everywhere.

    The builders reuse finished files, so on a shared file system only rank 0 does real work; on
    node-local storage each node builds once; the last round just opens the result everywhere.
    """
    result = None
    if rank == 0:
        result = build()
    barrier()
    if local_rank == 0 and rank != 0:
        result = build()
    barrier()
    if result is None:
        result = build()
    return result


def _text_files_key(files: list[str], tokenizer_spec: dict) -> dict:
    entries = []
    for f in files:
        p = Path(os.path.expanduser(f)).resolve()
        st = p.stat()
        entries.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"files": entries, "tokenizer": tokenizer_spec}


def build_text_files_dataset(files: list[str], cache_dir: Path, tokenizer_spec: dict) -> str:
    """Tokenize `files` into cache_dir once; reuse while the files and tokenizer are unchanged."""
    key = _text_files_key(files, tokenizer_spec)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    prefix = cache_dir / f"text_{digest}"
    manifest = Path(f"{prefix}.manifest.json")
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text(encoding="utf-8")) == key:
                IndexedDataset(prefix)  # still readable?
                return str(prefix)
        except (OSError, ValueError):
            pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("tokenizing %d text file(s) into %s", len(files), prefix)
    preprocess([os.path.expanduser(f) for f in files], prefix, tokenizer_spec, progress=False)
    tmp = manifest.with_name(f"{manifest.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(key, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, manifest)
    return str(prefix)


def _open_indexed(prefix: str, tokenizer, spec: dict, key: str) -> IndexedDataset:
    indexed = IndexedDataset(prefix)
    if indexed.vocab_size is not None and indexed.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"{key} {prefix} was tokenized with a vocabulary of {indexed.vocab_size} ids, "
                          f"but data.tokenizer ({spec['type']}) has {tokenizer.vocab_size}: give the tokenizer "
                          f"the dataset was made with")
    return indexed


def prepare_data(cfg: MegaqConfig, rank: int, local_rank: int, barrier: Callable[[], None]) -> RunData:
    data = cfg.data
    spec = data.tokenizer.spec()
    tokenizer = build_tokenizer(spec)
    cache_dir = Path(os.path.expanduser(data.cache_dir))
    if data.source == "path":
        prefix = os.path.expanduser(data.path)
        description = f"indexed dataset {prefix}"
    elif data.source == "text_files":
        prefix = build_in_order(lambda: build_text_files_dataset(data.text_files, cache_dir, spec),
                                rank, local_rank, barrier)
        description = f"{len(data.text_files)} text file(s), tokenized into {prefix}"
    else:
        prefix = build_in_order(lambda: build_demo_corpus(cache_dir / "demo", spec, max_bytes=data.demo_max_bytes),
                                rank, local_rank, barrier)
        description = (f"the demo corpus (Python standard library docstrings) at {prefix}; "
                       f"set data.path to train on your own data")
    indexed = _open_indexed(prefix, tokenizer, spec, "data.path")
    seq_len = cfg.model.seq_len
    seed = cfg.train.seed
    # A separate validation set leaves all of data.path to training.
    valid_fraction = 0.0 if data.valid_path is not None else data.valid_fraction
    try:
        train = GPTDataset(indexed, seq_len, split="train", valid_fraction=valid_fraction, seed=seed,
                           eod_id=tokenizer.eod_id)
    except ValueError as e:
        raise ConfigError(f"data: cannot make training samples of model.seq_len={seq_len}: {e}") from None
    valid = None
    if data.valid_path is not None:
        valid_prefix = os.path.expanduser(data.valid_path)
        try:
            # All of its documents, in stored order (the "train" split of a 0 fraction, unshuffled).
            valid = GPTDataset(_open_indexed(valid_prefix, tokenizer, spec, "data.valid_path"), seq_len,
                               split="train", valid_fraction=0.0, seed=seed, eod_id=tokenizer.eod_id,
                               shuffle_documents=False)
        except ValueError as e:
            raise ConfigError(f"data.valid_path={data.valid_path!r}: cannot make validation samples of "
                              f"model.seq_len={seq_len}: {e}") from None
        description += f", validated on {valid_prefix}"
    elif data.valid_fraction > 0:
        try:
            valid = GPTDataset(indexed, seq_len, split="valid", valid_fraction=data.valid_fraction, seed=seed,
                               eod_id=tokenizer.eod_id)
        except ValueError as e:
            if cfg.train.eval_interval:
                raise ConfigError(f"data.valid_fraction={data.valid_fraction}: the validation split is too "
                                  f"small for model.seq_len={seq_len} ({e}); raise data.valid_fraction") from None
            logger.warning("no validation samples (%s)", e)
    return RunData(tokenizer=tokenizer, prefix=str(prefix), train=train, valid=valid, description=description)
