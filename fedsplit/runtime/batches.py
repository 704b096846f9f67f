"""The batches a plan's data owners train and evaluate on: windows of each one's own text (its
``data`` files, through the plan's tokenizer), or for a data owner that trains a task, its
labelled examples (:mod:`fedsplit.data.labelled`); and deterministic synthetic batches for
checking the maths of a plan without any data.

Training batches depend only on the seed, the data owner and the step, so that a resumed run
and the monolithic baseline see exactly the batches an uninterrupted federated run saw.
Held-out text is the organisation's ``data.eval`` files; without them it holds out the last
:data:`~fedsplit.data.HELDOUT_FRACTION` of its training tokens (or examples), which training
batches never reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import (
    HELDOUT_FRACTION,
    Batch,
    ByteTokenizer,
    LabelledExamples,
    TextCorpus,
    Tokenizer,
    classification_batch,
    load_tokenizer,
    read_corpus,
    read_labelled,
)
from ..plan import Plan


def synthetic_batches(plan: Plan, step: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Random token ids per data owner; for a task's data owner, random examples of 1 to
    ``seq_len`` tokens with random classes."""
    t = plan.training
    out = {}
    for index, d in enumerate(plan.data_owners):
        gen = torch.Generator().manual_seed((t.seed * 7919 + step) * 104_729 + index)
        seq = torch.randint(0, plan.model.vocab_size, (t.batch_size, t.seq_len + 1), generator=gen)
        task = plan.orgs[d].task
        if task is None:
            out[d] = (seq[:, :-1].contiguous(), seq[:, 1:].contiguous())
            continue
        lengths = torch.randint(1, t.seq_len + 1, (t.batch_size,), generator=gen).tolist()
        classes = torch.randint(0, len(plan.model.task(task).labels), (t.batch_size,), generator=gen)
        out[d] = classification_batch([row[:n] for row, n in zip(seq, lengths)], classes, t.seq_len)
    return out


def tokenizer_for(plan: Plan) -> Tokenizer:
    """The plan's tokenizer (its ``tokenizer`` file, else UTF-8 bytes). ``.save(run_dir /
    TOKENIZER_FILE)`` keeps it beside a run for ``fedsplit generate``."""
    return load_tokenizer(plan.tokenizer) if plan.tokenizer else ByteTokenizer()


Examples = TextCorpus | LabelledExamples


def _read(plan: Plan, org: str, role: str) -> Examples:
    """``org``'s train or eval files: text, or its task's labelled examples."""
    spec = plan.orgs[org]
    paths = spec.train_data if role == "train" else spec.eval_data
    if spec.task is None:
        return read_corpus(org, paths, tokenizer_for(plan), role=role)
    return read_labelled(org, paths, plan.model.task(spec.task).labels, tokenizer_for(plan), role=role)


def training_corpus(plan: Plan, org: str) -> Examples:
    """What ``org`` trains on: its train files, less the held-out tail if it has no eval files."""
    corpus = _read(plan, org, "train")
    return corpus if plan.orgs[org].eval_data else corpus.split(HELDOUT_FRACTION)[0]


def heldout_corpus(plan: Plan, org: str) -> Examples:
    """What ``org`` is evaluated on: its eval files, else the held-out tail of its train files."""
    if plan.orgs[org].eval_data:
        return _read(plan, org, "eval")
    return _read(plan, org, "train").split(HELDOUT_FRACTION)[1]


class TrainingBatches:
    """``batches(step) -> (tokens, labels)``: windows of one data owner's training text (or its
    labelled examples), drawn from a seed of (plan seed, step, data owner); ``tokens``: how many
    the text has (for privacy accounting; absent for examples, which then count as all released
    every step)."""

    def __init__(self, plan: Plan, org: str):
        self.training, self.index = plan.training, plan.data_owners.index(org)
        self.corpus = training_corpus(plan, org)
        if isinstance(self.corpus, TextCorpus):
            self.tokens = len(self.corpus.ids)

    def __call__(self, step: int) -> Batch:
        t = self.training
        gen = torch.Generator().manual_seed((t.seed * 7919 + step) * 104_729 + self.index)
        return self.corpus.batch(gen, t.batch_size, t.seq_len)


def batches_for(plan: Plan, org: str) -> TrainingBatches:
    """``step -> (tokens, labels)``: one data owner's training batches."""
    return TrainingBatches(plan, org)


def eval_batches_for(plan: Plan, org: str) -> list[Batch]:
    """One data owner's held-out batches, the same on every call: ``training.eval_tokens`` tokens
    (rounded down to whole batches of ``training.batch_size`` x ``training.seq_len``, at least one
    batch) from the start of its held-out text, which training never sees."""
    t = plan.training
    return heldout_corpus(plan, org).eval_batches(t.batch_size, t.seq_len, t.eval_tokens)


@dataclass(frozen=True)
class DataSummary:
    """What a data owner trains and is evaluated on, as a run will read it."""

    org: str
    objective: str  # "next-token" or the task's name
    train: int  # tokens of training text, or training examples
    unit: str  # "tokens" or "examples"
    held_out_batches: int  # 0 when evaluation is off


def check_data(plan: Plan, org: str) -> DataSummary:
    """Read ``org``'s training and held-out data exactly as its worker will at the start of a run
    (a :class:`~fedsplit.data.DataError` naming the file, and line where there is one, if it
    cannot), and draw one batch of each."""
    train = training_corpus(plan, org)
    t = plan.training
    gen = torch.Generator().manual_seed(t.seed)
    train.batch(gen, t.batch_size, t.seq_len)
    held_out = eval_batches_for(plan, org) if t.eval_tokens else []
    task = plan.orgs[org].task
    if isinstance(train, TextCorpus):
        return DataSummary(org, "next-token", len(train.ids), "tokens", len(held_out))
    return DataSummary(org, task, len(train), "examples", len(held_out))
