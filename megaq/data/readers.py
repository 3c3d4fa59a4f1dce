"""Read raw documents (strings) from plain text, JSONL, and Hugging Face `datasets` sources.

Formats:
- "text": one document per block of lines separated by blank lines (`split_lines=True`: one per
  non-empty line; `whole_file=True`: the whole file is one document, as character-level
  benchmarks such as tiny-shakespeare expect). Streamed line by line.
- "jsonl": one JSON object per line, the document is `obj[json_key]`. Streamed.
- "hf_disk": a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
- "parquet", "json": local files loaded with `datasets.load_dataset(<format>, data_files=...)`.
`detect_format` picks one from the path ("auto").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

INPUT_FORMATS = ("auto", "text", "jsonl", "hf_disk", "parquet", "json")

_EXTENSION_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".json": "json"}


def detect_format(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_dir():
        return "hf_disk"
    return _EXTENSION_FORMATS.get(path.suffix.lower(), "text")


def _read_text(path: Path, split_lines: bool, whole_file: bool) -> Iterator[str]:
    if whole_file:
        text = path.read_text(encoding="utf-8")
        if text.strip():
            yield text
        return
    with open(path, "r", encoding="utf-8") as f:
        if split_lines:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line
            return
        block: list[str] = []
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block)
                block = []
        if block:
            yield "\n".join(block)


def _document_text(value, where: str, json_key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {json_key!r} must be a string, got {type(value).__name__}")
    return value


def _read_jsonl(path: Path, json_key: str) -> Iterator[str]:
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
            if not isinstance(obj, dict) or json_key not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{path}:{lineno}: no key {json_key!r} (found {keys}); pass --json-key")
            yield _document_text(obj[json_key], f"{path}:{lineno}", json_key)


def _pick_split(ds, path: Path, split: str | None):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise ValueError(f"{path} holds splits {sorted(ds)}; choose one with --split")
            split = next(iter(ds))
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r} (available: {sorted(ds)})")
        return ds[split]
    return ds


def _read_hf(path: Path, fmt: str, json_key: str, split: str | None) -> Iterator[str]:
    import datasets

    if fmt == "hf_disk":
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(fmt, data_files=str(path))
    ds = _pick_split(ds, path, split)
    if json_key not in ds.column_names:
        raise ValueError(f"{path}: no column {json_key!r} (columns: {ds.column_names}); pass --json-key")
    # Iterate one column in batches: row-wise access on an Arrow table is much slower.
    column = ds.select_columns([json_key])
    row = 0
    for batch in column.iter(batch_size=1000):
        for value in batch[json_key]:
            yield _document_text(value, f"{path} row {row}", json_key)
            row += 1


def read_documents(inputs: str | os.PathLike | Sequence[str | os.PathLike], input_format: str = "auto",
                   json_key: str = "text", split_lines: bool = False, whole_file: bool = False,
                   split: str | None = None) -> Iterator[str]:
    """Yield the documents of every input in order (files in the order given)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input format must be one of {list(INPUT_FORMATS)}, got {input_format!r}")
    if split_lines and whole_file:
        raise ValueError("split_lines and whole_file are mutually exclusive")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input files given")
    for p in paths:  # fail before any work if one input is missing
        if not p.exists():
            raise FileNotFoundError(f"input not found: {p}")
    for path in paths:
        fmt = detect_format(path) if input_format == "auto" else input_format
        if fmt == "text":
            yield from _read_text(path, split_lines, whole_file)
        elif fmt == "jsonl":
            yield from _read_jsonl(path, json_key)
        else:
            yield from _read_hf(path, fmt, json_key, split)
