"""Tokenizers: UTF-8 bytes (the default, nothing to train) or a byte-level BPE trained locally
with the ``tokenizers`` library. Both round-trip any text and save to one JSON file, so a run
keeps the tokenizer it trained with beside its checkpoints (``tokenizer.json``).

This module knows nothing of plans: the plan loader imports it to check the model's vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

TOKENIZER_FILE = "tokenizer.json"

# What a byte-level tokenizer's file says: there is nothing else to save.
_BYTE_SPEC = {"fedsplit_tokenizer": "bytes"}


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read; the message names the file."""


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, path: str | Path) -> Path: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255: nothing to train or download, and any text round-trips."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> Path:
        Path(path).write_text(json.dumps(_BYTE_SPEC) + "\n", encoding="utf-8")
        return Path(path)


class BPETokenizer:
    """A byte-level BPE (GPT-2 style: bytes first, merges learnt on top), so no text is out of
    vocabulary and decoding inverts encoding exactly."""

    def __init__(self, tokenizer: HFTokenizer):
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def save(self, path: str | Path) -> Path:
        self._tokenizer.save(str(path))
        return Path(path)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
    """Learn a byte-level BPE of at most ``vocab_size`` tokens (fewer when the text has fewer
    merges that occur ``min_frequency`` times) from ``texts``, locally."""
    if vocab_size < 256:
        raise ValueError(f"a byte-level BPE needs vocab_size >= 256 (one token per byte), got {vocab_size}")
    from tokenizers import Tokenizer as HFTokenizer  # on use: byte-level runs (every worker by default) never load it
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(texts, trainer)
    return BPETokenizer(tokenizer)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved at ``path`` by :meth:`ByteTokenizer.save` or :meth:`BPETokenizer.save`."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(
            f"cannot read the tokenizer file {path}: {e}; write one with `fedsplit tokenizer train`"
        ) from None
    if spec == _BYTE_SPEC:
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_str(json.dumps(spec)))
    except Exception as e:  # tokenizers raises plain Exceptions for malformed files
        raise TokenizerError(
            f"{path} is not a tokenizer file ({e}); write one with `fedsplit tokenizer train`"
        ) from None
