"""Train tokenizers from documents: SentencePiece (BPE / unigram) models and char vocabularies."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

from .tokenizers import CharTokenizer, SentencePieceTokenizer

logger = logging.getLogger(__name__)

SENTENCEPIECE_MODEL_TYPES = ("bpe", "unigram")

# SentencePiece drops training sentences longer than this many bytes; lines of prose are far
# shorter, and minified or tabular lines are not worth learning pieces from.
_MAX_SENTENCE_BYTES = 16384


def _lines(documents: Iterable[str]) -> Iterator[str]:
    # SentencePiece learns from sentences and never sees a newline inside one; newlines are
    # re-introduced as a user-defined piece so that encode/decode stays lossless.
    for doc in documents:
        for line in doc.split("\n"):
            if line:
                yield line


def train_sentencepiece(documents: Iterable[str], model_prefix: str | os.PathLike, vocab_size: int,
                        model_type: str = "bpe", character_coverage: float = 1.0,
                        byte_fallback: bool = False, max_sentences: int = 0,
                        num_threads: int | None = None, seed_sentencepiece_size: int = 1_000_000,
                        verbose: bool = False) -> SentencePieceTokenizer:
    """Train `model_prefix.model` / `model_prefix.vocab` and return the loaded tokenizer.

    The model is lossless on text made of characters it covers: identity normalization (no NFKC,
    whitespace kept as is), no dummy space prefix (as GPT-2 BPE), and "\\n" as a piece of its own.
    `byte_fallback=True` makes every string encodable (uncovered characters become byte pieces),
    at the cost of 256 vocabulary entries. `max_sentences > 0` trains on a random sample of that
    many lines (SentencePiece's input_sentence_size), which large corpora need to fit in memory.
    """
    import sentencepiece as spm

    if model_type not in SENTENCEPIECE_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {list(SENTENCEPIECE_MODEL_TYPES)}, got {model_type!r}")
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be at least 8, got {vocab_size}")
    if byte_fallback and vocab_size <= 256 + 4:
        raise ValueError(f"byte_fallback needs vocab_size > 260 (256 byte pieces + specials), got {vocab_size}")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
    if max_sentences < 0:
        raise ValueError(f"max_sentences must be >= 0, got {max_sentences}")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    sentences = _lines(documents)
    try:
        first = next(sentences)
    except StopIteration:
        raise ValueError("no text to train the tokenizer on (all inputs are empty)") from None

    def all_sentences() -> Iterator[str]:
        yield first
        yield from sentences

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            user_defined_symbols=["\n"],
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=num_threads or min(16, os.cpu_count() or 1),
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as e:
        # SentencePiece reports e.g. "Vocabulary size is too high" as a bare RuntimeError.
        raise ValueError(f"sentencepiece training of {prefix}.model failed: {e}") from e
    tok = SentencePieceTokenizer(f"{prefix}.model")
    logger.info("trained sentencepiece %s model %s.model (vocab %d)", model_type, prefix, tok.vocab_size)
    return tok


def train_char_vocab(documents: Iterable[str], out_path: str | os.PathLike) -> CharTokenizer:
    """Write the sorted set of characters of the documents as a char vocabulary JSON file."""
    tok = CharTokenizer.from_texts(documents)
    tok.save(out_path)
    logger.info("wrote char vocabulary %s (%d characters + EOD)", out_path, len(tok.chars))
    return tok
