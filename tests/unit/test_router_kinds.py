"""The router kinds (soft, hard, hierarchical) and expert capacity: each kind's formula against a
direct implementation on small tensors, and split training equal to the monolith for each."""

import math
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from fedsplit.federation.server_app import capacity_dropped
from fedsplit.federation.verify import verify
from fedsplit.interop import CheckpointError
from fedsplit.interop.withdraw import without_experts
from fedsplit.model import ModelConfig, MoETransformer
from fedsplit.model.moe import MoE, hierarchical_routing, within_capacity
from fedsplit.plan import PlanError, load_plan
from fedsplit.plan.units import SelectorError, Unit, parse_selector
from fedsplit.runtime import InProcessFederation, MonolithicTrainer, initial_weights, synthetic_batches

from ..conftest import MODELS, PLANS, ROOT
from ..recipes import WARMUP_COSINE

TINY = yaml.safe_load((MODELS / "tiny.yaml").read_text())  # 8 experts, top-2, shared experts

KINDS = {
    "soft": {"top_k": 8, "router": {"kind": "soft"}},
    "hard": {"top_k": 1, "router": {"kind": "hard", "temperature": 0.5}},
    "hierarchical": {"top_k": 1, "router": {"kind": "hierarchical", "groups": 4, "group_top_k": 2}},
    "topk-capacity": {"router": {"kind": "topk", "capacity_factor": 1.0}},
    "hierarchical-capacity": {"top_k": 2, "router": {"kind": "hierarchical", "groups": 2, "capacity_factor": 1.25}},
}


def config(**overrides) -> ModelConfig:
    return ModelConfig.model_validate({**TINY, "router_jitter": 0.0, **overrides})


def moe_of(cfg: ModelConfig) -> MoE:
    torch.manual_seed(0)
    moe = MoE(cfg, layer_idx=1)
    for gate in (moe.router, moe.group_router):  # far from uniform, so that every choice is clear-cut
        if gate is not None:
            torch.nn.init.normal_(gate.weight, std=0.3)
    return moe


def plan_with(directory: Path, plan_name: str, **model) -> object:
    (directory / "model.yaml").write_text(yaml.safe_dump({**TINY, **model}))
    fed = yaml.safe_load((PLANS / plan_name / "federation.yaml").read_text())
    fed["model"] = str(directory / "model.yaml")
    fed["orgs"] = [str(PLANS / plan_name / "orgs" / "*.yaml")]
    (directory / "federation.yaml").write_text(yaml.safe_dump(fed))
    return load_plan(directory / "federation.yaml")


def test_a_soft_router_weights_every_expert_by_the_softmax():
    moe = moe_of(config(**KINDS["soft"]))
    x = torch.randn(10, 64)
    out, aux = moe(x)
    probs = torch.softmax(moe.router(x), dim=-1)
    direct = sum(probs[:, e, None] * moe.experts[e](x) for e in range(8)) + moe.shared_experts(x)
    torch.testing.assert_close(out, direct, atol=1e-6, rtol=1e-5)
    assert float(aux.detach()) == 0.0  # every expert gets every token: nothing to balance


def test_a_hard_router_sends_each_token_to_one_expert_with_weight_one_and_a_straight_through_gradient():
    cfg = config(**KINDS["hard"])
    moe = moe_of(cfg).train()
    x = torch.randn(12, 64)
    out, _ = moe(x, noise_seed=7)

    gumbel = moe.gumbel(torch.Size([12, 8]), x.device, noise_seed=7)
    y = torch.softmax((moe.router(x) + gumbel) / 0.5, dim=-1)
    chosen = y.argmax(dim=-1)
    picked = torch.stack([moe.experts[int(e)](x[t]) for t, e in enumerate(chosen)])
    torch.testing.assert_close(out - moe.shared_experts(x), picked)
    weights, experts, _ = moe.gate(x, 7, ())
    assert torch.equal(experts[:, 0], chosen) and torch.equal(weights, torch.ones(12, 1))  # exactly one
    assert len(set(chosen.tolist())) > 1

    moe.zero_grad()
    (out * torch.arange(64.0)).sum().backward()
    split_grad = moe.router.weight.grad.clone()
    moe.zero_grad()
    y = torch.softmax((moe.router(x) + gumbel) / 0.5, dim=-1)
    y_chosen = y.gather(-1, chosen[:, None])
    direct = picked.detach() * (y_chosen - y_chosen.detach() + 1.0) + moe.shared_experts(x).detach()
    (direct * torch.arange(64.0)).sum().backward()
    torch.testing.assert_close(split_grad, moe.router.weight.grad, atol=1e-5, rtol=1e-4)
    assert split_grad.abs().sum() > 0  # the straight-through estimator reaches the router


