"""An organisation's data files: plain text, JSON lines with a ``text`` field, globs; anything
unusable is an error that names the organisation and the file (and the line of a .jsonl)."""

from __future__ import annotations

import json

import pytest

from fedsplit.data import DataError, read_corpus
from fedsplit.plan import PlanError, load_plan
from fedsplit.runtime.batches import batches_for

from ..data_plans import write_plan

TEXT = "to be or not to be, that is the question\n" * 20


def test_plain_jsonl_and_globbed_files_are_one_corpus(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "first doc", "domain": "x"}) + "\n\n" + json.dumps({"text": "second doc\n"}) + "\n"
    )
    plan = load_plan(write_plan(tmp_path, {"train": ["../*.txt", "../b.jsonl"]}))
    corpus = read_corpus("owner", plan.orgs["owner"].train_data)
    assert bytes(corpus.ids.tolist()).decode() == TEXT + "first doc\nsecond doc\n"


def test_a_missing_file_is_a_plan_error_naming_org_and_path(tmp_path):
    with pytest.raises(PlanError) as e:
        load_plan(write_plan(tmp_path, {"train": "../nowhere/*.txt"}))
    (problem,) = e.value.problems
    assert problem.org == "owner" and "nowhere/*.txt" in problem.message and problem.field == "data.train"


def _data_error(tmp_path, name: str, content: bytes, role: str = "train") -> str:
    (tmp_path / name).write_bytes(content)
    (tmp_path / "ok.txt").write_text(TEXT)
    data = {"train": f"../{name}"} if role == "train" else {"train": "../ok.txt", "eval": f"../{name}"}
    plan = load_plan(write_plan(tmp_path, data))
    with pytest.raises(DataError) as e:
        read_corpus("owner", getattr(plan.orgs["owner"], f"{role}_data"), role=role)
    message = str(e.value)
    assert "organisation 'owner'" in message and str(tmp_path / name) in message
    return message


def test_an_empty_file_is_named(tmp_path):
    assert "holds no text" in _data_error(tmp_path, "empty.txt", b"  \n")


def test_an_empty_eval_file_is_named_as_eval_data(tmp_path):
    assert "eval data" in _data_error(tmp_path, "empty.jsonl", b"", role="eval")


def test_a_jsonl_line_without_text_names_its_line(tmp_path):
    lines = [json.dumps({"text": "fine"}), json.dumps({"body": "no text field"})]
    message = _data_error(tmp_path, "docs.jsonl", "\n".join(lines).encode())
    assert "docs.jsonl:2" in message and "'text'" in message


def test_a_jsonl_line_that_is_not_json_names_its_line(tmp_path):
    assert "bad.jsonl:3: not valid JSON" in _data_error(tmp_path, "bad.jsonl", b'{"text": "a"}\n\n{"text": oops}\n')


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    assert "not UTF-8" in _data_error(tmp_path, "latin1.txt", "café".encode("latin-1"))


def test_a_directory_named_as_data_is_a_plan_error_naming_org_and_field(tmp_path):
    (tmp_path / "adir.txt").mkdir()
    with pytest.raises(PlanError) as e:
        load_plan(write_plan(tmp_path, {"train": "../adir.txt"}))
    (problem,) = e.value.problems
    assert problem.org == "owner" and problem.field == "data.train" and "is a directory" in problem.message


def test_a_file_gone_after_the_plan_was_checked_is_named_when_read(tmp_path):
    (tmp_path / "gone.txt").write_text(TEXT)
    plan = load_plan(write_plan(tmp_path, {"train": "../gone.txt"}))
    (tmp_path / "gone.txt").unlink()
    with pytest.raises(DataError, match=r"organisation 'owner': cannot read train data .*gone\.txt"):
        batches_for(plan, "owner")
