#!/usr/bin/env python
"""Train a tokenizer: a SentencePiece BPE / unigram model, or a character vocabulary.

    python tools/train_tokenizer.py --input corpus.txt --output-prefix tok/spm --vocab-size 8000
    python tools/train_tokenizer.py --input docs.jsonl --json-key text --model-type unigram ...
    python tools/train_tokenizer.py --type char --input shakespeare.txt --output tok/chars.json

SentencePiece writes PREFIX.model and PREFIX.vocab; use {"type": "sentencepiece", "model":
"PREFIX.model"} as the tokenizer spec. A char vocabulary is used as {"type": "char", "model": PATH}.
The logic lives in megaq.data.tokenizer_training.
"""

import argparse
import logging
import os
import sys

try:
    import megaq  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megaq.data.readers import INPUT_FORMATS, read_documents  # noqa: E402
from megaq.data.tokenizer_training import (SENTENCEPIECE_MODEL_TYPES, train_char_vocab,  # noqa: E402
                                           train_sentencepiece)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", choices=["sentencepiece", "char"], default="sentencepiece")
    p.add_argument("--input", nargs="+", required=True,
                   help="text / JSONL / parquet / JSON files or save_to_disk directories")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="auto")
    p.add_argument("--json-key", default="text", help="field (column) holding the document text")
    p.add_argument("--split", default=None, help="split of a DatasetDict directory")
    p.add_argument("--output-prefix", help="sentencepiece: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--output", help="char: the vocabulary JSON file to write")
    p.add_argument("--model-type", choices=SENTENCEPIECE_MODEL_TYPES, default="bpe")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--character-coverage", type=float, default=1.0,
                   help="fraction of characters the model covers; use ~0.9995 for large alphabets (CJK)")
    p.add_argument("--byte-fallback", action="store_true",
                   help="encode uncovered characters as byte pieces (costs 256 vocabulary entries)")
    p.add_argument("--max-sentences", type=int, default=0,
                   help="train on a random sample of this many lines (0 = all)")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's own training log")
    args = p.parse_args(argv)
    if args.type == "sentencepiece" and not args.output_prefix:
        p.error("--output-prefix is required with --type sentencepiece")
    if args.type == "char" and not args.output:
        p.error("--output is required with --type char")
    return args


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    docs = read_documents(args.input, input_format=args.input_format, json_key=args.json_key, split=args.split)
    if args.type == "char":
        tok = train_char_vocab(docs, args.output)
        print(f"wrote {args.output}: {len(tok.chars)} characters + EOD = vocab {tok.vocab_size}")
    else:
        tok = train_sentencepiece(docs, args.output_prefix, args.vocab_size, model_type=args.model_type,
                                  character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
                                  max_sentences=args.max_sentences, num_threads=args.num_threads,
                                  verbose=args.verbose)
        print(f"wrote {args.output_prefix}.model and .vocab: vocab {tok.vocab_size}, EOD id {tok.eod_id}")


if __name__ == "__main__":
    main()
