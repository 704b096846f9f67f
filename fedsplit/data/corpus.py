"""Each data owner's text, tokenized: training batches that depend only on the seed, the data
owner and the step (so that a resumed run and the monolithic baseline see exactly the batches an
uninterrupted federated run saw), and fixed held-out batches for evaluation.

Held-out text is the organisation's ``data.eval`` files. An organisation without them holds out
the last :data:`HELDOUT_FRACTION` of its training tokens instead: training windows never reach
into that tail, so held-out loss is always measured on tokens the model did not train on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..plan import Plan
from .sources import DataError, read_documents
from .tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

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


def tokenizer_for(plan: Plan) -> Tokenizer:
    """The plan's tokenizer (its ``tokenizer`` file, else UTF-8 bytes). ``.save(run_dir /
    TOKENIZER_FILE)`` keeps it beside a run for ``fedsplit generate``."""
    return load_tokenizer(plan.tokenizer) if plan.tokenizer else ByteTokenizer()


def training_corpus(plan: Plan, org: str) -> TextCorpus:
    """The text ``org`` trains on: its train files, less the held-out tail if it has no eval files."""
    spec = plan.orgs[org]
    corpus = read_corpus(org, spec.train_data, tokenizer_for(plan))
    return corpus if spec.eval_data else corpus.split(HELDOUT_FRACTION)[0]


def heldout_corpus(plan: Plan, org: str) -> TextCorpus:
    """The text ``org`` is evaluated on: its eval files, else the held-out tail of its train files."""
    spec = plan.orgs[org]
    if spec.eval_data:
        return read_corpus(org, spec.eval_data, tokenizer_for(plan), role="eval")
    return read_corpus(org, spec.train_data, tokenizer_for(plan)).split(HELDOUT_FRACTION)[1]


def batches_for(plan: Plan, org: str) -> Callable[[int], Batch]:
    """``step -> (tokens, labels)``: windows of one data owner's training text."""
    t = plan.training
    index = plan.data_owners.index(org)
    corpus = training_corpus(plan, org)

    def batch(step: int) -> Batch:
        gen = torch.Generator().manual_seed((t.seed * 7919 + step) * 104_729 + index)
        return corpus.batch(gen, t.batch_size, t.seq_len)

    return batch


def eval_batches_for(plan: Plan, org: str) -> list[Batch]:
    """One data owner's held-out batches, the same on every call: ``training.eval_tokens`` tokens
    (rounded down to whole batches of ``training.batch_size`` x ``training.seq_len``, at least one
    batch) from the start of its held-out text, which training never sees."""
    t = plan.training
    return heldout_corpus(plan, org).eval_batches(t.batch_size, t.seq_len, t.eval_tokens)
