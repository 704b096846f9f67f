"""``fedsplit plan generate``: U-shaped plans for many organisations."""

from pathlib import Path

import pytest

from fedsplit.cli import main
from fedsplit.federation.verify import verify
from fedsplit.plan import Unit, load_plan
from fedsplit.plan.schema import OptimizerConfig
from fedsplit.plan.templates import generate_plan, render_plan
from fedsplit.plan.units import layer_units

from ..conftest import MODELS, PLANS

ENDS = {Unit("embed"), Unit("final_norm"), Unit("lm_head")}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*.yaml"))}


@pytest.mark.parametrize("orgs, owners", [(16, 4), (64, 16)])
def test_generated_plan_is_valid_and_puts_every_org_to_work(tmp_path, orgs, owners):
    plan = load_plan(generate_plan(orgs, tmp_path))
    assert len(plan.orgs) == orgs and not plan.warnings
    assert plan.data_owners == [f"data-{i:02d}" for i in range(owners)]
    for name in plan.orgs:
        assert plan.units_of(name), f"{name} holds nothing"
    for d in plan.data_owners:  # U-shape: tokens and labels stay with their owner
        assert plan.units_of(d) == ENDS | layer_units(plan.model, 0)
    # Every replica serves some data owner's batches: none holds weights it never trains.
    for p in plan.partitions:
        for holder in p.holders:
            assert plan.users(p, holder), f"{holder}'s replica of {p.name} serves no data owner"


def test_more_orgs_than_pieces_replicate_middle_pieces(tmp_path):
    plan = load_plan(generate_plan(64, tmp_path))
    middle = [p for p in plan.partitions if p.replicated and not set(p.holders) & set(plan.data_owners)]
    assert middle and all(2 <= len(p.holders) <= len(plan.data_owners) for p in middle)


def test_data_owners_can_be_chosen(tmp_path):
    plan = load_plan(generate_plan(10, tmp_path, data_owners=3))
    assert plan.data_owners == ["data-00", "data-01", "data-02"]
    assert all(not org.holds_data for name, org in plan.orgs.items() if name not in plan.data_owners)


def test_generation_is_deterministic(tmp_path):
    generate_plan(16, tmp_path, seed=5)
    first = _files(tmp_path)
    generate_plan(16, tmp_path, seed=5)
    assert _files(tmp_path) == first


@pytest.mark.parametrize("orgs", [16, 64])
def test_shipped_generated_plans_are_up_to_date(orgs):
    shipped = PLANS / f"generated-{orgs}"
    fresh = {path: text.encode() for path, text in render_plan(orgs, shipped).items()}
    assert _files(shipped) == fresh, (
        f"regenerate: fedsplit plan generate --orgs {orgs} --out configs/plans/generated-{orgs}"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"orgs": 1}, "at least 2"),
        ({"orgs": 4, "data_owners": 4}, "--data-owners must be between 1 and"),
        ({"orgs": 4, "data_owners": 0}, "--data-owners must be between 1 and"),
        ({"orgs": 41, "data_owners": 1}, "cannot all host a piece"),
        ({"orgs": 4, "model": "no-such-model.yaml"}, "cannot read the model file"),
        ({"orgs": 4, "batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_plan(out_dir=tmp_path, **kwargs)
    assert not (tmp_path / "federation.yaml").exists()


def test_a_single_layer_model_has_no_middle_to_host(tmp_path):
    model = tmp_path / "one-layer.yaml"
    model.write_text((MODELS / "tiny.yaml").read_text().replace("num_layers: 4", "num_layers: 1"))
    with pytest.raises(ValueError, match="single layer"):
        generate_plan(4, tmp_path / "plan", model=model)


def test_stale_org_files_are_not_left_for_the_glob_to_pick_up(tmp_path):
    generate_plan(8, tmp_path)
    with pytest.raises(ValueError, match="experts-02.yaml"):
        generate_plan(4, tmp_path)


def test_split_training_of_a_generated_plan_is_exact(tmp_path):
    plan = load_plan(generate_plan(8, tmp_path))
    assert any(p.replicated for p in plan.partitions)  # so plain SGD, which averaging replicas keeps exact
    result = verify(plan, steps=2, optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.0))
    assert result.max_abs_diff <= 1e-5, result.worst_parameter


def test_cli_writes_a_valid_plan_and_summarises_it(tmp_path, capsys):
    assert main(["plan", "generate", "--orgs", "8", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "8 organisations, 2 data owners" in out and "replicated" in out
    assert main(["plan", "generate", "--orgs", "8", "--data-owners", "8", "--out", str(tmp_path / "bad")]) == 2
    assert "--data-owners must be between" in capsys.readouterr().err
