"""Invalid plans: each validation rule, and what its message tells the person who wrote the plan.

Every test writes a federation file and its organisation files into ``tmp_path`` and checks the
:class:`Problem` it gets back: which file and line, which org, selector or field, and the words
that say what is wrong.
"""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest
import yaml

from fedsplit.model import ModelConfig
from fedsplit.plan import PlanError, Problem, Unit, load_plan
from fedsplit.plan.units import GRAMMAR, layer_units

from ..conftest import MODELS, PLANS

TINY = MODELS / "tiny.yaml"
DATA = "data: {train: ../data/train.txt}"  # relative to an org file in tmp_path/orgs
OWNER = f"""\
org: hospital-a
{DATA}
holds: [embed, layers.0-3, final_norm, lm_head]
"""


@pytest.fixture
def write_plan(tmp_path):
    """``write_plan(orgs, federation=None, model=TINY) -> federation.yaml path``.

    ``orgs`` maps a file stem to the text of ``orgs/<stem>.yaml``; the federation file globs
    ``orgs/*.yaml`` unless its whole text is given. A training-data file exists at
    ``data/train.txt``.
    """
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("to be or not to be\n")
    (tmp_path / "orgs").mkdir()

    def write(orgs: dict[str, str], federation: str | None = None, model: Path | str = TINY) -> Path:
        for stem, text in orgs.items():
            (tmp_path / "orgs" / f"{stem}.yaml").write_text(dedent(text))
        fed = tmp_path / "federation.yaml"
        fed.write_text(
            dedent(federation) if federation is not None else f"name: test\nmodel: {model}\norgs: [orgs/*.yaml]\n"
        )
        return fed

    return write


@pytest.fixture
def write_model(tmp_path):
    """``write_model(**overrides) -> path`` of a copy of tiny.yaml with some fields changed."""

    def write(**overrides) -> Path:
        spec = {**yaml.safe_load(TINY.read_text()), **overrides}
        path = tmp_path / "model.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return write


def plan_error(fed: Path) -> PlanError:
    with pytest.raises(PlanError) as exc:
        load_plan(fed)
    return exc.value


def only_problem(fed: Path) -> tuple[Problem, str]:
    """The single problem of an invalid plan, and the error's full text."""
    err = plan_error(fed)
    assert len(err.problems) == 1, str(err)
    return err.problems[0], str(err)


# -- controls: the plans these tests start from are valid ---------------------------------------


def test_the_base_plan_of_these_tests_is_valid(write_plan):
    plan = load_plan(write_plan({"hospital-a": OWNER}))
    assert plan.data_owners == ["hospital-a"]
    assert plan.warnings == ()
    assert {u for p in plan.partitions for u in p.units} == plan.units_of("hospital-a")


def test_the_example_three_org_plan_is_valid():
    plan = load_plan(PLANS / "three-orgs" / "federation.yaml")
    assert set(plan.orgs) == {"hospital-a", "compute-b", "experts-c"}
    assert plan.warnings == ()


# -- placement ----------------------------------------------------------------------------------


def test_unheld_parameters_are_named(write_plan):
    fed = write_plan({"hospital-a": f"org: hospital-a\n{DATA}\nholds: [embed, layers.0-2, final_norm, lm_head]\n"})
    problem, text = only_problem(fed)
    assert problem.file == fed
    assert "held by no organisation" in problem.message
    assert "held by no organisation: layers.3;" in problem.message  # a selector the user can add
    assert "layers.2" not in problem.message  # only what is missing, not what is held
    assert str(fed) in text


def test_an_unheld_head_group_is_named_by_its_query_heads_as_plans_select_them(write_plan):
    fed = write_plan(
        {
            "hospital-a": f"org: hospital-a\n{DATA}\nholds: [embed, layers.0-2, final_norm, lm_head]\n",
            "compute": "org: compute\nholds: [layers.3.router, layers.3.attention.heads.0-3, layers.3.experts, "
            "layers.3.shared_experts]\n",
        }
    )
    problem, _ = only_problem(fed)
    assert "held by no organisation: layers.3.attention.heads.4-7;" in problem.message