def test_a_hard_router_draws_its_noise_from_the_micro_batch_seed_and_takes_the_argmax_in_evaluation():
    moe = moe_of(config(**KINDS["hard"])).train()
    x = torch.randn(64, 64)
    assert torch.equal(moe(x, noise_seed=3)[0], moe(x, noise_seed=3)[0])
    assert not torch.equal(moe(x, noise_seed=3)[0], moe(x, noise_seed=4)[0])
    moe.eval()
    chosen = moe.router(x).argmax(dim=-1)
    direct = torch.stack([moe.experts[int(e)](x[t]) for t, e in enumerate(chosen)]) + moe.shared_experts(x)
    torch.testing.assert_close(moe(x, noise_seed=3)[0], direct)


def test_a_hierarchical_router_weights_each_expert_by_its_groups_weight_times_its_own():
    cfg = config(top_k=2, router={"kind": "hierarchical", "groups": 2, "group_top_k": 2})  # 2 of 4 in each group
    moe = moe_of(cfg)
    x = torch.randn(9, 64)
    out, aux = moe(x)
    group_probs = torch.softmax(moe.group_router(x), dim=-1)
    logits = moe.router(x)
    direct = moe.shared_experts(x).clone()
    for t in range(9):
        for g in range(2):  # both groups kept: their weights renormalise to the group softmax
            inner = torch.softmax(logits[t, 4 * g : 4 * g + 4], dim=-1)
            top = inner.topk(2)
            for w, i in zip(top.values / top.values.sum(), top.indices):
                direct[t] = direct[t] + group_probs[t, g] * w * moe.experts[int(4 * g + i)](x[t])
    torch.testing.assert_close(out, direct, atol=1e-6, rtol=1e-5)
    assert float(aux.detach()) > 0


def test_a_hierarchical_level_that_keeps_one_keeps_its_probability_so_its_gate_learns_from_the_task():
    group_logits, logits = torch.randn(16, 4), torch.randn(16, 8)
    routing = hierarchical_routing(group_logits, logits, group_top_k=1, top_k=1, normalize=True)
    group_probs = torch.softmax(group_logits, dim=-1)
    group = group_probs.argmax(dim=-1)
    inner = torch.softmax(logits.reshape(16, 4, 2), dim=-1)[torch.arange(16), group]
    expected = group_probs.max(dim=-1).values * inner.max(dim=-1).values
    torch.testing.assert_close(routing.weights[:, 0], expected)
    assert (routing.weights < 1).all()


def test_the_hierarchical_balancing_loss_is_groups_kept_plus_slots_when_balanced_and_grows_when_collapsed():
    n, strong = 64, 30.0  # near one-hot gates

    def gates(group_of, expert_of):
        group_logits, logits = torch.zeros(n, 4), torch.zeros(n, 8)
        for t in range(n):
            for g in group_of(t):
                group_logits[t, g] = strong
            for g in range(4):
                logits[t, 2 * g + expert_of(t)] = strong
        return hierarchical_routing(group_logits, logits, group_top_k=2, top_k=1, normalize=True)

    balanced = gates(lambda t: (t % 4, (t + 1) % 4), lambda t: (t // 4) % 2)
    collapsed = gates(lambda t: (0, 1), lambda t: 0)
    assert float(balanced.aux) == pytest.approx(2 + 2, rel=1e-4)  # group_top_k + slots
    assert float(collapsed.aux) == pytest.approx(4 + 8, rel=1e-4)  # every group and expert level collapsed


def test_capacity_keeps_first_choices_before_second_ones_and_earlier_tokens_first():
    experts = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])  # 8 assignments, 3 experts
    kept = within_capacity(experts, num_experts=4, capacity_factor=1.0)  # capacity ceil(8 / 4) = 2
    # Slot 0: tokens 0, 1 take expert 0's two places, token 2's first choice (0) is dropped, token 3
    # takes expert 1. Slot 1: token 0 takes expert 1's second place, token 1's (1) is dropped,
    # token 2 takes expert 2, token 3's second choice (0) is dropped.
    assert kept.tolist() == [[0, 1], [0, -1], [-1, 2], [1, -1]]


