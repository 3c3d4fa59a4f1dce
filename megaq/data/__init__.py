"""Layer 6 — data: tokenizers, document readers, the memory-mapped indexed token dataset,
GPT samples, deterministic resumable sampling, and a download-free demo corpus.

Imports torch, numpy, sentencepiece and datasets only; nothing from megaq.training or megaq.models.
"""

from .demo_corpus import build_demo_corpus
from .gpt_dataset import GPTDataset
from .indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_dtype
from .loader import DataIterator, build_data_iterator, collate_samples
from .preprocess import preprocess
from .readers import read_documents
from .sampler import ResumableSampler
from .tokenizer_training import train_char_vocab, train_sentencepiece
from .tokenizers import ByteTokenizer, CharTokenizer, SentencePieceTokenizer, build_tokenizer

__all__ = [
    "build_tokenizer", "ByteTokenizer", "CharTokenizer", "SentencePieceTokenizer",
    "train_sentencepiece", "train_char_vocab",
    "read_documents", "preprocess",
    "IndexedDataset", "IndexedDatasetBuilder", "best_dtype",
    "GPTDataset", "ResumableSampler",
    "DataIterator", "build_data_iterator", "collate_samples",
    "build_demo_corpus",
]
