"""Fine-tuning with LoRA over a frozen base: split == monolithic, the base never moves, only the
adapters hold optimizer state, and bad finetune sections are plan errors with file and field."""

from __future__ import annotations

import pytest
import torch

from fedsplit.federation.verify import verify
from fedsplit.model import LoraDropout, ModelConfig, is_adapter
from fedsplit.plan import PlanError
from fedsplit.runtime import InProcessFederation, MonolithicTrainer, initial_weights, synthetic_batches

from ..conftest import MODELS
from ..recipes import ALL, CARVED, WARMUP_COSINE, finetuned, with_sections


def lora_plan(name, tmp_path, targets=ALL, **extra):
    return finetuned(name, tmp_path, rank=4, alpha=8.0, targets=targets, **extra)


@pytest.mark.parametrize(
    "name,targets",
    [
        ("layers", ALL),
        ("experts", ALL),
        ("heads", ALL),  # q/k/v's A and o_proj's B with the block, the rest with the head groups
        ("three-orgs", ALL),
        ("mixed-top1", ALL),
        (CARVED, ALL),
    ],
    ids=["layers", "experts", "heads", "three-orgs", "mixed-top1", "carved-attention"],
)
def test_split_lora_finetuning_equals_monolithic_lora_finetuning(name, targets, tmp_path):
    plan = lora_plan(name, tmp_path, targets)
    result = verify(plan, steps=10)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)
    assert result.loss_split[-1] < result.loss_split[0]


@pytest.mark.parametrize("name", ["layers", "experts", "heads", "three-orgs", "mixed-top1", CARVED])
def test_lora_dropout_draws_the_same_masks_split_and_monolithic(name, tmp_path):
    """Every adapter's input is dropped by a mask of (micro-batch, layer, target, expert): the
    block's for q/k/v, each head group's columns of o_proj's, each expert holder's for its rows."""
    plan = lora_plan(name, tmp_path, dropout=0.3)
    result = verify(plan, steps=10)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)
    if name in ("layers", "experts"):  # nothing reassociated: the same bits
        assert result.max_abs_diff == 0.0


def test_lora_dropout_changes_training_but_not_evaluation_and_recomputes_its_masks(tmp_path):
    for p in (0.0, 0.3):
        (tmp_path / str(p)).mkdir()
    plans = {p: lora_plan("three-orgs", tmp_path / str(p), dropout=p) for p in (0.0, 0.3)}
    batches = synthetic_batches(plans[0.0], 0)
    trainers = {p: MonolithicTrainer(plan, initial_weights(plan)) for p, plan in plans.items()}
    for t in trainers.values():
        t.train_step(0, batches)
    steps = {p: t.train_step(1, synthetic_batches(plans[0.0], 1))["loss"] for p, t in trainers.items()}
    assert steps[0.0] != steps[0.3]  # B moved along other inputs of A: the adapters' inputs were dropped
    weights = trainers[0.3].state_dict()
    held_out = {p: MonolithicTrainer(plan, weights).evaluate(*batches["hospital-a"]).loss for p, plan in plans.items()}
    assert held_out[0.0] == held_out[0.3]  # no dropout while evaluating
    recomputed = plans[0.3].with_training(activation_checkpointing=True)
    assert verify(recomputed, steps=5).max_abs_diff <= 1e-5


