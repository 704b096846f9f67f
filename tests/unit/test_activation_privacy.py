"""Per-token clipping and Gaussian noise on the hidden states a data owner sends out
(``privacy.activations``), and the accountant's ε."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedsplit.federation.verify import verify
from fedsplit.plan import PlanError, load_plan
from fedsplit.plan.schema import ActivationNoise, PrivacyConfig
from fedsplit.runtime.calls import CallKey
from fedsplit.runtime.privacy import KEY_FILE, cut_blocks, epsilon, noise_key, release_noise, releaser, sample_rate

from ..conftest import PLANS
from .test_plan_validation import DATA, only_problem, write_plan  # noqa: F401 (write_plan: a fixture)


def noised(name: str, clip: float = 1.0, noise_multiplier: float = 0.5):
    plan = load_plan(PLANS / name / "federation.yaml")
    return dataclasses.replace(
        plan, privacy=PrivacyConfig(activations=ActivationNoise(clip=clip, noise_multiplier=noise_multiplier))
    )


def test_the_cuts_are_where_a_data_owners_path_leaves_it():
    assert cut_blocks(load_plan(PLANS / "layers" / "federation.yaml"), "hospital-a") == {0}
    u_shape = load_plan(PLANS / "u-shape-3" / "federation.yaml")
    assert cut_blocks(u_shape, "hospital-a") == {0} and cut_blocks(u_shape, "hospital-b") == {0}


def test_each_token_is_clipped_and_the_noise_repeats_with_its_seed():
    x = torch.randn(2, 16, 64) * 10
    clipped = release_noise(ActivationNoise(clip=1.0, noise_multiplier=0.0), x, seed=3)
    assert torch.allclose(clipped.norm(dim=-1), torch.ones(2, 16))
    small = x / 1000  # already inside the clip: unchanged
    assert torch.equal(release_noise(ActivationNoise(clip=1.0), small, seed=3), small)
    noise = ActivationNoise(clip=1.0, noise_multiplier=0.5)
    a, b, c = (release_noise(noise, x, seed) for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - clipped).std().item() == pytest.approx(0.5, rel=0.1)


def test_noised_activations_train_exactly_like_the_monolith_noised_at_the_same_cut():
    plan = noised("layers")
    result = verify(plan, steps=10)
    assert result.max_abs_diff == 0.0  # layer plans stay bitwise with the noise drawn alike
    clean = verify(load_plan(PLANS / "layers" / "federation.yaml"), steps=10)
    assert result.loss_mono != clean.loss_mono  # the noise is there


def test_noise_at_the_cut_of_several_data_owners_matches_the_monolith():
    result = verify(noised("two-hospitals").with_settings(aggregation=_kept_in_step()), steps=5)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)


def _kept_in_step():
    from fedsplit.plan.schema import AggregationConfig

    return AggregationConfig(replica_sync="step")


def test_a_plan_without_privacy_releases_everything_as_it_is():
    plan = load_plan(PLANS / "layers" / "federation.yaml")
    assert releaser(plan, CallKey("hospital-a", 0, 0), None) is None


def test_the_noise_comes_from_the_data_owners_secret_so_a_receiver_cannot_draw_it_again(tmp_path):
    plan = noised("layers")
    x = torch.randn(2, 16, 64)
    key = CallKey("hospital-a", 3, 1)
    mine, guessed = (releaser(plan, key, secret)(0, x) for secret in (noise_key(None), noise_key(None)))
    assert not torch.equal(mine, guessed)  # everything in the plan and the call, but not the key: other noise
    assert not torch.equal(releaser(plan, key, 7)(0, x), releaser(plan, key, 7, salt=1)(0, x))  # evaluation rounds
    with pytest.raises(ValueError, match="hospital-a has no noise key"):
        releaser(plan, key, None)
    kept = noise_key(tmp_path / "state")
    assert noise_key(tmp_path / "state") == kept  # a resumed worker draws what it would have drawn
    assert (tmp_path / "state" / KEY_FILE).stat().st_mode & 0o777 == 0o600


def test_epsilon_is_opacus_rdp_of_the_steps_at_the_batch_share_of_the_owners_tokens():
    plan = noised("layers", noise_multiplier=1.0)
    tokens = 100_000
    q = sample_rate(plan, tokens)
    assert q == pytest.approx(8 * 64 / tokens)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    expected, _ = get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=q, noise_multiplier=1.0, steps=30, orders=orders), delta=1e-5
    )
    assert epsilon(plan, "hospital-a", 30, tokens) == pytest.approx(expected)
    assert (
        epsilon(plan, "hospital-a", 0, tokens)
        == 0.0
        < epsilon(plan, "hospital-a", 10, tokens)
        < epsilon(plan, "hospital-a", 30, tokens)
    )
    assert epsilon(noised("layers", noise_multiplier=2.0), "hospital-a", 30, tokens) < epsilon(
        plan, "hospital-a", 30, tokens
    )
    assert epsilon(noised("layers", noise_multiplier=0.0), "hospital-a", 30, tokens) == float("inf")


def test_privacy_in_the_plan_round_trips_and_its_bounds_are_checked(write_plan, tmp_path):  # noqa: F811
    owner = f"org: a\n{DATA}\nholds: [embed, layers.0, final_norm, lm_head]\n"
    compute = "org: b\nholds: [layers.1-3]\n"
    federation = (
        f"name: test\nmodel: {PLANS.parent / 'models' / 'tiny.yaml'}\norgs: [orgs/*.yaml]\n"
        "privacy: {activations: {clip: 1.0, noise_multiplier: 0.8}, delta: 1.0e-6}\n"
    )
    plan = load_plan(write_plan({"a": owner, "b": compute}, federation))
    assert plan.privacy.activations.noise_multiplier == 0.8 and plan.privacy.delta == 1e-6
    from fedsplit.plan import write_resolved

    assert load_plan(write_resolved(plan, tmp_path / "plan.json")).privacy == plan.privacy
    problem, text = only_problem(write_plan({"a": owner, "b": compute}, federation.replace("clip: 1.0", "clip: 0")))
    assert problem.field == "privacy.activations.clip" and problem.line == 4


def test_a_plan_check_warns_of_activations_the_noise_does_not_cover(write_plan):  # noqa: F811
    owner = f"org: a\n{DATA}\nholds: [embed, layers.0, final_norm, lm_head]\n"
    federation = (
        f"name: test\nmodel: {PLANS.parent / 'models' / 'tiny.yaml'}\norgs: [orgs/*.yaml]\n"
        "privacy: {activations: {clip: 1.0, noise_multiplier: 0.8}}\n"
    )
    plan = load_plan(write_plan({"a": owner, "b": "org: b\nholds: [layers.1-3, layers.0.experts.4-7]\n"}, federation))
    warned = [str(w) for w in plan.warnings]
    assert any("layer 0's experts at b receive its normalised hidden states without noise" in w for w in warned)
    assert any("gradients it returns are not noised" in w for w in warned)
    with pytest.raises(PlanError):
        load_plan(write_plan({"a": owner.replace("holds", "holdz")}, federation))
