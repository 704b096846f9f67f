"""Split training computes what monolithic training computes (the project's first invariant)."""

from pathlib import Path

import pytest
import torch
import yaml

from fedsplit.federation.verify import VerifyError, verify
from fedsplit.plan import load_plan
from fedsplit.plan.schema import OptimizerConfig
from fedsplit.runtime import InProcessFederation, initial_weights, synthetic_batches

from ..conftest import MODELS, PLANS

SINGLE_REPLICA_PLANS = ["layers", "heads", "experts", "shared-experts", "three-orgs", "mixed-top1"]


@pytest.mark.parametrize("name", SINGLE_REPLICA_PLANS)
def test_shipped_plan_matches_monolithic_after_ten_adamw_steps(name):
    plan = load_plan(PLANS / name / "federation.yaml")
    assert plan.training.optimizer.name == "adamw" and plan.model.aux_loss_coef > 0
    result = verify(plan, steps=10)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)
    assert result.loss_split == pytest.approx(result.loss_mono, abs=1e-5)
    assert result.loss_mono[0] != result.loss_mono[-1]  # the model did train


@pytest.mark.parametrize("name", ["layers", "experts", "shared-experts"])
def test_layer_and_expert_partitions_are_bitwise_identical(name):
    # Hidden states and expert rows cross unchanged and are combined in the same order as in
    # the monolithic model, so nothing is reassociated; head groups sum partial o_proj outputs
    # and are only equal to rounding.
    assert verify(load_plan(PLANS / name / "federation.yaml"), steps=3).max_abs_diff == 0.0


def _plan_with_model(tmp_path: Path, plan_name: str, **model_overrides):
    src = PLANS / plan_name
    model = yaml.safe_load((MODELS / "tiny.yaml").read_text()) | model_overrides
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(model))
    fed = yaml.safe_load((src / "federation.yaml").read_text())
    fed["model"] = str(tmp_path / "model.yaml")
    fed["orgs"] = [str(src / "orgs" / "*.yaml")]
    (tmp_path / "federation.yaml").write_text(yaml.safe_dump(fed))
    return load_plan(tmp_path / "federation.yaml")


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_jitter_draws_the_same_noise_split_and_monolithic(tmp_path, top_k):
    # Expert partitions are bitwise, so noise drawn differently anywhere would show.
    plan = _plan_with_model(tmp_path, "experts", router_jitter=0.2, top_k=top_k)
    assert verify(plan, steps=10).max_abs_diff == 0.0


def test_mixed_plan_with_router_jitter_matches_monolithic(tmp_path):
    # Top-2: with top-1 the head groups' reordered sums (rounding) can flip a token's one expert
    # near a tie; three-orgs with top-1 and jitter is 1.1e-5 in process, 1.5e-5 over gRPC.
    plan = _plan_with_model(tmp_path, "three-orgs", router_jitter=0.2, top_k=2)
    result = verify(plan, steps=10)
    assert result.max_abs_diff <= 1e-5


def test_tied_embeddings_split_matches_monolithic(tmp_path):
    plan = _plan_with_model(tmp_path, "three-orgs", tie_embeddings=True)
    assert verify(plan, steps=5).max_abs_diff <= 1e-5


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipelined_schedules_compute_the_same_step_as_sequential(schedule):
    plan = load_plan(PLANS / "three-orgs" / "federation.yaml")
    plan = plan.with_settings(training=plan.training.model_copy(update={"micro_batches": 4, "max_in_flight": 2}))
    weights = initial_weights(plan)
    runs = {s: InProcessFederation(plan, weights, schedule=s) for s in ("sequential", schedule)}
    for step in range(3):
        batches = synthetic_batches(plan, step)
        losses = {s: fed.train_step(step, batches)["hospital-a"]["loss"] for s, fed in runs.items()}
        assert losses[schedule] == pytest.approx(losses["sequential"], abs=1e-6)
    a, b = (fed.reassembled() for fed in runs.values())
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_micro_batching_of_one_matches_monolithic(tmp_path):
    plan = load_plan(PLANS / "three-orgs" / "federation.yaml")
    plan = plan.with_settings(training=plan.training.model_copy(update={"micro_batches": 1}))
    assert verify(plan, steps=3).max_abs_diff <= 1e-5


def test_averaged_replicas_equal_one_monolithic_sgd_step_on_the_union_of_batches():
    plan = load_plan(PLANS / "two-hospitals" / "federation.yaml")
    plan = plan.with_settings(
        training=plan.training.model_copy(update={"optimizer": OptimizerConfig(name="sgd", lr=0.5)})
    )
    # Before averaging, the replicas really differ: each saw only its owner's batch.
    fed = InProcessFederation(plan, initial_weights(plan))
    fed.train_step(0, synthetic_batches(plan, 0))
    embed = next(p for p in plan.partitions if p.name == "embed")
    a, b = fed.replicas(embed).values()
    assert not torch.allclose(a["embed.weight"], b["embed.weight"])
    # After averaging (verify averages replicated partitions after every step), one step of
    # each replica equals one monolithic step on both owners' batches.
    result = verify(plan, steps=1)
    assert result.max_abs_diff <= 1e-5
    assert verify(plan, steps=5).max_abs_diff <= 1e-5


def test_verify_refuses_adam_on_replicated_plans_and_says_why():
    plan = load_plan(PLANS / "two-hospitals" / "federation.yaml")
    with pytest.raises(VerifyError, match="only for plain SGD"):
        verify(plan, steps=1)


def _replicas_in_step(name: str):
    """The plan with its replicas kept in step, trained with AdamW at 3e-4 (two-hospitals' rate):
    replica gradients are added up in another order than the monolith accumulates them, and
    AdamW turns that rounding into update differences that grow with the learning rate
    (u-shape-3 after 10 steps: 3.0e-6 at 3e-4, 1.0e-5 at 1e-3)."""
    plan = load_plan(PLANS / name / "federation.yaml")
    plan = plan.with_settings(aggregation=plan.aggregation.model_copy(update={"replica_sync": "step"}))
    plan = plan.with_settings(
        training=plan.training.model_copy(update={"optimizer": OptimizerConfig(name="adamw", lr=3e-4)})
    )
    return plan


@pytest.mark.parametrize("name", ["two-hospitals", "u-shape-3"])
def test_replicas_kept_in_step_train_exactly_like_the_monolith_with_adamw(name):
    """Replica holders add up their gradients before each step, so the average the monolith
    takes over all data owners' batches is what every replica steps on, whatever the optimizer."""
    plan = _replicas_in_step(name)
    assert plan.training.optimizer.name == "adamw" and any(p.replicated for p in plan.partitions)
    result = verify(plan, steps=10)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)
    assert result.loss_split == pytest.approx(result.loss_mono, abs=1e-5)


def test_replicas_kept_in_step_stay_bitwise_identical():
    plan = _replicas_in_step("u-shape-3")
    fed = InProcessFederation(plan, initial_weights(plan))
    for step in range(3):
        fed.train_step(step, synthetic_batches(plan, step))
    for p in (p for p in plan.partitions if p.replicated):
        first, *others = fed.replicas(p).values()
        assert others and all(torch.equal(first[k], other[k]) for other in others for k in first), p.name


def test_gradients_added_up_in_data_owner_order_still_train_like_the_monolith():
    plan = _replicas_in_step("u-shape-3")
    plan = plan.with_settings(training=plan.training.model_copy(update={"deterministic": True}))
    result = verify(plan, steps=10)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)
