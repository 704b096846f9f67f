"""``fedsplit plan new``: a commented starting plan for any shipped model, valid as written."""

from __future__ import annotations

import pytest
import yaml

from fedsplit.cli import main
from fedsplit.plan import load_plan
from fedsplit.plan.starter import write_starting_plan

from ..conftest import ROOT

MODELS = sorted((ROOT / "configs" / "models").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS, ids=[m.stem for m in MODELS])
def test_a_starting_plan_is_valid_for_every_shipped_model_and_describes_its_shape(tmp_path, model):
    fed = write_starting_plan(tmp_path / "plan", model)
    plan = load_plan(fed)
    cfg = plan.model
    assert sorted(plan.orgs) == ["compute", "data-owner", "experts"] and plan.data_owners == ["data-owner"]
    experts = {p.name for p in plan.partitions if p.holders == ("experts",)}
    assert experts == {f"layers.1-{cfg.num_layers - 1}.experts.{cfg.num_experts // 2}-{cfg.num_experts - 1}"}
    text = fed.read_text()
    assert f"layers 0-{cfg.num_layers - 1}" in text
    assert f"{cfg.num_heads} query heads sharing {cfg.num_kv_heads} KV heads" in text
    assert f"{cfg.num_experts} routed (top-{cfg.top_k})" in text
    head_group = yaml.safe_load(
        (tmp_path / "plan" / "orgs" / "experts.yaml").read_text().split("e.g.\n#   - ")[1].split("\n")[0]
    )
    assert head_group.startswith(f"layers.{cfg.num_layers - 1}.attention.heads.0-")  # the example is a selector


def test_plan_new_refuses_to_write_over_a_plan_and_changes_nothing(tmp_path, capsys):
    assert main(["plan", "new", str(tmp_path / "p")]) == 0
    before = {f: f.read_bytes() for f in (tmp_path / "p").rglob("*.yaml")}
    (tmp_path / "p" / "orgs" / "compute.yaml").write_text("org: compute\nholds: [layers.1-3]\n")
    edited = (tmp_path / "p" / "orgs" / "compute.yaml").read_bytes()
    assert main(["plan", "new", str(tmp_path / "p")]) == 2
    assert "already holds a plan" in capsys.readouterr().err
    assert (tmp_path / "p" / "orgs" / "compute.yaml").read_bytes() == edited
    assert {f for f in (tmp_path / "p").rglob("*.yaml")} == before.keys()


def test_plan_new_names_an_unreadable_model(tmp_path, capsys):
    assert main(["plan", "new", str(tmp_path / "p"), "--model", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read the model" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_a_name_that_yaml_would_misread_is_quoted_and_an_invalid_one_leaves_nothing(tmp_path, capsys):
    assert main(["plan", "new", str(tmp_path / "2024")]) == 0  # unquoted, YAML would read a number
    assert load_plan(tmp_path / "2024" / "federation.yaml").name == "2024"
    assert main(["plan", "new", str(tmp_path / "p"), "--name", "my plan"]) == 1
    assert "name" in capsys.readouterr().err and not (tmp_path / "p").exists()
