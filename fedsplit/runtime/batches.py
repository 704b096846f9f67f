"""The batches a plan's data owners train and evaluate on: windows of each one's own text (its
``data`` files, through the plan's tokenizer), and deterministic synthetic batches for checking
the maths of a plan without any data.

Training batches depend only on the seed, the data owner and the step, so that a resumed run
and the monolithic baseline see exactly the batches an uninterrupted federated run saw.
Held-out text is the organisation's ``data.eval`` files; without them it holds out the last
:data:`~fedsplit.data.HELDOUT_FRACTION` of its training tokens, which training windows never reach.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data import (
    HELDOUT_FRACTION,
    Batch,
    ByteTokenizer,
    TextCorpus,
    Tokenizer,
    load_tokenizer,
    read_corpus,
)
from ..plan import Plan


def synthetic_batches(plan: Plan, step: int) -> dict[str, tuple[Tensor, Tensor]]:
    t = plan.training
    out = {}
    for index, d in enumerate(plan.data_owners):
        gen = torch.Generator().manual_seed((t.seed * 7919 + step) * 104_729 + index)
        seq = torch.randint(0, plan.model.vocab_size, (t.batch_size, t.seq_len + 1), generator=gen)
        out[d] = (seq[:, :-1].contiguous(), seq[:, 1:].contiguous())
    return out


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


class TrainingBatches:
    """``batches(step) -> (tokens, labels)``: windows of one data owner's training text, drawn
    from a seed of (plan seed, step, data owner); ``tokens``: how many the text has."""

    def __init__(self, plan: Plan, org: str):
        self.training, self.index = plan.training, plan.data_owners.index(org)
        self.corpus = training_corpus(plan, org)
        self.tokens = len(self.corpus.ids)

    def __call__(self, step: int) -> Batch:
        t = self.training
        gen = torch.Generator().manual_seed((t.seed * 7919 + step) * 104_729 + self.index)
        return self.corpus.batch(gen, t.batch_size, t.seq_len)


def batches_for(plan: Plan, org: str) -> TrainingBatches:
    """``step -> (tokens, labels)``: windows of one data owner's training text."""
    return TrainingBatches(plan, org)


def eval_batches_for(plan: Plan, org: str) -> list[Batch]:
    """One data owner's held-out batches, the same on every call: ``training.eval_tokens`` tokens
    (rounded down to whole batches of ``training.batch_size`` x ``training.seq_len``, at least one
    batch) from the start of its held-out text, which training never sees."""
    t = plan.training
    return heldout_corpus(plan, org).eval_batches(t.batch_size, t.seq_len, t.eval_tokens)
