"""Splits of the shipped corpora across organisations: deterministic by seed, every chunk dealt
once, IID close to the overall mixture, by-domain and Dirichlet visibly skewed; and generated
plans that point each data owner at its own files."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fedsplit.cli import main
from fedsplit.data.corpus_split import SplitError, chunk_corpora, shipped_corpora, split_corpora
from fedsplit.plan import load_plan
from fedsplit.runtime.batches import eval_batches_for

ORGS = ["data-00", "data-01", "data-02", "data-03"]


@pytest.fixture(scope="module")
def splits():
    """Each method once (the corpora are chunked and dealt in under a second; importing the
    partitioners is what takes time)."""
    return {by: split_corpora(ORGS, by, alpha=0.3, seed=1) for by in ("iid", "domain", "dirichlet")}


def _fractions(split, org: str) -> dict[str, float]:
    counts = split.token_counts()[org]["train"]
    total = sum(counts.values())
    return {d: n / total for d, n in counts.items()}


def test_the_shipped_corpora_are_three_domains():
    assert [p.stem for p in shipped_corpora()] == ["arithmetic", "python-stdlib", "tinyshakespeare"]


@pytest.mark.parametrize("by", ["iid", "domain", "dirichlet"])
def test_every_chunk_goes_to_exactly_one_org_and_role(splits, by):
    split = splits[by]
    dealt = Counter(c for org in ORGS for c in split.train[org] + split.eval[org])
    assert dealt == Counter(chunk_corpora(shipped_corpora()))
    assert all(split.eval[org] and split.train[org] for org in ORGS)


@pytest.mark.parametrize("by", ["iid", "domain", "dirichlet"])
def test_same_seed_same_files_other_seed_other_files(splits, by):
    assert split_corpora(ORGS, by, alpha=0.3, seed=1).files() == splits[by].files()
    assert split_corpora(ORGS, by, alpha=0.3, seed=2).files() != splits[by].files()


def test_iid_orgs_see_the_overall_mixture(splits):
    overall = Counter()
    for org in ORGS:
        overall.update(splits["iid"].token_counts()[org]["train"])
    total = sum(overall.values())
    for org in ORGS:
        for domain, fraction in _fractions(splits["iid"], org).items():
            assert abs(fraction - overall[domain] / total) < 0.1


def test_domain_split_gives_each_org_one_domain(splits):
    owned = [[d for d, f in _fractions(splits["domain"], org).items() if f > 0] for org in ORGS]
    assert owned == [["arithmetic"], ["python-stdlib"], ["tinyshakespeare"], ["arithmetic"]]


def test_domain_split_with_fewer_orgs_than_domains_still_deals_every_domain():
    split = split_corpora(ORGS[:2], "domain", seed=0)
    assert {c.domain for org in ORGS[:2] for c in split.train[org]} == {
        "arithmetic",
        "python-stdlib",
        "tinyshakespeare",
    }


def test_dirichlet_split_is_skewed(splits):
    skews = [max(_fractions(splits["dirichlet"], org).values()) for org in ORGS]
    assert max(skews) > 0.8  # with alpha 0.3 some organisation is dominated by one domain


def test_impossible_splits_say_what_to_change(tmp_path):
    (tmp_path / "small.txt").write_text("one line\n")
    with pytest.raises(SplitError, match="1 chunks of text for 4 organisations"):
        split_corpora(ORGS, corpora=[tmp_path / "small.txt"])
    with pytest.raises(SplitError, match="--heldout"):
        split_corpora(ORGS, heldout=1.5)


def test_cli_writes_each_orgs_files_and_prints_tokens_per_domain(tmp_path, capsys):
    assert main(["data", "split", "--orgs", "3", "--by", "domain", "--seed", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "python-stdlib" in out and "data-02" in out
    manifest = json.loads((tmp_path / "split.json").read_text())
    assert manifest["by"] == "domain" and set(manifest["orgs"]) == {"data-00", "data-01", "data-02"}
    first = json.loads((tmp_path / "data-01" / "train.jsonl").read_text().splitlines()[0])
    assert first["domain"] == "python-stdlib" and first["text"]


def test_generated_plan_points_each_data_owner_at_its_split(tmp_path, capsys):
    out = tmp_path / "plan"
    assert (
        main(
            [
                "plan",
                "generate",
                "--orgs",
                "4",
                "--data-owners",
                "2",
                "--out",
                str(out),
                "--split",
                "dirichlet",
                "--alpha",
                "0.5",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    assert "--split dirichlet --alpha 0.5" in (out / "federation.yaml").read_text()
    plan = load_plan(out / "federation.yaml")
    for org in ("data-00", "data-01"):
        assert plan.orgs[org].train_data == ((out / "data" / org / "train.jsonl").resolve(),)
        assert plan.orgs[org].eval_data == ((out / "data" / org / "eval.jsonl").resolve(),)
        assert eval_batches_for(plan, org)
    assert "train tokens per domain" in capsys.readouterr().out
