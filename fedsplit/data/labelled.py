"""A classification task's examples: JSON lines with a ``text`` and a ``label`` (one of the task's
labels by name, or its index), tokenized; training batches drawn by a generator, consecutive
held-out batches, a held-out tail.

A batch is shaped like a language-model batch, so that it travels the same path: token ids
``(B, T)``, each example's first ``seq_len`` tokens right-padded with :data:`PAD_ID` to the
batch's longest, and labels ``(B, T)`` that are -100 everywhere but at each example's last token,
which holds its class. A causal model's hidden state there has read the whole example and none
of the padding, so the task head's cross-entropy over the labelled positions is the
sequence-classification loss (Hugging Face's ``*ForSequenceClassification`` pools the same
token).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .corpus import Batch
from .sources import DataError, json_lines, read_text
from .tokenizer import ByteTokenizer, Tokenizer

PAD_ID = 0  # what fills a batch's shorter examples after their last token (never attended to by it)


@dataclass
class LabelledExamples:
    """An organisation's labelled examples (or a part of them), in file order."""

    org: str
    sequences: list[Tensor]  # each example's token ids
    classes: Tensor  # each example's class index
    source: str  # what they are, for error messages: "train data", "eval data", ...

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(self, generator: torch.Generator, batch_size: int, seq_len: int) -> Batch:
        """``batch_size`` examples drawn at random (with replacement)."""
        self._check_at_least(1, "one example")
        picks = torch.randint(0, len(self), (batch_size,), generator=generator).tolist()
        return classification_batch([self.sequences[i] for i in picks], self.classes[picks], seq_len)

    def eval_batches(self, batch_size: int, seq_len: int, max_tokens: int) -> list[Batch]:
        """Consecutive examples from the start, each once, in whole batches: as many batches as
        ``max_tokens`` tokens of ``batch_size`` x ``seq_len`` would fill, at least one."""
        self._check_at_least(batch_size, f"one evaluation batch of {batch_size} examples")
        wanted = max(1, max_tokens // (batch_size * seq_len))
        n = min(wanted, len(self) // batch_size) * batch_size
        return [
            classification_batch(self.sequences[i : i + batch_size], self.classes[i : i + batch_size], seq_len)
            for i in range(0, n, batch_size)
        ]

    def split(self, fraction: float) -> tuple[LabelledExamples, LabelledExamples]:
        """(head, tail): the tail is the last ``fraction`` of the examples."""
        cut = len(self) - int(len(self) * fraction)
        return (
            LabelledExamples(self.org, self.sequences[:cut], self.classes[:cut], f"{self.source} (before its tail)"),
            LabelledExamples(
                self.org,
                self.sequences[cut:],
                self.classes[cut:],
                f"held-out tail ({fraction:.0%}) of its {self.source}",
            ),
        )

    def _check_at_least(self, n: int, what: str) -> None:
        if len(self) < n:
            raise DataError(
                f"organisation '{self.org}': {len(self)} examples of {self.source}, fewer than {what}; give it more "
                "labelled lines (or data.eval), or lower training.batch_size"
            )


def classification_batch(sequences: Sequence[Tensor], classes: Tensor, seq_len: int) -> Batch:
    """Token ids and labels of a classification batch (see the module's docstring)."""
    cut = [s[:seq_len] for s in sequences]
    longest = max(len(s) for s in cut)
    tokens = torch.full((len(cut), longest), PAD_ID, dtype=torch.int64)
    labels = torch.full((len(cut), longest), -100, dtype=torch.int64)
    for row, (s, c) in enumerate(zip(cut, classes.tolist())):
        tokens[row, : len(s)] = s
        labels[row, len(s) - 1] = c
    return tokens, labels


def read_labelled(
    org: str,
    paths: Sequence[Path],
    labels: Sequence[str],
    tokenizer: Tokenizer = ByteTokenizer(),
    role: str = "train",
) -> LabelledExamples:
    """``org``'s ``.jsonl`` files of ``{"text": ..., "label": ...}`` lines, tokenized; a
    :class:`DataError` naming the file and line of the first line that is not one."""
    index = {name: i for i, name in enumerate(labels)}
    sequences, classes = [], []
    for path in map(Path, paths):
        if path.suffix != ".jsonl":
            raise DataError(
                f"organisation '{org}': {role} data {path} is not a .jsonl file; a task trains on JSON lines "
                f'like {{"text": "...", "label": "{labels[0]}"}}'
            )
        found = 0
        example = f'{{"text": "...", "label": "{labels[0]}"}}'
        for number, record in json_lines(read_text(path, org, role), path, org, role, example):
            where = f"organisation '{org}': {role} data {path}:{number}"
            label = _label(record, where, labels)
            ids = tokenizer.encode(record["text"])
            if not ids:
                raise DataError(f"{where}: 'text' is empty; every example needs text to classify")
            sequences.append(torch.tensor(ids, dtype=torch.int64))
            classes.append(label if isinstance(label, int) else index[label])
            found += 1
        if not found:
            raise DataError(f"organisation '{org}': {role} data {path} holds no example; fill it or remove it")
    return LabelledExamples(org, sequences, torch.tensor(classes, dtype=torch.int64), f"{role} data")


def _label(record: dict, where: str, labels: Sequence[str]) -> str | int:
    """A line's label, checked against the task's."""
    label = record.get("label")
    valid = label in labels if isinstance(label, str) else (type(label) is int and 0 <= label < len(labels))
    if not valid:
        shown = json.dumps(label)[:80] if "label" in record else "no 'label'"
        raise DataError(
            f"{where}: label {shown} is not one of the task's labels ({', '.join(labels)}) or their index "
            f"(0-{len(labels) - 1})"
        )
    return label
