"""Aggregation of one partition's replicas: FedAvg by tokens, and FedAdam through Flower's strategy
with its moments carried across a resume."""

from __future__ import annotations

import math

import torch

from fedsplit.federation.aggregate import FedAdamAggregator, FedAvgAggregator, average_replicas
from fedsplit.plan.schema import AggregationConfig


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
