"""Data: tokenizers, each organisation's corpora and the batches drawn from them, non-IID splits."""

from .corpus import (
    HELDOUT_FRACTION,
    TextCorpus,
    batches_for,
    eval_batches_for,
    heldout_corpus,
    read_corpus,
    tokenizer_for,
    training_corpus,
)
from .sources import DataError, read_documents
from .tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, Tokenizer, TokenizerError, load_tokenizer, train_bpe

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DataError",
    "HELDOUT_FRACTION",
    "TOKENIZER_FILE",
    "TextCorpus",
    "Tokenizer",
    "TokenizerError",
    "batches_for",
    "eval_batches_for",
    "heldout_corpus",
    "load_tokenizer",
    "read_corpus",
    "read_documents",
    "tokenizer_for",
    "train_bpe",
    "training_corpus",
]
