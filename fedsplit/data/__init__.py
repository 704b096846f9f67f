"""Data: tokenizers, organisations' text and the windows drawn from it, non-IID splits of corpora.

Nothing here knows a plan: :mod:`fedsplit.runtime.batches` reads a plan's data owners' files.
"""

from .corpus import HELDOUT_FRACTION, Batch, TextCorpus, read_corpus
from .sources import DataError, read_documents
from .tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, Tokenizer, TokenizerError, load_tokenizer, train_bpe

__all__ = [
    "BPETokenizer",
    "Batch",
    "ByteTokenizer",
    "DataError",
    "HELDOUT_FRACTION",
    "TOKENIZER_FILE",
    "TextCorpus",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "read_corpus",
    "read_documents",
    "train_bpe",
]
