"""Data: tokenizer, each organisation's corpora and the batches drawn from them."""

from .corpus import ByteTokenizer, DataError, TextCorpus, batches_for

__all__ = ["ByteTokenizer", "DataError", "TextCorpus", "batches_for"]
