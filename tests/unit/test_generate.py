"""``fedsplit generate``: sampling from a checkpoint written here, found from a run directory, a
round directory or its model.safetensors; deterministic by seed, exactly the tokens asked for."""

from __future__ import annotations

import pytest
import torch

from fedsplit.cli import main
from fedsplit.data import ByteTokenizer
from fedsplit.federation.checkpoint import write_checkpoint
from fedsplit.model import MoETransformer
from fedsplit.plan import load_plan, write_resolved
from fedsplit.sampling import GenerateError, load_model, sample

from ..conftest import PLANS


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with plan.json and two round checkpoints of a randomly initialised tiny model."""
    run = tmp_path_factory.mktemp("run")
    plan = load_plan(PLANS / "u-shape-3" / "federation.yaml")
    write_resolved(plan, run / "plan.json")
    torch.manual_seed(0)
    for r in (1, 2):
        write_checkpoint(run / "checkpoints", r, MoETransformer(plan.model).state_dict(), {}, {"plan": plan.name})
    return run


@pytest.mark.parametrize("where", ["", "checkpoints/round-0002", "checkpoints/round-0002/model.safetensors"])
def test_checkpoint_is_found_from_run_round_or_file(run_dir, where):
    loaded = load_model(run_dir / where if where else run_dir)
    assert isinstance(loaded.tokenizer, ByteTokenizer) and loaded.context == 64
    reference = load_model(run_dir / "checkpoints" / "round-0002").model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.model.state_dict().items())


def test_sampling_gives_the_tokens_asked_for_and_repeats_with_its_seed(run_dir):
    model = load_model(run_dir).model
    prompt = list(b"ROMEO:")
    first = sample(model, prompt, 12, temperature=1.0, top_k=20, seed=7, context=8, vocab_size=256)
    assert len(first) == 12 and all(0 <= t < 256 for t in first)
    assert sample(model, prompt, 12, temperature=1.0, top_k=20, seed=7, context=8, vocab_size=256) == first
    assert sample(model, prompt, 12, temperature=1.0, top_k=20, seed=8, context=8, vocab_size=256) != first


def test_greedy_sampling_takes_the_most_likely_token(run_dir):
    model = load_model(run_dir).model
    prompt = list(b"to be")
    (token,) = sample(model, prompt, 1, temperature=0.0)
    logits, _ = model(torch.tensor([prompt]))
    assert token == int(logits[0, -1].argmax())


def test_cli_prints_prompt_and_sample(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "ROMEO:", "--max-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_a_directory_without_checkpoints_says_what_to_give(tmp_path):
    with pytest.raises(GenerateError, match="no complete checkpoint"):
        load_model(tmp_path)


def test_a_tiny_nucleus_is_the_most_likely_token_and_a_whole_one_changes_nothing(run_dir):
    model = load_model(run_dir).model
    prompt = list(b"ROMEO:")
    greedy = sample(model, prompt, 8, temperature=0.0, context=8, vocab_size=256)
    for seed in (1, 2):
        assert sample(model, prompt, 8, temperature=1.0, top_p=1e-6, seed=seed, context=8, vocab_size=256) == greedy
        assert sample(model, prompt, 8, temperature=1.0, top_p=1.0, seed=seed, context=8, vocab_size=256) == sample(
            model, prompt, 8, temperature=1.0, seed=seed, context=8, vocab_size=256
        )
    with pytest.raises(ValueError, match="top-p"):
        sample(model, prompt, 1, top_p=0.0)


def test_the_cli_says_once_when_sampled_bytes_are_not_utf8(run_dir, capsys):
    """A random byte-level model samples bytes that are not UTF-8 at once; the note counts them."""
    assert main(["generate", str(run_dir), "--prompt", "ROMEO:", "--max-tokens", "40", "--temperature", "1"]) == 0
    out, err = capsys.readouterr()
    replaced = out.count("\ufffd")
    assert replaced > 0 and f"{replaced} sampled byte sequences are not UTF-8" in err