def test_partial_overlap_names_both_orgs_selectors_and_the_shared_layer(write_plan, tmp_path):
    fed = write_plan(
        {
            "alpha": f"""\
            org: alpha
            {DATA}
            holds:
              - embed
              - layers.0-1
              - final_norm
              - lm_head
            """,
            "beta": "org: beta\nholds: [layers.1-3]\n",
        }
    )
    problem, text = only_problem(fed)
    assert problem.file == tmp_path / "orgs" / "alpha.yaml"
    assert problem.line == 5  # the "- layers.0-1" entry
    assert (problem.org, problem.selector) == ("alpha", "layers.0-1")
    assert "'layers.1-3' of org 'beta'" in problem.message
    assert str(tmp_path / "orgs" / "beta.yaml") in problem.message
    assert "neither" in problem.message and "carve-out" in problem.message and "replicas" in problem.message
    assert "on layers.1, but" in problem.message
    assert "layers.0" not in problem.message.replace("'layers.0-1'", "")
    assert "layers.2" not in problem.message
    assert f"{tmp_path / 'orgs' / 'alpha.yaml'}:5: org 'alpha', selector 'layers.0-1': overlaps" in text


def test_exact_replicas_are_one_partition_with_two_holders(write_plan):
    fed = write_plan(
        {
            "hospital-a": f"org: hospital-a\n{DATA}\nholds: [embed, layers.0-1, final_norm, lm_head]\n",
            "compute-b": "org: compute-b\nholds: [layers.2-3]\nlocal: [layers.2-3]\n",
            "compute-c": "org: compute-c\nholds: [layers.2-3]\n",
            # the same units written differently are still the same piece
            "heads-d": "org: heads-d\nholds: [layers.1.attention]\n",
            "heads-e": "org: heads-e\nholds: [layers.1-1.attention.heads.0-7]\n",
        }
    )
    plan = load_plan(fed)
    cfg = plan.model
    by_units = {p.units: p for p in plan.partitions}
    layers = by_units[frozenset(layer_units(cfg, 2) | layer_units(cfg, 3))]
    assert layers.holders == ("compute-b", "compute-c") and layers.replicated
    assert layers.local_holders == {"compute-b"}
    heads = by_units[frozenset(Unit("kv", 1, g) for g in range(cfg.num_kv_heads))]
    assert heads.holders == ("heads-d", "heads-e") and heads.local_holders == frozenset()
    assert [p for p in plan.partitions if p.replicated] == [heads, layers]
    assert plan.units_of("compute-c") == layers.units
    assert not plan.units_of("hospital-a") & heads.units  # carved out of hospital-a's layers.0-1


def test_carve_outs_go_to_the_carving_org_only(write_plan):
    fed = write_plan(
        {
            "hospital-a": f"org: hospital-a\n{DATA}\nholds: [embed, layers.0-1, final_norm, lm_head]\n",
            "compute-b": "org: compute-b\nholds: [layers.2-3]\n",
            "experts-c": "org: experts-c\nholds: [layers.2-3.experts.4-7, layers.3.attention.heads.0-3]\n",
        }
    )
    plan = load_plan(fed)
    carved = {Unit("expert", layer, e) for layer in (2, 3) for e in range(4, 8)}
    heads = {Unit("kv", 3, 0), Unit("kv", 3, 1)}
    by_units = {p.units: p for p in plan.partitions}
    assert by_units[frozenset(carved)].holders == ("experts-c",)
    assert by_units[frozenset(heads)].holders == ("experts-c",)
    rest = (layer_units(plan.model, 2) | layer_units(plan.model, 3)) - carved - heads
    assert by_units[frozenset(rest)].holders == ("compute-b",)
    assert not plan.units_of("compute-b") & (carved | heads)
    assert plan.units_of("experts-c") == carved | heads


# -- selectors ----------------------------------------------------------------------------------


def holds_selector(write_plan, selector: str) -> Path:
    """A valid plan plus one extra holds entry, on line 6 of hospital-a's file."""
    return write_plan(
        {
            "hospital-a": f"""\
        org: hospital-a
        {DATA}
        holds:
          - embed
          - layers.0-3
          - {selector}
          - final_norm
          - lm_head
        """
        }
    )


def assert_selector_problem(write_plan, tmp_path, selector: str, *words: str) -> Problem:
    problem, text = only_problem(holds_selector(write_plan, selector))
    assert problem.file == tmp_path / "orgs" / "hospital-a.yaml"
    assert problem.line == 6
    assert (problem.org, problem.selector) == ("hospital-a", selector)
    for word in words:
        assert word in problem.message
    assert f"hospital-a.yaml:6: org 'hospital-a', selector '{selector}': " in text
    return problem


def test_layer_range_outside_the_model_gives_the_layer_count(write_plan, tmp_path):
    assert_selector_problem(
        write_plan, tmp_path, "layers.0-9", "layer 0-9 is outside the model", "it has 4 layers, 0-3"
    )


def test_expert_range_outside_the_model_gives_the_expert_count(write_plan, tmp_path):
    assert_selector_problem(
        write_plan, tmp_path, "layers.1.experts.6-8", "expert 6-8 is outside the model", "it has 8 experts, 0-7"
    )


