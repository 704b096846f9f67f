"""Aggregation of one partition's replicas: FedAvg by tokens, FedAdam through Flower's strategy
and DiLoCo's outer Nesterov SGD, their state carried across a resume."""

from __future__ import annotations

import math

import pytest
import torch

from fedsplit.federation.aggregate import (
    DiLoCoAggregator,
    FedAdamAggregator,
    FedAvgAggregator,
    average_replicas,
    make_aggregator,
    replica_groups,
    unchanged_after_rounds,
)
from fedsplit.federation.checkpoint import latest_checkpoint, write_checkpoint
from fedsplit.plan import load_plan
from fedsplit.plan.schema import AggregationConfig

from ..conftest import PLANS


def replicas(seed: int) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    before = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    trained = {org: {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in before.items()} for org in ("a", "b")}
    return before, trained


def test_fedavg_weights_replicas_by_tokens_served():
    _, trained = replicas(0)
    avg = average_replicas(trained, {"a": 3.0, "b": 1.0})
    for k in avg:
        torch.testing.assert_close(avg[k], 0.75 * trained["a"][k] + 0.25 * trained["b"][k])
    assert FedAvgAggregator()("p", 1, {}, trained, {"a": 3.0, "b": 1.0}).keys() == avg.keys()


def test_fedadam_takes_a_server_adam_step_along_the_averaged_update():
    config = AggregationConfig(strategy="fedadam", server_lr=0.05, server_betas=(0.9, 0.99), server_tau=1e-3)
    before, trained = replicas(1)
    weights = {"a": 1.0, "b": 1.0}
    new = FedAdamAggregator(config)("layers.0", 1, before, trained, weights)
    avg = average_replicas(trained, weights)
    b1, b2 = config.server_betas
    eta = config.server_lr * math.sqrt(1 - b2**2) / (1 - b1**2)  # Flower's bias correction at server round 1
    for k, x in before.items():
        delta = avg[k] - x
        m, v = (1 - b1) * delta, (1 - b2) * delta**2
        expected = x + eta * m / (v.sqrt() + config.server_tau)
        assert new[k].dtype == x.dtype
        torch.testing.assert_close(new[k], expected, rtol=1e-5, atol=1e-6)


def test_fedadam_moments_survive_a_resume():
    config = AggregationConfig(strategy="fedadam", server_lr=0.05)
    first = FedAdamAggregator(config)
    before, trained = replicas(2)
    after_one = first("layers.0", 1, before, trained, {"a": 2.0, "b": 1.0})
    resumed = FedAdamAggregator(config)
    resumed.load_state_dict(first.state_dict())
    _, trained_again = replicas(3)
    trained_again = {
        org: {k: after_one[k] + (v - v.mean()) * 0.01 for k, v in state.items()} for org, state in trained_again.items()
    }
    a = first("layers.0", 2, after_one, trained_again, {"a": 1.0, "b": 1.0})
    b = resumed("layers.0", 2, after_one, trained_again, {"a": 1.0, "b": 1.0})
    fresh = FedAdamAggregator(config)("layers.0", 2, after_one, trained_again, {"a": 1.0, "b": 1.0})
    for k in a:
        assert torch.equal(a[k], b[k])
    assert any(not torch.allclose(a[k], fresh[k]) for k in a)  # the moments matter, so the check can fail


def test_identical_replicas_are_kept_as_they_are_not_recomputed():
    """Replicas kept in step are bitwise equal; averaging them with weights 1:2 would round."""
    x = {"w": torch.full((5,), 0.1)}
    out = average_replicas({"a": x, "b": {"w": x["w"].clone()}}, {"a": 1.0, "b": 2.0})
    assert torch.equal(out["w"], x["w"]) and out["w"] is not x["w"]


def two_rounds(aggregator, seed: int = 4) -> list[dict]:
    """The partition after each of two rounds whose replicas moved the weights apart and along."""
    before, trained = replicas(seed)
    out = [aggregator("layers.0", 1, before, trained, {"a": 2.0, "b": 1.0})]
    moved = {org: {k: out[0][k] + 0.5 * (v - before[k]) for k, v in state.items()} for org, state in trained.items()}
    out.append(aggregator("layers.0", 2, out[0], moved, {"a": 1.0, "b": 1.0}))
    return out


def test_diloco_takes_nesterov_steps_along_the_averaged_round_updates():
    """w <- w - lr (g + mu m), m <- mu m + g, with g = w - FedAvg(replicas): the DiLoCo paper's
    outer step, written out by hand for two rounds."""
    config = AggregationConfig(strategy="diloco", outer_lr=0.7, outer_momentum=0.9)
    lr, mu = config.outer_lr, config.outer_momentum
    got = two_rounds(DiLoCoAggregator(config, ["layers.0"]))
    before, trained = replicas(4)
    avg = average_replicas(trained, {"a": 2.0, "b": 1.0})
    g1 = {k: before[k] - avg[k] for k in before}
    w1 = {k: before[k] - lr * (g1[k] + mu * g1[k]) for k in before}
    moved = {org: {k: w1[k] + 0.5 * (v - before[k]) for k, v in state.items()} for org, state in trained.items()}
    avg2 = average_replicas(moved, {"a": 1.0, "b": 1.0})
    for k in before:
        torch.testing.assert_close(got[0][k], w1[k], rtol=1e-6, atol=1e-6)
        g2 = w1[k] - avg2[k]
        m2 = mu * g1[k] + g2
        torch.testing.assert_close(got[1][k], w1[k] - lr * (g2 + mu * m2), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got[1][k], avg2[k])  # the outer step is not the average


