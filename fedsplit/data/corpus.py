"""An organisation's text, tokenized into one sequence: random training windows drawn by a
generator, consecutive held-out windows, and a held-out tail cut off the end (what an
organisation without ``data.eval`` files is evaluated on)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .sources import DataError, read_documents
from .tokenizer import ByteTokenizer, Tokenizer

Batch = tuple[Tensor, Tensor]

HELDOUT_FRACTION = 0.1


@dataclass
class TextCorpus:
    """One long sequence of token ids: an organisation's files (or a part of them) concatenated."""

    org: str
    ids: Tensor
    source: str  # what the ids are, for error messages: "train data", "eval data", ...

    def batch(self, generator: torch.Generator, batch_size: int, seq_len: int) -> Batch:
        """``batch_size`` windows at random offsets: tokens and the next tokens as labels."""
        if len(self.ids) < seq_len + 2:
            raise DataError(
                f"organisation '{self.org}': {len(self.ids)} tokens of {self.source}, fewer than one "
                f"sequence of {seq_len + 1}; give it more text or lower training.seq_len"
            )
        starts = torch.randint(0, len(self.ids) - seq_len - 1, (batch_size,), generator=generator)
        windows = torch.stack([self.ids[s : s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def eval_batches(self, batch_size: int, seq_len: int, max_tokens: int) -> list[Batch]:
        """Consecutive windows from the start, each token predicted once, in whole batches: as
        many as fit in ``max_tokens`` predicted tokens, at least one."""
        windows = (len(self.ids) - 1) // seq_len
        if windows < batch_size:
            raise DataError(
                f"organisation '{self.org}': {len(self.ids)} tokens of {self.source}, fewer than one "
                f"evaluation batch of {batch_size} x {seq_len} + 1; give it more held-out text "
                f"(data.eval) or lower training.batch_size or training.seq_len"
            )
        wanted = max(1, max_tokens // (batch_size * seq_len))
        n = min(wanted, windows // batch_size) * batch_size
        tokens = self.ids[: n * seq_len].view(n, seq_len)
        labels = self.ids[1 : n * seq_len + 1].view(n, seq_len)
        return list(zip(tokens.split(batch_size), labels.split(batch_size)))

    def split(self, fraction: float) -> tuple[TextCorpus, TextCorpus]:
        """(head, tail): the tail is the last ``fraction`` of the tokens."""
        cut = len(self.ids) - int(len(self.ids) * fraction)
        return (
            TextCorpus(self.org, self.ids[:cut], f"{self.source} (before its held-out tail)"),
            TextCorpus(self.org, self.ids[cut:], f"held-out tail ({fraction:.0%}) of its {self.source}"),
        )


def read_corpus(
    org: str, paths: Sequence[Path], tokenizer: Tokenizer = ByteTokenizer(), role: str = "train"
) -> TextCorpus:
    """``org``'s ``paths`` (plain text or ``.jsonl``) tokenized into one sequence."""
    documents = read_documents(paths, org=org, role=role)
    ids = torch.cat([torch.tensor(tokenizer.encode(d), dtype=torch.int64) for d in documents])
    return TextCorpus(org, ids, f"{role} data")