def test_head_range_outside_the_model_gives_the_head_count(write_plan, tmp_path):
    assert_selector_problem(
        write_plan, tmp_path, "layers.1.attention.heads.4-9", "head 4-9 is outside the model", "it has 8 heads, 0-7"
    )


def test_empty_range_is_rejected(write_plan, tmp_path):
    assert_selector_problem(write_plan, tmp_path, "layers.3-1", "layer range 3-1 is empty")


@pytest.mark.parametrize(
    "selector, kv, serves",
    [
        ("layers.1.attention.heads.0-2", 1, "(2-3)"),  # ends inside KV head 1
        ("layers.1.attention.heads.1-2", 0, "(0-1)"),  # starts inside KV head 0
        ("layers.1.attention.heads.3", 1, "(2-3)"),
    ],
)
def test_head_group_that_splits_a_kv_head_names_the_alignment(write_plan, tmp_path, selector, kv, serves):
    problem = assert_selector_problem(
        write_plan, tmp_path, selector, f"split KV head {kv}", "each KV head serves 2 query heads", serves
    )
    assert "8 query heads and 4 KV heads" in problem.message
    assert "multiple of 2" in problem.message


def test_kv_aligned_head_group_is_accepted(write_plan):
    plan = load_plan(holds_selector(write_plan, "layers.1.attention.heads.2-5"))
    assert {Unit("kv", 1, 1), Unit("kv", 1, 2)} in [set(p.units) for p in plan.partitions]


@pytest.mark.parametrize(
    "selector", ["layer.0-1", "layers.x", "layers.0.expert.1", "layers.0.heads.0-1", "layers.0-1-2", "Embed"]
)
def test_malformed_selector_cannot_be_parsed(write_plan, tmp_path, selector):
    problem = assert_selector_problem(write_plan, tmp_path, selector, "cannot parse selector")
    assert GRAMMAR in problem.message  # says what a selector looks like


def test_shared_experts_selector_on_a_model_without_them(write_plan, write_model, tmp_path):
    model = write_model(num_shared_experts=0)
    fed = write_plan(
        {
            "hospital-a": f"""\
        org: hospital-a
        {DATA}
        holds:
          - embed
          - layers.0-3
          - layers.1.shared_experts
          - final_norm
          - lm_head
        """
        },
        model=model,
    )
    problem, _ = only_problem(fed)
    assert (problem.file, problem.line) == (tmp_path / "orgs" / "hospital-a.yaml", 6)
    assert (problem.org, problem.selector) == ("hospital-a", "layers.1.shared_experts")
    assert "no shared experts" in problem.message and "num_shared_experts is 0" in problem.message


def test_several_problems_are_reported_together(write_plan, tmp_path):
    fed = write_plan(
        {
            "hospital-a": f"""\
            org: hospital-a
            {DATA}
            holds:
              - embed
              - layer.0-3
              - layers.0-9
              - final_norm
              - lm_head
            """,
            "compute-b": "org: compute-b\nhodls: [layers.0]\n",
        }
    )
    err = plan_error(fed)
    assert len(err.problems) == 3, str(err)
    found = {(p.file.name, p.line, p.selector or p.field) for p in err.problems}
    assert found == {
        ("hospital-a.yaml", 5, "layer.0-3"),
        ("hospital-a.yaml", 6, "layers.0-9"),
        ("compute-b.yaml", 2, "hodls"),
    }
    text = str(err)
    assert "cannot parse selector" in text and "outside the model" in text and "unknown field" in text


# -- schema -------------------------------------------------------------------------------------


def test_unknown_field_in_an_org_file_gives_field_and_line(write_plan, tmp_path):
    fed = write_plan({"hospital-a": f"org: hospital-a\n{DATA}\nhodls: [embed, layers.0-3, final_norm, lm_head]\n"})
    problem, text = only_problem(fed)
    assert (problem.file, problem.line) == (tmp_path / "orgs" / "hospital-a.yaml", 3)
    assert (problem.org, problem.field) == ("hospital-a", "hodls")
    assert "unknown field" in problem.message
    assert "hospital-a.yaml:3: org 'hospital-a', field 'hodls': unknown field" in text


def test_unknown_nested_field_in_the_federation_file_gives_its_path_and_line(write_plan):
    fed = write_plan(
        {"hospital-a": OWNER},
        federation=f"""\
        name: test
        model: {TINY}
        training:
          batch_size: 8
          optimiser:
            name: adamw
        orgs: [orgs/*.yaml]
        """,
    )
    problem, text = only_problem(fed)
    assert (problem.file, problem.line, problem.field) == (fed, 5, "training.optimiser")
    assert problem.org is None
    assert "unknown field" in problem.message
    assert f"{fed}:5: field 'training.optimiser': unknown field" in text


