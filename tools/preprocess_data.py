#!/usr/bin/env python
"""Tokenize documents into a megaq indexed dataset (PREFIX.bin + PREFIX.idx).

    python tools/preprocess_data.py --input corpus.txt --output-prefix data/corpus \
        --tokenizer-type sentencepiece --tokenizer-model tok/spm.model --workers 8
    python tools/preprocess_data.py --input docs.jsonl --json-key text ...        # JSON lines
    python tools/preprocess_data.py --input my_saved_dataset/ --split train ...   # save_to_disk dir
    python tools/preprocess_data.py --input shard.parquet ...                      # parquet / .json

Plain text holds one document per blank-line-separated block (--split-lines: one per line,
--whole-file: the whole file). Documents are stored without an end-of-document token; GPTDataset
adds it. The logic lives in megaq.data.preprocess.
"""

import argparse
import logging
import os
import sys

try:
    import megaq  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megaq.data.preprocess import preprocess  # noqa: E402
from megaq.data.readers import INPUT_FORMATS  # noqa: E402
from megaq.data.tokenizers import TOKENIZER_TYPES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="auto")
    p.add_argument("--json-key", default="text", help="field (column) holding the document text")
    p.add_argument("--split", default=None, help="split of a DatasetDict directory")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--split-lines", action="store_true", help="plain text: one document per line")
    group.add_argument("--whole-file", action="store_true", help="plain text: one document per file")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default="byte")
    p.add_argument("--tokenizer-model", default=None, help="sentencepiece .model or char vocabulary .json")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--chunk-size", type=int, default=64, help="documents per task sent to a worker")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    stats = preprocess(args.input, args.output_prefix, {"type": args.tokenizer_type, "model": args.tokenizer_model},
                       input_format=args.input_format, json_key=args.json_key, split_lines=args.split_lines,
                       whole_file=args.whole_file, split=args.split, workers=args.workers,
                       chunk_size=args.chunk_size, progress=not args.no_progress)
    print(f"{stats['prefix']}.bin/.idx: {stats['documents']:,} documents, {stats['tokens']:,} tokens "
          f"({stats['skipped_empty']} empty skipped) in {stats['seconds']:.1f} s")


if __name__ == "__main__":
    main()
