"""Each data owner's training text, tokenized and cut into batches that depend only on the seed,
the data owner and the step, so that a resumed run and the monolithic baseline see exactly the
batches an uninterrupted federated run saw."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..plan import Plan

Batch = tuple[Tensor, Tensor]


class DataError(ValueError):
    """An organisation's data cannot be used; the message names the organisation and the path."""


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255: nothing to train or download, and any text round-trips."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class TextCorpus:
    """The concatenated text files of one organisation as one long sequence of token ids."""

    def __init__(self, org: str, paths: Sequence[Path], tokenizer: ByteTokenizer = ByteTokenizer()):
        parts = []
        for path in paths:
            try:
                parts.append(torch.tensor(tokenizer.encode(Path(path).read_text(encoding="utf-8")), dtype=torch.int64))
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"organisation '{org}': cannot read training data {path}: {e}") from None
        self.org = org
        self.ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def batch(self, generator: torch.Generator, batch_size: int, seq_len: int) -> Batch:
        """``batch_size`` windows at random offsets: tokens and the next tokens as labels."""
        if len(self.ids) < seq_len + 2:
            raise DataError(f"organisation '{self.org}': {len(self.ids)} tokens of training data, fewer than one "
                            f"sequence of {seq_len + 1}; give it more text or lower training.seq_len")
        starts = torch.randint(0, len(self.ids) - seq_len - 1, (batch_size,), generator=generator)
        windows = torch.stack([self.ids[s : s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def batches_for(plan: Plan, org: str) -> Callable[[int], Batch]:
    """``step -> (tokens, labels)``: windows of one data owner's text files."""
    t = plan.training
    index = plan.data_owners.index(org)
    corpus = TextCorpus(org, plan.orgs[org].train_data)
    if plan.model.vocab_size < ByteTokenizer.vocab_size:
        raise DataError(f"organisation '{org}': byte-level text needs vocab_size >= 256, the model has {plan.model.vocab_size}")

    def batch(step: int) -> Batch:
        gen = torch.Generator().manual_seed((t.seed * 7919 + step) * 104_729 + index)
        return corpus.batch(gen, t.batch_size, t.seq_len)

    return batch