def test_wrong_type_names_the_field_the_value_and_the_line(write_plan):
    fed = write_plan(
        {"hospital-a": OWNER},
        federation=f"""\
        name: test
        model: {TINY}
        training:
          rounds: 2
          batch_size: "eight"
        orgs: [orgs/*.yaml]
        """,
    )
    problem, _ = only_problem(fed)
    assert (problem.file, problem.line, problem.field) == (fed, 5, "training.batch_size")
    assert "valid integer" in problem.message and "'eight'" in problem.message


def test_missing_required_field_is_named(write_plan):
    fed = write_plan({"hospital-a": OWNER}, federation=f"model: {TINY}\norgs: [orgs/*.yaml]\n")
    problem, _ = only_problem(fed)
    assert (problem.file, problem.field) == (fed, "name")
    assert "required field is missing" in problem.message


def test_yaml_syntax_error_gives_the_line(write_plan, tmp_path):
    fed = write_plan({"hospital-a": f"org: hospital-a\n{DATA}\nholds: embed: layers.0-3\n"})
    problem, text = only_problem(fed)
    assert (problem.file, problem.line) == (tmp_path / "orgs" / "hospital-a.yaml", 3)
    assert problem.message.startswith("not valid YAML: ")
    assert "hospital-a.yaml:3: not valid YAML" in text


def test_batch_size_must_be_a_multiple_of_micro_batches(write_plan):
    fed = write_plan(
        {"hospital-a": OWNER},
        federation=f"""\
        name: test
        model: {TINY}
        training:
          batch_size: 6
          micro_batches: 4
        orgs: [orgs/*.yaml]
        """,
    )
    problem, _ = only_problem(fed)
    assert (problem.file, problem.line, problem.field) == (fed, 3, "training")
    assert "batch_size (6) must be a multiple of micro_batches (4)" in problem.message


# -- files --------------------------------------------------------------------------------------


def test_duplicate_org_name_names_both_files(write_plan, tmp_path):
    fed = write_plan({"a": OWNER, "b": OWNER})
    problem, _ = only_problem(fed)
    assert (problem.file, problem.org, problem.field) == (tmp_path / "orgs" / "b.yaml", "hospital-a", "org")
    assert "already used" in problem.message
    assert str(tmp_path / "orgs" / "a.yaml") in problem.message


def test_a_file_matched_by_two_org_globs_is_one_org_not_a_duplicate(write_plan):
    fed = write_plan(
        {"hospital-a": OWNER, "compute-b": "org: compute-b\nholds: [layers.3]\n"},
        federation=f"""\
        name: test
        model: {TINY}
        orgs: [orgs/*.yaml, orgs/hospital-a.yaml, ./orgs/compute-b.yaml]
        """,
    )
    plan = load_plan(fed)
    assert sorted(plan.orgs) == ["compute-b", "hospital-a"]


def test_org_glob_that_matches_no_file(write_plan):
    fed = write_plan(
        {"hospital-a": OWNER},
        federation=f"""\
        name: test
        model: {TINY}
        orgs:
          - orgs/*.yaml
          - partners/*.yaml
        """,
    )
    problem, _ = only_problem(fed)
    assert (problem.file, problem.line, problem.field) == (fed, 5, "orgs")
    assert "no organisation file matches 'partners/*.yaml'" in problem.message


def test_missing_model_file(write_plan, tmp_path):
    fed = write_plan({"hospital-a": OWNER}, model="models/nope.yaml")
    err = plan_error(fed)
    assert len(err.problems) == 2, str(err)
    where, why = err.problems
    assert (where.file, where.line, where.field) == (fed, 2, "model")
    assert "'models/nope.yaml'" in where.message and "invalid" in where.message
    assert why.file == tmp_path / "models" / "nope.yaml"
    assert "cannot read file" in why.message and "No such file" in why.message


def test_invalid_model_file_names_its_field(write_plan, write_model, tmp_path):
    fed = write_plan({"hospital-a": OWNER}, model=write_model(num_kv_heads=3))
    err = plan_error(fed)
    assert err.problems[0].field == "model"
    assert any(p.file == tmp_path / "model.yaml" and "multiple of num_kv_heads" in p.message for p in err.problems), (
        str(err)
    )


