"""Tokenizers: byte-level, character-level (JSON vocabulary) and SentencePiece.

Every tokenizer offers the same small surface, which is all the rest of megaq relies on:

    tok.encode(text) -> list[int]      tok.decode(ids) -> str
    tok.vocab_size                     tok.eod_id      (end-of-document id, inside the vocabulary)
    tok.spec                           (the dict that `build_tokenizer` rebuilds it from)

Decoding drops end-of-document ids: a document boundary has no text of its own, and generated
samples that cross one should read as running text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

TOKENIZER_TYPES = ("byte", "char", "sentencepiece")

CHAR_VOCAB_FORMAT = "megaq-char-vocab"
CHAR_VOCAB_VERSION = 1


def _check_ids(ids: Sequence[int], vocab_size: int, name: str) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if i < 0 or i >= vocab_size]
    if bad:
        raise ValueError(f"{name}.decode: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus one end-of-document id (256): 257 ids, no training needed."""

    def __init__(self) -> None:
        self.eod_id = 256
        self.vocab_size = 257

    @property
    def spec(self) -> dict:
        return {"type": "byte", "model": None}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        ids = _check_ids(ids, self.vocab_size, "ByteTokenizer")
        # A model may generate byte sequences that are not valid UTF-8; show them, don't crash.
        return bytes(i for i in ids if i != self.eod_id).decode("utf-8", errors="replace")


class CharTokenizer:
    """One id per character of a fixed vocabulary (sorted characters), EOD = len(chars).

    Characters outside the vocabulary raise ValueError (naming the character and its position)
    rather than mapping to an unknown id: the character-level benchmarks compare losses against
    published numbers, and a silent <unk> would change the task without anyone noticing.
    """

    def __init__(self, chars: Sequence[str], source: str | None = None) -> None:
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"char vocabulary {source or ''}: entry {c!r} is not a single character")
        if len(set(chars)) != len(chars):
            raise ValueError(f"char vocabulary {source or ''}: duplicate characters")
        if not chars:
            raise ValueError(f"char vocabulary {source or ''}: no characters")
        self.chars = chars
        self.source = source
        self.eod_id = len(chars)
        self.vocab_size = len(chars) + 1
        # Encode by table look-up on code points: a Python loop over a 1 MB corpus is ~10x slower.
        codepoints = np.array([ord(c) for c in chars], dtype=np.int64)
        self._lookup = np.full(int(codepoints.max()) + 1, -1, dtype=np.int64)
        self._lookup[codepoints] = np.arange(len(chars), dtype=np.int64)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        if not seen:
            raise ValueError("no text to build a char vocabulary from (all inputs are empty)")
        return cls(sorted(seen))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"char vocabulary file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"char vocabulary file {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict) or data.get("format") != CHAR_VOCAB_FORMAT:
            raise ValueError(f"{path} is not a megaq char vocabulary (expected \"format\": \"{CHAR_VOCAB_FORMAT}\")")
        if data.get("version") != CHAR_VOCAB_VERSION:
            raise ValueError(f"{path}: unsupported char vocabulary version {data.get('version')!r} "
                             f"(this megaq reads version {CHAR_VOCAB_VERSION})")
        chars = data.get("chars")
        if not isinstance(chars, list):
            raise ValueError(f"{path}: \"chars\" must be a list of single characters")
        return cls(chars, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": CHAR_VOCAB_FORMAT, "version": CHAR_VOCAB_VERSION, "chars": self.chars,
                "eod_id": self.eod_id}
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
        tmp.write_text(json.dumps(data, ensure_ascii=True, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        self.source = str(path)

    @property
    def spec(self) -> dict:
        return {"type": "char", "model": self.source}

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.full(cps.shape, -1, dtype=np.int64)
        in_table = cps < len(self._lookup)
        ids[in_table] = self._lookup[cps[in_table]]
        missing = np.flatnonzero(ids < 0)
        if missing.size:
            pos = int(missing[0])
            ch = text[pos]
            raise ValueError(f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the char "
                             f"vocabulary {self.source or '(in memory)'} ({len(self.chars)} characters)")
        return ids.tolist()

    def decode(self, ids: Sequence[int]) -> str:
        ids = _check_ids(ids, self.vocab_size, "CharTokenizer")
        return "".join(self.chars[i] for i in ids if i != self.eod_id)


class SentencePieceTokenizer:
    """A trained SentencePiece model. EOD is the model's </s> piece; a model trained without one
    gets an extra id appended after its pieces."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        self.model_path = str(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot load sentencepiece model {path}: {e}") from e
        self._num_pieces = self._sp.GetPieceSize()
        eos = self._sp.eos_id()
        if eos >= 0:
            self.eod_id = eos
            self.vocab_size = self._num_pieces
        else:
            self.eod_id = self._num_pieces
            self.vocab_size = self._num_pieces + 1

    @property
    def spec(self) -> dict:
        return {"type": "sentencepiece", "model": self.model_path}

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        ids = _check_ids(ids, self.vocab_size, "SentencePieceTokenizer")
        return self._sp.decode([i for i in ids if i != self.eod_id])


Tokenizer = ByteTokenizer | CharTokenizer | SentencePieceTokenizer


def build_tokenizer(spec: dict) -> Tokenizer:
    """Build a tokenizer from {"type": "byte"|"char"|"sentencepiece", "model": path or None}."""
    if not isinstance(spec, dict):
        raise TypeError(f"tokenizer spec must be a dict like {{'type': 'byte', 'model': None}}, got {spec!r}")
    unknown = set(spec) - {"type", "model"}
    if unknown:
        raise ValueError(f"tokenizer spec: unknown keys {sorted(unknown)} (allowed: 'type', 'model')")
    kind = spec.get("type")
    model = spec.get("model")
    if kind not in TOKENIZER_TYPES:
        raise ValueError(f"tokenizer spec: 'type' must be one of {list(TOKENIZER_TYPES)}, got {kind!r}")
    if kind == "byte":
        if model is not None:
            raise ValueError("tokenizer spec: the byte tokenizer takes no 'model' (set it to None)")
        return ByteTokenizer()
    if not model:
        raise ValueError(f"tokenizer spec: type {kind!r} needs 'model' (path to the "
                         f"{'char vocabulary .json' if kind == 'char' else 'sentencepiece .model'} file)")
    if kind == "char":
        return CharTokenizer.load(model)
    return SentencePieceTokenizer(model)
