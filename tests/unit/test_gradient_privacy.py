"""Per-token clipping and Gaussian noise on the gradients a data owner returns where its path comes
back to it (``privacy.gradients``): exact against the monolith noised at the same block, and
composed with the activations' noise in ε."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedsplit.federation.verify import verify
from fedsplit.plan import load_plan, write_resolved
from fedsplit.plan.schema import ActivationNoise, AggregationConfig, GradientNoise, PrivacyConfig
from fedsplit.runtime.calls import CallKey
from fedsplit.runtime.privacy import RDP_ORDERS, entry_blocks, epsilon, mechanisms, releaser, sample_rate

from ..conftest import PLANS
from .test_plan_validation import DATA, write_plan  # noqa: F401 (write_plan: a fixture)


def with_privacy(name: str, gradients: GradientNoise | None, activations: ActivationNoise | None = None):
    plan = load_plan(PLANS / name / "federation.yaml")
    return dataclasses.replace(plan, privacy=PrivacyConfig(activations=activations, gradients=gradients))


def returned_gradient(plan, secret: int, grad: torch.Tensor, step: int = 3) -> torch.Tensor:
    """What hospital-a returns for ``grad`` arriving at its entry block (layer 3 in ``layers``)."""
    x = torch.zeros_like(grad, requires_grad=True)
    releaser(plan, CallKey("hospital-a", step, 1), secret)(3, x).backward(grad)
    return x.grad


def test_the_path_comes_back_to_a_data_owner_after_the_last_block_of_another_organisation():
    assert entry_blocks(load_plan(PLANS / "layers" / "federation.yaml"), "hospital-a") == {3}
    assert entry_blocks(load_plan(PLANS / "u-shape-3" / "federation.yaml"), "hospital-b") == {3}


def test_the_returned_gradient_is_clipped_per_token_and_noised_from_the_owners_secret():
    grad = torch.randn(2, 16, 64)
    clipped = returned_gradient(with_privacy("layers", GradientNoise(clip=0.5)), 7, grad)
    assert torch.allclose(clipped.norm(dim=-1), torch.full((2, 16), 0.5))
    torch.testing.assert_close(clipped / clipped.norm(dim=-1, keepdim=True), grad / grad.norm(dim=-1, keepdim=True))
    plan = with_privacy("layers", GradientNoise(clip=0.5, noise_multiplier=1.0))
    a, b, other, later = (returned_gradient(plan, s, grad, step) for s, step in ((7, 3), (7, 3), (8, 3), (7, 4)))
    assert torch.equal(a, b) and not torch.equal(a, other) and not torch.equal(a, later)
    assert (a - clipped).std().item() == pytest.approx(0.5, rel=0.1)
    x = torch.randn(2, 16, 64)
    assert torch.equal(releaser(plan, CallKey("hospital-a", 3, 1), 7)(3, x), x)  # the forward is unchanged


@pytest.mark.parametrize("name", ["layers", "u-shape-3"])
def test_noised_returned_gradients_train_exactly_like_the_monolith_noised_at_the_same_block(name):
    # Returned gradients are 0.005-0.015 per token at the start (micro-batches of 4 x 64): a clip that clips.
    plan = with_privacy(name, GradientNoise(clip=5e-3, noise_multiplier=1.0))
    if name == "u-shape-3":
        # Two data owners sharing replicas, kept in step so that AdamW stays exact; at the plan's lr
        # 1e-3 their reordered gradient sums alone come within 1e-5 (docs/training.md), so 3e-4.
        plan = plan.with_settings(aggregation=AggregationConfig(replica_sync="step"))
        plan = plan.with_training(optimizer={**plan.training.optimizer.model_dump(), "lr": 3e-4}, deterministic=True)
    result = verify(plan, steps=10)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)
    if name == "u-shape-3":
        # verify draws the noise from the plan's seed, so a plan exact to rounding repeats its drift
        # (with fresh noise one draw in eight flipped a near-tied top-k choice: 4.6e-4).
        assert verify(plan, steps=10).max_abs_diff == result.max_abs_diff
    if name == "layers":
        assert result.max_abs_diff == 0.0  # a layer plan with one data owner stays bitwise
    clean = verify(dataclasses.replace(plan, privacy=None), steps=10)
    assert result.loss_mono != clean.loss_mono  # the noise changed training


def test_both_defences_together_train_exactly_like_the_monolith():
    plan = with_privacy(
        "layers", GradientNoise(clip=5e-3, noise_multiplier=0.5), ActivationNoise(clip=20.0, noise_multiplier=0.5)
    )
    assert verify(plan, steps=10).max_abs_diff == 0.0


def test_epsilon_composes_the_activations_and_the_gradients_mechanisms():
    both = with_privacy("layers", GradientNoise(clip=1.0, noise_multiplier=2.0), ActivationNoise(clip=1.0))
    both = dataclasses.replace(
        both, privacy=both.privacy.model_copy(update={"activations": ActivationNoise(clip=1.0, noise_multiplier=1.0)})
    )
    assert mechanisms(both, "hospital-a") == [1.0, 2.0]
    tokens = 100_000
    q = sample_rate(both, tokens)
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=30, orders=RDP_ORDERS) for s in (1.0, 2.0))
    expected, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=1e-5)
    assert epsilon(both, "hospital-a", 30, tokens) == pytest.approx(expected)
    activations_only = with_privacy("layers", None, ActivationNoise(clip=1.0, noise_multiplier=1.0))
    assert epsilon(both, "hospital-a", 30, tokens) > epsilon(activations_only, "hospital-a", 30, tokens)
    one_owner_path = with_privacy("experts", GradientNoise(clip=1.0, noise_multiplier=1.0))
    assert mechanisms(one_owner_path, "hospital-a") == []  # its path never comes back to it from elsewhere


def test_gradient_noise_in_the_plan_round_trips_and_is_warned_about_where_it_does_not_reach(write_plan, tmp_path):  # noqa: F811
    owner = f"org: a\n{DATA}\nholds: [embed, layers.0, final_norm, lm_head]\n"
    federation = (
        f"name: test\nmodel: {PLANS.parent / 'models' / 'tiny.yaml'}\norgs: [orgs/*.yaml]\n"
        "privacy: {gradients: {clip: 1.0e-3, noise_multiplier: 0.8}}\n"
    )
    plan = load_plan(write_plan({"a": owner, "b": "org: b\nholds: [layers.1-3, layers.0.experts.4-7]\n"}, federation))
    assert plan.privacy.gradients == GradientNoise(clip=1e-3, noise_multiplier=0.8) and plan.privacy.activations is None
    assert load_plan(write_resolved(plan, tmp_path / "plan.json")).privacy == plan.privacy
    warned = [str(w) for w in plan.warnings]
    assert any("layer 0's experts at b receive the gradients of their outputs without noise" in w for w in warned)
    assert any("the hidden states it sends are not noised (privacy.activations)" in w for w in warned)


def test_each_cut_and_each_return_of_a_path_is_a_mechanism_of_its_own(write_plan):  # noqa: F811
    owner = f"org: a\n{DATA}\nholds: [embed, layers.0, layers.2, final_norm, lm_head]\n"
    federation = (
        f"name: test\nmodel: {PLANS.parent / 'models' / 'tiny.yaml'}\norgs: [orgs/*.yaml]\n"
        "privacy: {activations: {clip: 1.0, noise_multiplier: 1.0}, gradients: {clip: 1.0e-3, noise_multiplier: 2.0}}\n"
    )
    plan = load_plan(write_plan({"a": owner, "b": "org: b\nholds: [layers.1, layers.3]\n"}, federation))
    assert entry_blocks(plan, "a") == {1, 3}
    assert mechanisms(plan, "a") == [1.0, 1.0, 2.0, 2.0]  # it leaves after layers 0 and 2, comes back after 1 and 3
