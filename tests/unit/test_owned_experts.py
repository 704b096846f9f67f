"""Owned experts: routed experts that train on one data owner's batches only, held by one
organisation, and that export can leave out (the router renormalised over the rest)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedsplit.federation.checkpoint import CHECKPOINTS, write_checkpoint
from fedsplit.federation.export import export
from fedsplit.federation.verify import verify
from fedsplit.interop import CheckpointError, open_checkpoint
from fedsplit.model import ModelConfig, MoETransformer
from fedsplit.plan import Unit, load_plan, write_resolved
from fedsplit.plan.exposure import exposures
from fedsplit.runtime import initial_weights
from fedsplit.runtime.calls import CallKey
from fedsplit.runtime.ops import ExpertsOp
from fedsplit.runtime.policy import CallPolicy

from ..conftest import PLANS
from .test_plan_validation import DATA, only_problem, write_plan  # noqa: F401 (write_plan: a fixture)

OWNED = PLANS / "owned-experts" / "federation.yaml"
EVERY_LAYER = range(4)


@pytest.fixture(scope="module")
def plan():
    return load_plan(OWNED)


def test_each_data_owner_is_routed_around_the_other_owners_experts_only(plan):
    assert plan.owner_of == {
        **{Unit("expert", layer, 6): "hospital-a" for layer in EVERY_LAYER},
        **{Unit("expert", layer, 7): "hospital-b" for layer in EVERY_LAYER},
    }
    assert plan.blocked_experts("hospital-a") == {layer: (7,) for layer in EVERY_LAYER}
    assert plan.blocked_experts("hospital-b") == {layer: (6,) for layer in EVERY_LAYER}
    a_expert = next(p for p in plan.partitions if Unit("expert", 2, 6) in p.units)
    assert a_expert.holders == ("hospital-a",)


def test_a_blocked_expert_gets_no_token_and_no_gradient_of_the_batch():
    cfg = ModelConfig.from_yaml(PLANS.parent / "models" / "tiny.yaml")
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    routed: list[set[int]] = []
    for layer in model.layers:
        layer.moe.experts.register_forward_pre_hook(lambda _, args: routed.append(set(args[0])))
    tokens = torch.randint(0, cfg.vocab_size, (4, 32))
    ce, aux = model.losses(tokens[:, :-1], tokens[:, 1:], blocked={layer: (3, 5) for layer in EVERY_LAYER})
    (ce + aux).backward()
    assert len(routed) == cfg.num_layers and all(r and not r & {3, 5} for r in routed)
    for layer in model.layers:
        for e in (3, 5):
            assert all(p.grad is None for p in layer.moe.experts[e].parameters())
        router = layer.moe.router.weight.grad
        assert router[[3, 5]].abs().max() == 0 and router[[0, 1, 2, 4, 6, 7]].abs().max() > 0


def test_owned_experts_train_exactly_like_the_monolith_routed_the_same_way(plan):
    result = verify(plan, steps=10)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)
    assert result.loss_mono[0] != result.loss_mono[-1]


def test_a_call_with_another_owners_batch_for_an_owned_expert_is_refused(plan):
    policy = CallPolicy(plan, "hospital-a")
    key = CallKey("hospital-b", 0, 0)
    with pytest.raises(PermissionError, match="owned by hospital-a and trains on its batches only, not hospital-b"):
        policy.check("compute-c", key, ExpertsOp(1, ((6, 4),)))
    policy.check("compute-c", CallKey("hospital-a", 0, 0), ExpertsOp(1, ((6, 4),)))


def test_exposure_counts_only_the_experts_a_data_owner_reaches(plan):
    a = [x.what for x in exposures(plan) if x.receiver == "hospital-a" and x.data_owner == "hospital-b"]
    assert a and not any("routed to" in what for what in a)  # b's tokens never reach a's expert


def test_the_resolved_plan_keeps_what_each_organisation_owns(plan, tmp_path):
    again = load_plan(write_resolved(plan, tmp_path / "plan.json"))
    assert again.owner_of == plan.owner_of


# -- plans that get owned experts wrong ----------------------------------------------------------

TRUNK = "holds: [embed, layers.0-3, final_norm, lm_head]"


def test_owning_experts_without_data_is_refused(write_plan):  # noqa: F811
    problem, text = only_problem(
        write_plan(
            {
                "hospital-a": f"org: hospital-a\n{DATA}\n{TRUNK}\n",
                "experts-b": "org: experts-b\nholds: [layers.0-3.experts.7]\nowns: [layers.0-3.experts.7]\n",
            }
        )
    )
    assert (problem.org, problem.field, problem.line) == ("experts-b", "owns", 3)
    assert "this organisation has none" in text and "'data: {train: ...}'" in text


def test_owning_something_other_than_routed_experts_is_refused(write_plan):  # noqa: F811
    problem, text = only_problem(write_plan({"a": f"org: a\n{DATA}\n{TRUNK}\nowns: [layers.1]\n"}))
    assert (problem.selector, problem.field) == ("layers.1", "owns")
    assert "routed experts only" in text


def test_an_owned_expert_held_by_two_organisations_is_refused(write_plan):  # noqa: F811
    fed = write_plan(
        {
            "a": f"org: a\n{DATA}\n{TRUNK}\nowns: [layers.0-3.experts.7]\n",
            "b": f"org: b\n{DATA}\n{TRUNK}\n",
        }
    )
    problem, text = only_problem(fed)
    assert (problem.org, problem.selector, problem.line) == ("a", "layers.0-3.experts.7", 4)
    assert "exactly one organisation holds each, and a, b all hold layers.0.experts.7, layers.1.experts.7" in text
    assert "(e.g. 'layers.0.experts.7' in a's)" in text


def test_an_expert_owned_twice_is_refused(write_plan):  # noqa: F811
    fed = write_plan(
        {
            "a": f"org: a\n{DATA}\nholds: [embed, layers.0-3, final_norm, lm_head]\nowns: [layers.1.experts.7]\n",
            "b": f"org: b\n{DATA}\nholds: []\nowns: [layers.1.experts.6-7]\n",
        }
    )
    problem, text = only_problem(fed)
    assert problem.org == "b" and "already owned by a" in text


def test_owning_so_many_experts_that_another_owner_keeps_fewer_than_top_k_is_refused(write_plan):  # noqa: F811
    fed = write_plan(
        {
            "a": f"org: a\n{DATA}\n{TRUNK}\nowns: [layers.2.experts.1-7]\n",
            "b": f"org: b\n{DATA}\nholds: []\n",
        }
    )
    problem, text = only_problem(fed)
    assert problem.org == "b"
    assert "routed to 1 experts of layer 2 (the others are owned by a), fewer than top_k (2)" in text


def test_withdrawing_experts_one_does_not_own_is_refused(write_plan):  # noqa: F811
    problem, text = only_problem(write_plan({"a": f"org: a\n{DATA}\n{TRUNK}\nwithdraw_experts: true\n"}))
    assert (problem.field, problem.line) == ("withdraw_experts", 4) and "owns none" in text


# -- export without an organisation ----------------------------------------------------------------


def run_of(plan, tmp_path, weights):
    """A run directory with one checkpoint of ``weights``, as a run leaves it."""
    run = tmp_path / "run"
    run.mkdir()
    write_resolved(plan, run / "plan.json")
    write_checkpoint(run / CHECKPOINTS, 1, weights, {}, {"plan": plan.name})
    return run


def test_export_without_an_owner_drops_its_experts_and_renormalises_the_router(plan, tmp_path):
    weights = initial_weights(plan)
    run = run_of(plan, tmp_path, weights)
    said = export(run, tmp_path / "hf", "hf", without=["hospital-b"])
    assert "without the experts of hospital-b (7 experts per layer left)" in said
    reduced = open_checkpoint(tmp_path / "hf")
    assert reduced.config.num_experts == 7
    state = reduced.reader.read_all()
    model = MoETransformer(reduced.config)
    model.load_state_dict(state, strict=True)
    for layer in EVERY_LAYER:
        router = weights[f"layers.{layer}.moe.router.weight"]
        assert torch.equal(state[f"layers.{layer}.moe.router.weight"], router[:7])
        assert torch.equal(
            state[f"layers.{layer}.moe.experts.6.w1.weight"], weights[f"layers.{layer}.moe.experts.6.w1.weight"]
        )
    # Dropping an expert's router row renormalises the softmax over the rest: the same model as the
    # full one with that expert blocked for every token.
    full = MoETransformer(plan.model)
    full.load_state_dict(weights, strict=True)
    full.eval(), model.eval()
    tokens = torch.randint(0, plan.model.vocab_size, (2, 24))
    with torch.no_grad():
        blocked = full(tokens, blocked={layer: (7,) for layer in EVERY_LAYER})[0]
        assert torch.allclose(model(tokens)[0], blocked, atol=1e-6)
        assert not torch.allclose(full(tokens)[0], blocked, atol=1e-6)


def test_transformers_loads_the_exported_model_without_an_owner_strictly(plan, tmp_path):
    from transformers import AutoModelForCausalLM

    weights = initial_weights(plan)
    export(run_of(plan, tmp_path, weights), tmp_path / "hf", "hf", without=["hospital-a"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    experts = config.get("num_local_experts", config.get("num_experts"))
    assert experts == 7
    ours = MoETransformer(plan.model)
    ours.load_state_dict(weights, strict=True)
    ours.eval()
    tokens = torch.randint(0, plan.model.vocab_size, (2, 24))
    with torch.no_grad():
        expected = ours(tokens, blocked={layer: (6,) for layer in EVERY_LAYER})[0]
        assert torch.allclose(hf(tokens).logits, expected, atol=1e-5)


def test_a_plan_that_withdraws_an_owners_experts_leaves_them_out_of_every_export(plan, tmp_path):
    import dataclasses

    orgs = dict(plan.orgs)
    orgs["hospital-b"] = dataclasses.replace(orgs["hospital-b"], withdraw_experts=True)
    withdrawing = dataclasses.replace(plan, orgs=orgs)
    run = run_of(withdrawing, tmp_path, initial_weights(plan))
    said = export(run, tmp_path / "model.safetensors")
    assert "without the experts of hospital-b" in said and "num_experts: 7" in said
    state = load_file(tmp_path / "model.safetensors")
    assert state["layers.0.moe.router.weight"].shape[0] == 7 and "layers.0.moe.experts.7.w1.weight" not in state


def test_export_without_an_organisation_that_owns_nothing_names_the_owners(plan, tmp_path):
    run = run_of(plan, tmp_path, initial_weights(plan))
    with pytest.raises(CheckpointError, match=r"--without compute-c: owns no experts .*hospital-a, hospital-b"):
        export(run, tmp_path / "out.safetensors", without=["compute-c"])


def test_export_without_experts_in_some_layers_only_says_why_it_cannot(tmp_path, write_plan):  # noqa: F811
    fed = write_plan(
        {
            "a": f"org: a\n{DATA}\n{TRUNK}\n",
            "b": f"org: b\n{DATA}\nholds: [layers.1.experts.7]\nowns: [layers.1.experts.7]\n",
        }
    )
    partial = load_plan(fed)
    run = run_of(partial, tmp_path, initial_weights(partial))
    with pytest.raises(CheckpointError, match=r"different numbers of experts \(layer 0: 8, layer 1: 7"):
        export(run, tmp_path / "out.safetensors", without=["b"])


def test_generate_leaves_out_the_experts_a_run_withdraws_or_the_user_names(plan, tmp_path):
    from fedsplit.sampling import load_model

    run = run_of(plan, tmp_path, initial_weights(plan))
    assert load_model(run).model.cfg.num_experts == 8
    loaded = load_model(run, without=["hospital-a", "hospital-b"])
    assert loaded.model.cfg.num_experts == 6 and loaded.model.layers[0].moe.router.weight.shape[0] == 6
    assert "without the experts of hospital-a, hospital-b" in loaded.description