def test_capacity_is_shared_among_the_experts_a_batch_may_reach():
    experts = torch.tensor([[0], [0], [1], [1], [2], [2], [3]])  # 7 assignments
    halved = [[0], [-1], [1], [-1], [2], [-1], [3]]
    assert within_capacity(experts, num_experts=8, capacity_factor=1.0).tolist() == halved  # ceil(7 / 8) = 1
    # With 4 of the 8 experts reachable (the others owned by other data owners), ceil(7 / 4) = 2 each.
    assert within_capacity(experts, num_experts=8, capacity_factor=1.0, reachable=4).tolist() == experts.tolist()


def test_a_dropped_token_passes_through_with_only_the_shared_experts():
    cfg = config(router={"kind": "topk", "capacity_factor": 0.25})
    moe = moe_of(cfg)
    x = torch.randn(16, 64)
    out, _ = moe(x)
    weights, experts, _ = moe.gate(x, None, ())
    capacity = math.ceil(0.25 * experts.numel() / 8)
    assert all((experts == e).sum() <= capacity for e in range(8))
    dropped = (experts == -1).all(dim=1)
    assert dropped.any()
    torch.testing.assert_close(out[dropped], moe.shared_experts(x)[dropped])


def test_a_top_k_router_without_capacity_is_written_as_before_routers_had_kinds():
    cfg = config()
    assert "router" not in cfg.model_dump() and "router" not in cfg.model_dump(mode="json")
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg
    soft = config(**KINDS["soft"])
    assert ModelConfig.model_validate(soft.model_dump(mode="json")) == soft


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"router": {"kind": "soft"}}, "top_k must be num_experts"),
        ({"router": {"kind": "hard"}}, "top_k must be 1"),
        ({"router": {"kind": "hierarchical"}}, "needs router.groups"),
        ({"router": {"kind": "hierarchical", "groups": 3}}, "must divide num_experts"),
        ({"router": {"kind": "hierarchical", "groups": 2, "group_top_k": 3}}, "exceeds router.groups"),
        ({"top_k": 4, "router": {"kind": "hierarchical", "groups": 4}}, "exceeds the 2 experts of a group"),
        ({"router": {"kind": "topk", "temperature": 0.5}}, "temperature does not apply"),
        ({"top_k": 8, "router": {"kind": "soft", "capacity_factor": 1.0}}, "capacity_factor does not apply"),
        ({"router": {"kind": "switch"}}, "kind"),
    ],
)
def test_a_router_the_model_cannot_have_is_refused(overrides, message):
    with pytest.raises(ValidationError, match=message):
        config(**overrides)


def test_a_bad_router_in_a_model_file_is_a_plan_error_naming_the_file_and_field(tmp_path):
    with pytest.raises(PlanError) as e:
        plan_with(tmp_path, "experts", router={"kind": "hard", "temperature": 0.5})
    text = str(e.value)
    assert "model.yaml" in text and "top_k must be 1" in text


@pytest.mark.parametrize("plan_name", ["experts", "heads", "three-orgs"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_router_kind_trains_split_as_the_monolith_does(kind, plan_name):
    with tempfile.TemporaryDirectory() as tmp:
        result = verify(plan_with(Path(tmp), plan_name, router_jitter=0.1, **KINDS[kind]), steps=10)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)
    if plan_name == "experts":  # rows cross unchanged and sum in the monolith's order
        assert result.max_abs_diff == 0.0
    assert result.loss_mono[0] != result.loss_mono[-1]


@pytest.mark.parametrize("kind", ["hard", "hierarchical-capacity"])
def test_router_noise_and_capacity_are_the_same_when_checkpointing_recomputes_the_forward(tmp_path, kind):
    plan = plan_with(tmp_path, "three-orgs", router_jitter=0.1, **KINDS[kind])
    optimizer = {**plan.training.optimizer.model_dump(), "schedule": WARMUP_COSINE}
    plan = plan.with_training(grad_clip=0.5, activation_checkpointing=True, optimizer=optimizer)
    result = verify(plan, steps=10)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)
    assert min(result.clip_mono) < 1.0  # the clipping clipped


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "checkpointed"])
def test_the_split_run_counts_what_capacity_dropped_as_the_monolith_drops_it(tmp_path, recompute):
    plan = plan_with(tmp_path, "three-orgs", router={"kind": "topk", "capacity_factor": 0.75})
    weights = initial_weights(plan)
    steps = 1 if recompute else 3  # the first step's routing is the initial weights', either way
    mono = MonolithicTrainer(plan, weights)
    routed: dict[int, int] = {}
    for layer in mono.model.layers:  # the rows each expert computes in the monolith: what was kept

        def count(module, args, layer=layer.moe.layer_idx):
            routed[layer] = routed.get(layer, 0) + sum(rows.shape[0] for rows in args[0].values())

        layer.moe.experts.register_forward_pre_hook(count)
    # Recomputed forwards (activation checkpointing) route again: they must not be counted twice.
    split = InProcessFederation(plan.with_training(activation_checkpointing=recompute), weights)
    for step in range(steps):
        batches = synthetic_batches(plan, step)
        mono.train_step(step, batches)
        split.train_step(step, batches)
    metrics = {
        org: {
            **{f"expert_load/{layer}/{e}": float(n) for layer, c in w.expert_load.items() for e, n in enumerate(c)},
            **{f"assignments/{layer}": float(n) for layer, n in w.assignments.items()},
        }
        for org, w in split.workers.items()
    }
    dropped = capacity_dropped(metrics)
    t = plan.training
    assignments = steps * len(plan.data_owners) * t.batch_size * t.seq_len * plan.model.routed_slots
    assert set(dropped) == {str(layer) for layer in range(plan.model.num_layers)}
    for layer, fraction in dropped.items():
        assert 0 < fraction < 1
        assert fraction == pytest.approx(1 - routed[int(layer)] / assignments, abs=1e-12)


