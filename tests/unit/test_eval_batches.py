"""Held-out batches: the same on every call, capped by training.eval_tokens, taken from the eval
files or else from a tail of the training text that training windows never touch."""

from __future__ import annotations

import pytest
import torch

from fedsplit.data import HELDOUT_FRACTION, DataError
from fedsplit.plan import load_plan
from fedsplit.runtime.batches import batches_for, eval_batches_for, heldout_corpus, training_corpus

from ..conftest import ROOT
from ..data_plans import write_plan

SHAKESPEARE = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:20_000]


@pytest.fixture
def plan_without_eval(tmp_path):
    (tmp_path / "train.txt").write_text(SHAKESPEARE)
    return load_plan(write_plan(tmp_path, {"train": "../train.txt"}, training={"eval_tokens": 256}))


def test_eval_batches_are_deterministic_and_capped(plan_without_eval):
    first, again = eval_batches_for(plan_without_eval, "owner"), eval_batches_for(plan_without_eval, "owner")
    assert len(first) == 256 // (2 * 16) and all(t.shape == (2, 16) for t, _ in first)
    for (t1, l1), (t2, l2) in zip(first, again):
        assert torch.equal(t1, t2) and torch.equal(l1, l2)
    tokens, labels = first[0]
    assert torch.equal(tokens[0, 1:], labels[0, :-1])  # labels are the next tokens
    assert torch.equal(tokens[1, 0], labels[0, -1])  # windows follow each other: every token predicted once


def test_without_eval_files_the_tail_is_held_out_and_never_trained_on(plan_without_eval):
    train, heldout = training_corpus(plan_without_eval, "owner"), heldout_corpus(plan_without_eval, "owner")
    total = len(SHAKESPEARE.encode())
    assert len(heldout.ids) == int(total * HELDOUT_FRACTION) and len(train.ids) + len(heldout.ids) == total
    # every training window lies within the head: its last label is before the held-out tail
    batches = batches_for(plan_without_eval, "owner")
    text = SHAKESPEARE.encode()
    head = text[: len(train.ids)]
    for step in range(200):
        tokens, labels = batches(step)
        for row_t, row_l in zip(tokens, labels):
            window = bytes(row_t.tolist()) + bytes(row_l[-1:].tolist())
            assert window in head
    first_eval = bytes(eval_batches_for(plan_without_eval, "owner")[0][0][0].tolist())
    assert text.index(first_eval) == len(train.ids)


def test_eval_files_are_used_when_given_and_training_keeps_all_its_text(tmp_path):
    (tmp_path / "train.txt").write_text(SHAKESPEARE)
    (tmp_path / "eval.jsonl").write_text('{"text": "' + "the held-out words " * 40 + '"}\n')
    plan = load_plan(write_plan(tmp_path, {"train": "../train.txt", "eval": "../eval.jsonl"}))
    assert len(training_corpus(plan, "owner").ids) == len(SHAKESPEARE.encode())
    tokens, _ = eval_batches_for(plan, "owner")[0]
    assert bytes(tokens[0].tolist()).decode().startswith("the held-out wor")


def test_eval_text_shorter_than_a_batch_says_what_to_do(tmp_path):
    (tmp_path / "train.txt").write_text(SHAKESPEARE)
    (tmp_path / "eval.txt").write_text("too short")
    plan = load_plan(write_plan(tmp_path, {"train": "../train.txt", "eval": "../eval.txt"}))
    with pytest.raises(
        DataError, match=r"organisation 'owner': 9 tokens of eval data, fewer than one evaluation batch"
    ):
        eval_batches_for(plan, "owner")