def test_diloco_with_outer_rate_one_and_no_momentum_is_fedavg_bit_for_bit():
    config = AggregationConfig(strategy="diloco", outer_lr=1.0, outer_momentum=0.0)
    diloco, fedavg = two_rounds(DiLoCoAggregator(config, ["layers.0"])), two_rounds(FedAvgAggregator())
    for a, b in zip(diloco, fedavg, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_diloco_leaves_pieces_held_once_to_their_holder():
    config = AggregationConfig(strategy="diloco")
    before, trained = replicas(5)
    one = {"a": trained["a"]}
    out = DiLoCoAggregator(config, ["layers.1"])("layers.0", 1, before, one, {"a": 1.0})
    assert all(torch.equal(out[k], trained["a"][k]) for k in out)


def test_diloco_momentum_survives_a_checkpoint_and_resume_bitwise(tmp_path):
    config = AggregationConfig(strategy="diloco")
    first = DiLoCoAggregator(config, ["layers.0"])
    before, trained = replicas(6)
    after_one = first("layers.0", 1, before, trained, {"a": 2.0, "b": 1.0})
    write_checkpoint(tmp_path, 1, after_one, {}, {"plan": "t"}, first.state_dict())
    resumed = DiLoCoAggregator(config, ["layers.0"])
    resumed.load_state_dict(latest_checkpoint(tmp_path).server_state)
    moved = {org: {k: after_one[k] + 0.3 * (v - before[k]) for k, v in s.items()} for org, s in trained.items()}
    a = first("layers.0", 2, after_one, moved, {"a": 1.0, "b": 1.0})
    b = resumed("layers.0", 2, after_one, moved, {"a": 1.0, "b": 1.0})
    fresh = DiLoCoAggregator(config, ["layers.0"])("layers.0", 2, after_one, moved, {"a": 1.0, "b": 1.0})
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.allclose(a[k], fresh[k]) for k in a)  # the momentum matters, so the check can fail


def test_diloco_steps_the_partitions_that_a_replica_group_averages():
    plan = load_plan(PLANS / "u-shape-3" / "federation.yaml")
    plan = plan.with_settings(aggregation=AggregationConfig(strategy="diloco"))
    aggregator = make_aggregator(plan)
    assert isinstance(aggregator, DiLoCoAggregator)
    averaged = {p.name for p in plan.partitions if len(p.holders) > 1 and not p.local_holders}
    assert averaged and aggregator.replicated == set(replica_groups(plan)) == averaged


def test_a_server_state_of_another_strategy_is_refused_not_misread():
    config = AggregationConfig(strategy="fedadam", server_lr=0.05)
    adam = FedAdamAggregator(config)
    before, trained = replicas(7)
    adam("layers.0", 1, before, trained, {"a": 1.0, "b": 1.0})
    momentum = DiLoCoAggregator(AggregationConfig(strategy="diloco"), ["layers.0"])
    momentum("layers.0", 1, before, trained, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="not DiLoCo momentum"):
        DiLoCoAggregator(AggregationConfig(strategy="diloco"), ["layers.0"]).load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="not a FedAdam moment"):
        FedAdamAggregator(config).load_state_dict(momentum.state_dict())
    with pytest.raises(ValueError, match="another strategy"):
        FedAvgAggregator().load_state_dict(momentum.state_dict())


def test_an_outer_optimizer_on_replicas_kept_in_step_is_refused():
    for strategy in ("diloco", "fedadam"):
        with pytest.raises(ValueError, match="replica_sync: step keeps replicas identical"):
            AggregationConfig(strategy=strategy, replica_sync="step")


def test_the_final_model_is_evaluated_in_the_last_round_only_where_aggregation_leaves_it_as_trained():
    three_orgs, u_shape = (load_plan(PLANS / n / "federation.yaml") for n in ("three-orgs", "u-shape-3"))
    assert unchanged_after_rounds(three_orgs)  # no replicas: FedAvg of one replica is that replica
    assert not unchanged_after_rounds(u_shape)  # its replicas are averaged after each round
    assert unchanged_after_rounds(u_shape.with_settings(aggregation=AggregationConfig(replica_sync="step")))
    assert not unchanged_after_rounds(three_orgs.with_settings(aggregation=AggregationConfig(strategy="fedadam")))
    assert unchanged_after_rounds(three_orgs.with_settings(aggregation=AggregationConfig(strategy="diloco")))
