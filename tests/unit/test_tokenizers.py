"""Tokenizers round-trip any text; a BPE trains locally and deterministically, saves beside a run,
and a plan refuses one whose vocabulary the model cannot embed."""

from __future__ import annotations

import pytest

from fedsplit.cli import main
from fedsplit.data import BPETokenizer, ByteTokenizer, load_tokenizer, train_bpe
from fedsplit.plan import PlanError, load_plan
from fedsplit.runtime.batches import batches_for, tokenizer_for

from ..conftest import ROOT
from ..data_plans import write_model, write_plan

SAMPLES = [
    "",
    "to be or not to be\n",
    "héllo wörld ☃ — 𝄞\n\ttabs  and   spaces\r\n",
    "def f(x):\n    return x ** 2  # ok\n",
]
TRAINING_TEXT = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:60_000]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe([TRAINING_TEXT], vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_tokenizer_round_trips(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert all(0 <= i < 256 for i in tok.encode(text))


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trips_text_it_never_saw(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)


def test_bpe_compresses_text_like_its_training_text(bpe):
    text = TRAINING_TEXT[:5000]
    assert 256 < bpe.vocab_size <= 400
    assert len(bpe.encode(text)) < 0.8 * len(text.encode())


def test_bpe_training_is_deterministic_and_survives_save_and_load(bpe, tmp_path):
    again = train_bpe([TRAINING_TEXT], vocab_size=400)
    bpe.save(tmp_path / "a.json")
    again.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    loaded = load_tokenizer(tmp_path / "a.json")
    assert loaded.vocab_size == bpe.vocab_size and loaded.encode(SAMPLES[2]) == bpe.encode(SAMPLES[2])


def test_byte_tokenizer_saves_too(tmp_path):
    assert isinstance(load_tokenizer(ByteTokenizer().save(tmp_path / "tokenizer.json")), ByteTokenizer)


def test_a_broken_tokenizer_file_is_named(tmp_path):
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"t\.json"):
        load_tokenizer(tmp_path / "t.json")


def test_plan_with_a_bpe_tokenizer_trains_on_its_ids(bpe, tmp_path):
    (tmp_path / "train.txt").write_text(TRAINING_TEXT[:20_000])
    bpe.save(tmp_path / "bpe.json")
    plan = load_plan(
        write_plan(
            tmp_path, {"train": "../train.txt"}, tokenizer="bpe.json", model=write_model(tmp_path, vocab_size=512)
        )
    )
    assert isinstance(tokenizer_for(plan), BPETokenizer)
    tokens, labels = batches_for(plan, "owner")(0)
    assert int(tokens.max()) < bpe.vocab_size and int(tokens.max()) >= 256  # merged tokens are used


def test_plan_refuses_a_tokenizer_larger_than_the_model_vocabulary(bpe, tmp_path):
    (tmp_path / "train.txt").write_text("some text\n")
    bpe.save(tmp_path / "bpe.json")
    # tiny.yaml has vocab_size 256; the BPE has more tokens
    with pytest.raises(PlanError) as e:
        load_plan(write_plan(tmp_path, {"train": "../train.txt"}, tokenizer="bpe.json"))
    (problem,) = e.value.problems
    assert (
        problem.field == "tokenizer"
        and f"has {bpe.vocab_size} tokens" in problem.message
        and "vocab_size is 256" in problem.message
    )


def test_plan_refuses_a_model_too_small_for_bytes(tmp_path):
    (tmp_path / "train.txt").write_text("some text\n")
    with pytest.raises(PlanError, match="byte-level tokenizer.*has 256 tokens.*vocab_size is 100"):
        load_plan(write_plan(tmp_path, {"train": "../train.txt"}, model=write_model(tmp_path, vocab_size=100)))


def test_cli_trains_a_tokenizer(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TRAINING_TEXT[:20_000])
    (tmp_path / "b.jsonl").write_text('{"text": "import os\\nprint(os.getcwd())"}\n')
    assert (
        main(
            [
                "tokenizer",
                "train",
                str(tmp_path / "*.txt"),
                str(tmp_path / "b.jsonl"),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "tok.json"),
            ]
        )
        == 0
    )
    assert load_tokenizer(tmp_path / "tok.json").vocab_size == 300
    assert (
        main(
            [
                "tokenizer",
                "train",
                str(tmp_path / "missing.txt"),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
        == 2
    )
    assert "missing.txt" in capsys.readouterr().err
