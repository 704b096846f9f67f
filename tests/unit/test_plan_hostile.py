"""Plan files written to hurt the checker: each is a clear problem (file, line, field), never a
traceback, a hang or an allocation that never ends, and the bounds leave real plans alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsplit.plan import PlanError, Problem, load_plan
from fedsplit.plan.schema import MAX_ORGS, MAX_SEED, host_port
from fedsplit.plan.yaml_io import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES
from fedsplit.runtime.calls import CallKey

from ..conftest import MODELS

OWNER = "org: hospital-a\ndata: {train: train.txt}\nholds: [embed, layers.0-3, final_norm, lm_head]\n"


@pytest.fixture
def plan_dir(tmp_path: Path) -> Path:
    (tmp_path / "train.txt").write_text("to be or not to be\n")
    (tmp_path / "owner.yaml").write_text(OWNER)
    return tmp_path


def federation(plan_dir: Path, extra: str = "", orgs: str = "[owner.yaml]", model: str = str(MODELS / "tiny.yaml")):
    path = plan_dir / "federation.yaml"
    path.write_text(f"name: test\nmodel: {model}\norgs: {orgs}\n{extra}")
    return path


def problems(path: Path) -> list[Problem]:
    with pytest.raises(PlanError) as exc:
        load_plan(path)
    assert "Traceback" not in str(exc.value)
    return exc.value.problems


def only_problem(path: Path) -> Problem:
    found = problems(path)
    assert len(found) == 1, found
    return found[0]


def test_an_alias_bomb_is_refused_where_it_expands_without_expanding_it(plan_dir):
    levels = ["lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9^10 values
    fed = federation(plan_dir, "\n".join(levels) + "\n")
    p = only_problem(fed)
    assert p.file == fed and p.line is not None and 4 <= p.line <= 13
    assert f"more than {MAX_NODES} values" in p.message


def test_a_recursive_alias_is_refused(plan_dir):
    p = only_problem(federation(plan_dir, "loop: &loop [a, *loop]\n"))
    assert p.line == 4 and "recursive alias" in p.message


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 10_000])
def test_deep_nesting_is_refused_at_its_line(plan_dir, depth):
    fed = federation(plan_dir, "deep: " + "[" * depth + "]" * depth + "\n")
    p = only_problem(fed)
    assert p.file == fed and p.line == 4
    assert "nested more than" in p.message or "nesting depth" in p.message


def test_aliases_that_nest_past_the_depth_are_refused(plan_dir):
    chain = ["n0: &n0 [x]"] + [f"n{i}: &n{i} [*n{i - 1}]" for i in range(1, MAX_DEPTH + 2)]
    p = only_problem(federation(plan_dir, "\n".join(chain) + "\n"))
    assert f"{MAX_DEPTH} levels" in p.message


def test_anchors_and_merge_keys_in_a_real_plan_still_load(plan_dir):
    fed = federation(
        plan_dir,
        "training: &base {batch_size: 4, seq_len: 16, steps_per_round: 2}\n"
        "aggregation: {strategy: fedavg}\n"
        "x-later: {<<: *base, seq_len: 32}\n",
    )
    assert only_problem(fed).field == "x-later"  # the unknown field, not the alias or the merge
    fed.write_text(fed.read_text().replace("x-later: {<<: *base, seq_len: 32}\n", ""))
    assert load_plan(fed).training.seq_len == 16


def test_a_file_larger_than_the_limit_is_refused_before_it_is_read(plan_dir):
    fed = federation(plan_dir, "comment: " + "x" * MAX_FILE_BYTES + "\n")
    p = only_problem(fed)
    assert p.file == fed and "larger than 1 MiB" in p.message


def test_a_key_written_twice_names_both_lines(plan_dir):
    fed = federation(plan_dir, "name: other\n")
    p = only_problem(fed)
    assert (p.file, p.line) == (fed, 4)
    assert "key 'name' is written twice" in p.message and "also at line 1" in p.message


def test_a_file_that_is_not_utf8_names_the_line_of_the_bad_byte(plan_dir):
    fed = federation(plan_dir)
    fed.write_bytes(fed.read_bytes() + b"comment: caf\xe9\n")
    p = only_problem(fed)
    assert (p.file, p.line) == (fed, 4) and "not UTF-8" in p.message and "0xe9" in p.message


@pytest.mark.parametrize(
    "how",
    [
        {"orgs": "[/dev/zero]"},
        {"orgs": "[/dev/null]"},
        {"model": "/dev/zero"},
        {"extra": "tokenizer: /dev/zero\n"},
    ],
    ids=["org-device", "org-null", "model-device", "tokenizer-device"],
)
def test_a_device_named_as_a_plan_file_is_refused_without_reading_it(plan_dir, how):
    found = problems(federation(plan_dir, **how))
    assert any("not a regular file" in p.message and "/dev/" in f"{p.file} {p.message}" for p in found), found


def test_a_directory_named_as_an_org_file_is_refused(plan_dir):
    (plan_dir / "orgs.yaml").mkdir()
    p = only_problem(federation(plan_dir, orgs="[owner.yaml, orgs.yaml]"))
    assert p.file == plan_dir / "orgs.yaml" and "is a directory" in p.message


@pytest.mark.parametrize("data", ["/dev/zero", "."], ids=["device", "directory"])
def test_data_files_must_be_regular_files(plan_dir, data):
    (plan_dir / "owner.yaml").write_text(OWNER.replace("train.txt", data))
    p = only_problem(federation(plan_dir))
    assert (p.file, p.line, p.field) == (plan_dir / "owner.yaml", 2, "data.train")
    assert "not a regular file" in p.message or "is a directory" in p.message


def test_a_glob_of_more_org_files_than_a_plan_may_have_is_refused(plan_dir):
    many = plan_dir / "many"
    many.mkdir()
    for i in range(MAX_ORGS + 1):
        (many / f"o{i}.yaml").write_text(f"org: o{i}\nholds: [embed]\n")
    p = only_problem(federation(plan_dir, orgs="[owner.yaml, many/*.yaml]"))
    assert (p.line, p.field) == (3, "orgs") and f"at most {MAX_ORGS} organisations" in p.message


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ("training: {seed: -1}", "training.seed", "greater than or equal to 0"),
        (f"training: {{seed: {MAX_SEED + 1}}}", "training.seed", "less than or equal to"),
        ("training: {seed: -1.0e+30}", "training.seed", "integer"),
        ("training: {seq_len: 1000000000000000000000000000000}", "training.seq_len", "less than or equal to"),
        ("training: {batch_size: 1000000000000}", "training.batch_size", "less than or equal to 1048576"),
        ("training: {optimizer: {lr: .inf}}", "training.optimizer.lr", "finite number"),
        ("training: {optimizer: {lr: .nan}}", "training.optimizer.lr", "finite number"),
        ("training: {optimizer: {betas: [1.5, 0.9]}}", "training.optimizer.betas.0", "less than 1"),
        ("transport: {timeout_s: .inf}", "transport.timeout_s", "finite number"),
        ("transport: {retries: 100000}", "transport.retries", "less than or equal to 100"),
        ("aggregation: {server_lr: 1.0e+300}", "aggregation.server_lr", "less than or equal to 10"),
    ],
)
def test_every_number_has_bounds(plan_dir, extra, field, words):
    fed = federation(plan_dir, extra + "\n")
    p = only_problem(fed)
    assert (p.file, p.line, p.field) == (fed, 4, field) and words in p.message, p


def test_a_model_far_beyond_any_real_one_is_refused(plan_dir):
    model = plan_dir / "model.yaml"
    model.write_text((MODELS / "tiny.yaml").read_text().replace("hidden_size: 64", "hidden_size: 1000000000"))
    found = problems(federation(plan_dir, model=str(model)))
    assert any(p.field == "hidden_size" and p.file == model and "less than or equal" in p.message for p in found)


@pytest.mark.parametrize("name", ["../../etc", "a b", "x" * 65])
def test_a_federation_name_is_one_short_word(plan_dir, name):
    fed = federation(plan_dir)
    fed.write_text(fed.read_text().replace("name: test", f"name: '{name}'"))
    assert only_problem(fed).field == "name"


@pytest.mark.parametrize("address", ["not an address", "host:99999", "host:0", "host:", ":50051", "a_b:50051"])
def test_an_org_address_must_be_host_and_port(plan_dir, address):
    (plan_dir / "owner.yaml").write_text(OWNER + f"address: '{address}'\n")
    p = only_problem(federation(plan_dir))
    assert (p.file, p.line, p.field) == (plan_dir / "owner.yaml", 4, "address")
    assert "HOST:PORT" in p.message and "Value error" not in p.message


@pytest.mark.parametrize("address", ["hospital-a.example.org:50051", "10.0.0.7:9093", "[::1]:50051", "localhost:1"])
def test_real_addresses_are_accepted(plan_dir, address):
    (plan_dir / "owner.yaml").write_text(OWNER + f"address: '{address}'\n")
    assert load_plan(federation(plan_dir)).orgs["hospital-a"].address == address
    assert host_port(address)[1] == int(address.rsplit(":", 1)[1])


def test_the_largest_seed_still_seeds_the_router_jitter():
    seed = CallKey("hospital-a", step=10**6, micro_batch=7).noise_seed(MAX_SEED, owner_index=MAX_ORGS)
    torch.Generator().manual_seed(seed)  # raises for a seed past 2**64
    assert CallKey("a", 3, 1).noise_seed(5, 2) == ((5 * 1_000_003 + 3) * 1_009 + 2) * 1_013 + 1  # small ones kept