def test_a_lora_dropout_mask_is_a_seeded_inverted_dropout():
    drop = LoraDropout(0.25, seed=7, layer=2)
    mask = drop.at(3).mask("w1", (64, 256), torch.device("cpu"), torch.float32)
    assert torch.equal(mask, drop.at(3).mask("w1", (64, 256), torch.device("cpu"), torch.float32))
    assert set(mask.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
    assert abs(float((mask == 0).float().mean()) - 0.25) < 0.02
    others = [drop.at(4), drop.at(3)._replace(layer=1), drop.at(3)._replace(seed=8)]
    assert all(not torch.equal(mask, d.mask("w1", (64, 256), torch.device("cpu"), torch.float32)) for d in others)
    assert not torch.equal(mask, drop.at(3).mask("w3", (64, 256), torch.device("cpu"), torch.float32))


def test_the_frozen_base_is_bitwise_unchanged_and_only_adapters_train(tmp_path):
    plan = lora_plan(CARVED, tmp_path, train=["layers.0-3.router"])
    weights = initial_weights(plan)
    fed = InProcessFederation(plan, weights)
    for step in range(3):
        fed.train_step(step, synthetic_batches(plan, step))
    after = fed.reassembled()
    # the router unit: the layer's router and its two RMSNorms
    routers = {f"layers.{i}.{w}.weight" for i in range(4) for w in ("moe.router", "attn_norm", "ffn_norm")}
    for name, before in weights.items():
        moved = not torch.equal(after[name], before)
        if name in routers or ".lora_B." in name:
            assert moved, name  # B starts at zero and must have moved; the router units train fully
        elif not is_adapter(name):
            assert not moved, name
    assert plan.frozen and not any(is_adapter(n) or n in routers for n in plan.frozen)


def test_an_organisations_optimizer_state_holds_only_the_adapters(tmp_path):
    plan = lora_plan("layers", tmp_path)
    fed = InProcessFederation(plan, initial_weights(plan))
    fed.train_step(0, synthetic_batches(plan, 0))
    for org, worker in fed.workers.items():
        names = {id(p): n for n, p in worker.weights.master.items()}
        stepped = [names[id(p)] for p in worker.optimizer.state]
        assert stepped and all(is_adapter(n) for n in stepped), org
        frozen = [p for n, p in worker.model.bindings.items() if not is_adapter(n)]
        assert frozen and all(p.grad is None and not p.requires_grad for p in frozen), org


def test_bf16_mixed_keeps_the_frozen_base_in_bf16_and_the_adapters_in_fp32(tmp_path):
    plan = lora_plan("experts", tmp_path).with_training(precision="bf16-mixed")
    fed = InProcessFederation(plan, initial_weights(plan))
    fed.train_step(0, synthetic_batches(plan, 0))
    worker = fed.workers["hospital-a"]
    for name, p in worker.model.bindings.items():
        assert p.dtype == torch.bfloat16, name  # computes in bf16
        if is_adapter(name):
            assert worker.weights.master[name].dtype == torch.float32
        else:
            assert name not in worker.weights.master  # no fp32 copy of a frozen weight
    mono = MonolithicTrainer(plan, initial_weights(plan))
    mono.train_step(0, synthetic_batches(plan, 0))
    split, whole = fed.reassembled(), mono.state_dict()
    assert all(torch.equal(split[k], whole[k]) for k in whole)  # experts plan: bitwise, as in bf16-mixed


def test_lora_through_the_whole_recipe_equals_the_monolith(tmp_path):
    plan = lora_plan(CARVED, tmp_path)
    optimizer = {**plan.training.optimizer.model_dump(), "schedule": WARMUP_COSINE, "lr": 3e-3}
    plan = plan.with_training(grad_clip=0.05, activation_checkpointing=True, optimizer=optimizer)
    result = verify(plan, steps=10)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)
    assert min(result.clip_mono) < 1.0
    for split, mono in zip(result.clip_split, result.clip_mono):
        assert split == pytest.approx(mono, rel=1e-6)


@pytest.mark.parametrize(
    "name,change,field,says",
    [
        ("layers", {"targets": ["gate_proj"]}, "finetune.targets", "gate_proj"),
        ("layers", {"rank": 4096}, "finetune", "rank 4096 is larger than"),
        ("layers", {"dropout": 1.0}, "finetune.dropout", "less than 1"),
        ("layers", {"base_dtype": "bf16"}, "finetune.base_dtype", "bf16-mixed"),
        ("layers", {"train": ["layers.9"]}, "finetune.train", "layer"),
        ("layers", {"train": ["layers.0.attention.heads.0-1"]}, "finetune.train", "attention trains or stays frozen"),
    ],
)
def test_a_bad_finetune_section_is_a_plan_error_naming_its_field(name, change, field, says, tmp_path):
    finetune = {"rank": 4, "alpha": 8.0, "targets": ALL, **change}
    with pytest.raises(PlanError) as e:
        finetuned(name, tmp_path, **finetune)
    problem = next(p for p in e.value.problems if p.field == field or (p.field or "").startswith(field))
    assert says in str(e.value), str(e.value)
    assert problem.file is not None and problem.file.name.endswith("-changed.json")


def test_a_model_without_shared_experts_cannot_adapt_them(tmp_path):
    model = {**ModelConfig.from_yaml(MODELS / "tiny.yaml").model_dump(), "num_shared_experts": 0}
    plan = dict(CARVED, model=model, orgs=[CARVED["orgs"][0], {"org": "middle", "holds": ["layers.2-3"]}])
    with pytest.raises(PlanError, match="no shared experts"):
        finetuned(plan, tmp_path, rank=4, alpha=8.0, targets=["shared_experts"])


def test_freezing_pieces_that_carry_adapters_is_an_error(tmp_path):
    with pytest.raises(PlanError, match="they carry LoRA adapters"):
        lora_plan("layers", tmp_path, freeze=["layers.0-3.experts"])


def test_freezing_pieces_without_lora_trains_the_rest_exactly(tmp_path):
    plan = with_sections("experts", tmp_path, freeze=["layers.0-3.attention", "embed"])
    assert "embed.weight" in plan.frozen and "layers.0.attention.q_proj.weight" in plan.frozen
    assert verify(plan, steps=5).max_abs_diff == 0.0
    weights = initial_weights(plan)
    fed = InProcessFederation(plan, weights)
    fed.train_step(0, synthetic_batches(plan, 0))
    after = fed.reassembled()
    assert torch.equal(after["embed.weight"], weights["embed.weight"])
    assert not torch.equal(after["layers.0.moe.router.weight"], weights["layers.0.moe.router.weight"])