@pytest.mark.parametrize("kind", ["soft", "hard", "hierarchical"])
def test_owned_experts_with_each_router_kind_train_split_as_the_monolith_does(tmp_path, kind):
    # hospital-a owns expert 6 of every layer and hospital-b expert 7: neither's tokens reach the other's.
    plan = plan_with(tmp_path, "owned-experts", **KINDS[kind])
    assert plan.blocked_experts("hospital-a")[0] == (7,)
    result = verify(plan, steps=10)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)


def test_owning_a_hierarchical_groups_experts_out_of_another_owners_reach_is_a_plan_error(tmp_path):
    with pytest.raises(PlanError, match="routed to 1 experts of group 3 of layer 0 .* fewer than top_k \\(2\\) inside"):
        plan_with(tmp_path, "owned-experts", top_k=2, router={"kind": "hierarchical", "groups": 4})


def test_withdrawing_experts_from_a_soft_router_keeps_it_soft_over_the_rest_and_a_hierarchical_one_refuses():
    soft = config(**KINDS["soft"])
    state = MoETransformer(soft).state_dict()
    cfg, out = without_experts(soft, state, [(layer, 7) for layer in range(4)])
    assert cfg.num_experts == cfg.top_k == 7 and out["layers.0.moe.router.weight"].shape[0] == 7
    hierarchical = config(**KINDS["hierarchical"])
    with pytest.raises(CheckpointError) as e:
        without_experts(hierarchical, MoETransformer(hierarchical).state_dict(), [(0, 7)])
    assert e.value.field == "router.kind"


def test_a_hierarchical_group_is_a_selector_for_its_experts_and_a_flat_router_has_none():
    cfg = config(**KINDS["hierarchical"])  # 4 groups of 2
    assert parse_selector("layers.1-2.experts.group.1-2", cfg) == parse_selector("layers.1-2.experts.2-5", cfg)
    with pytest.raises(SelectorError, match="group 1-4 is outside the model: it has 4 groups"):
        parse_selector("layers.0.experts.group.1-4", cfg)
    with pytest.raises(SelectorError, match="this model's router is 'topk'"):
        parse_selector("layers.0.experts.group.0", config())


def test_a_plan_giving_an_organisation_a_whole_hierarchical_group_trains_as_the_monolith(tmp_path):
    orgs = tmp_path / "orgs"
    orgs.mkdir()
    (orgs / "owner.yaml").write_text(
        f"org: owner\ndata: {{train: {ROOT / 'data' / 'tinyshakespeare.txt'}}}\n"
        "holds: [embed, layers.0-3, final_norm, lm_head]\n"
    )
    (orgs / "group.yaml").write_text("org: group-3\nholds: [layers.0-3.experts.group.3]\n")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({**TINY, **KINDS["hierarchical"]}))
    (tmp_path / "federation.yaml").write_text(
        "name: group\nmodel: model.yaml\norgs: [orgs/*.yaml]\n"
        "training: {batch_size: 8, seq_len: 64, micro_batches: 2, optimizer: {name: adamw, lr: 3.0e-4}}\n"
    )
    plan = load_plan(tmp_path / "federation.yaml")
    assert plan.route("owner")[Unit("expert", 2, 6)] == "group-3"
    assert verify(plan, steps=10).max_abs_diff == 0.0
