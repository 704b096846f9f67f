"""Data: tokenizers, organisations' text and the windows drawn from it, non-IID splits of corpora.

Nothing here knows a plan: :mod:`fedsplit.runtime.batches` reads a plan's data owners' files.
"""

from .corpus import HELDOUT_FRACTION, Batch, TextCorpus, read_corpus
from .labelled import PAD_ID, LabelledExamples, classification_batch, read_labelled
from .sources import DataError, read_documents
from .tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, Tokenizer, TokenizerError, load_tokenizer, train_bpe

__all__ = [
    "BPETokenizer",
    "Batch",
    "ByteTokenizer",
    "DataError",
    "HELDOUT_FRACTION",
    "LabelledExamples",
    "PAD_ID",
    "TOKENIZER_FILE",
    "TextCorpus",
    "Tokenizer",
    "TokenizerError",
    "classification_batch",
    "load_tokenizer",
    "read_corpus",
    "read_documents",
    "read_labelled",
    "train_bpe",
]