def test_local_selector_must_be_one_of_the_orgs_holds(write_plan, tmp_path):
    fed = write_plan(
        {
            "hospital-a": f"""\
        org: hospital-a
        {DATA}
        holds: [embed, layers.0-3, final_norm, lm_head]
        local:
          - layers.0-3
          - layers.2-3
        """
        }
    )
    problem, _ = only_problem(fed)
    assert (problem.file, problem.line) == (tmp_path / "orgs" / "hospital-a.yaml", 6)
    assert (problem.org, problem.selector, problem.field) == ("hospital-a", "layers.2-3", "local")
    assert "local selector must be one of the org's own 'holds' entries" in problem.message


def test_missing_data_file_names_org_and_path(write_plan, tmp_path):
    fed = write_plan(
        {
            "hospital-a": "org: hospital-a\nholds: [embed, layers.0-3, final_norm, lm_head]\ndata:\n  train: "
            "../data/nope.txt\n"
        }
    )
    problem, text = only_problem(fed)
    assert (problem.file, problem.line) == (tmp_path / "orgs" / "hospital-a.yaml", 4)
    assert (problem.org, problem.field) == ("hospital-a", "data.train")
    assert "'../data/nope.txt' does not exist" in problem.message
    assert str(tmp_path / "orgs") in problem.message  # says what the path is relative to
    assert "org 'hospital-a'" in text


# -- organisations ------------------------------------------------------------------------------


def test_no_org_has_training_data(write_plan):
    fed = write_plan({"hospital-a": "org: hospital-a\nholds: [embed, layers.0-3, final_norm, lm_head]\n"})
    problem, _ = only_problem(fed)
    assert problem.file == fed
    assert "no organisation has training data" in problem.message


def test_tied_embeddings_must_be_held_by_the_same_orgs(write_plan, write_model):
    model = write_model(tie_embeddings=True)
    fed = write_plan(
        {
            "hospital-a": f"org: hospital-a\n{DATA}\nholds: [embed, layers.0-3, final_norm]\n",
            "head-b": "org: head-b\nholds: [lm_head]\n",
        },
        model=model,
    )
    problem, _ = only_problem(fed)
    assert problem.file == fed
    assert "ties lm_head to embed" in problem.message
    assert "embed: hospital-a" in problem.message and "lm_head: head-b" in problem.message


def test_tied_embeddings_held_together_are_accepted(write_plan, write_model):
    fed = write_plan({"hospital-a": OWNER}, model=write_model(tie_embeddings=True))
    assert load_plan(fed).model.tie_embeddings


def test_org_that_holds_nothing_and_has_no_data(write_plan, tmp_path):
    fed = write_plan({"hospital-a": OWNER, "idle": "org: idle\ndevice: cpu\n"})
    problem, _ = only_problem(fed)
    assert (problem.file, problem.org) == (tmp_path / "orgs" / "idle.yaml", "idle")
    assert "holds no part of the model and has no data" in problem.message


# -- privacy warnings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "owner_holds, other_holds, text",
    [
        ("layers.0-3, final_norm, lm_head", "embed", "raw tokens leave the organisation"),
        ("embed, layers.0-3, final_norm", "lm_head", "labels leave the organisation"),
    ],
)
def test_data_owner_is_warned_when_its_tokens_or_labels_leave(write_plan, tmp_path, owner_holds, other_holds, text):
    plan = load_plan(
        write_plan(
            {
                "hospital-a": f"org: hospital-a\n{DATA}\nholds: [{owner_holds}]\n",
                "compute-b": f"org: compute-b\nholds: [{other_holds}]\n",
            }
        )
    )
    assert len(plan.warnings) == 1, plan.warnings
    (w,) = plan.warnings
    assert (w.file, w.org) == (tmp_path / "orgs" / "hospital-a.yaml", "hospital-a")
    assert text in w.message and "'compute-b'" in w.message


def test_each_data_owner_is_warned_about_the_replica_it_is_routed_to(write_plan):
    plan = load_plan(
        write_plan(
            {
                "hospital-a": f"org: hospital-a\n{DATA}\nholds: [embed, layers.0-3, final_norm, lm_head]\n",
                "hospital-d": f"org: hospital-d\n{DATA}\nholds: [layers.0-3, final_norm]\n",
            }
        )
    )
    assert {w.org for w in plan.warnings} == {"hospital-d"}
    messages = sorted(w.message for w in plan.warnings)
    assert len(messages) == 2
    assert "labels leave" in messages[0] and "'hospital-a'" in messages[0]
    assert "raw tokens leave" in messages[1] and "'hospital-a'" in messages[1]


def test_model_config_of_the_plan_is_the_model_file(write_plan):
    plan = load_plan(write_plan({"hospital-a": OWNER}))
    assert plan.model == ModelConfig.from_yaml(TINY)
