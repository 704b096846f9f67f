"""What each organisation receives about each data owner's batches, as ``plan check`` states it,
read off the plan's routes."""

from __future__ import annotations

import torch

from fedsplit.cli import main
from fedsplit.model.moe import hierarchical_routing
from fedsplit.plan import load_plan
from fedsplit.plan.exposure import expected_hierarchical_fraction, expected_routed_fraction, exposures

from ..conftest import PLANS, ROOT
from ..recipes import ALL, finetuned
from .test_router_kinds import plan_with


def received(plan, receiver: str, data_owner: str) -> list[str]:
    return [e.what for e in exposures(plan) if e.receiver == receiver and e.data_owner == data_owner]


def test_the_u_shape_says_who_sees_whose_hidden_states_routed_rows_and_replicas():
    plan = load_plan(PLANS / "u-shape-3" / "federation.yaml")
    for owner in ("hospital-a", "hospital-b"):
        assert received(plan, "compute-c", owner) == [
            "hidden states after layer 0 (every token)",
            "the gradients of the hidden states it returns",
        ]
    # hospital-b holds half of layer 2's experts: it sees the other data owner's routed rows
    (experts,) = received(plan, "hospital-b", "hospital-a")[:1]
    assert experts.startswith("layer 2's normalised hidden states of the tokens routed to its 4 experts (~79%")
    # hospital-a holds a head group of layer 3: every token of hospital-b's batches reaches it
    assert any(
        w.startswith("layer 3's normalised hidden states of every token")
        for w in received(plan, "hospital-a", "hospital-b")
    )
    assert any(
        "round's average of embed, layers.0, final_norm, lm_head" in w
        for w in received(plan, "hospital-a", "hospital-b")
    )
    assert not any(e.receiver == e.data_owner for e in exposures(plan))  # nothing a data owner sends itself


def test_token_ids_and_labels_are_stated_when_the_ends_are_elsewhere(tmp_path):
    (tmp_path / "orgs").mkdir()
    (tmp_path / "train.txt").write_text("to be or not to be\n")
    (tmp_path / "orgs" / "owner.yaml").write_text("org: owner\ndata: {train: ../train.txt}\nholds: [layers.0]\n")
    (tmp_path / "orgs" / "ends.yaml").write_text("org: ends\nholds: [embed, layers.1-3, final_norm, lm_head]\n")
    (tmp_path / "federation.yaml").write_text(
        f"name: t\nmodel: {ROOT / 'configs' / 'models' / 'tiny.yaml'}\norgs: [orgs/*.yaml]\n"
    )
    plan = load_plan(tmp_path / "federation.yaml")
    assert received(plan, "ends", "owner") == [
        "token ids",
        "the gradients of the hidden states it returns",
        "hidden states after layer 0 (every token)",
        "labels (the next token of every position)",
    ]


def test_the_expected_routed_share_is_what_uniform_top_k_routing_gives():
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randn(200_000, 8, generator=gen).topk(2, dim=-1).indices
    for held in (1, 3, 4, 8):
        measured = (chosen < held).any(dim=-1).float().mean().item()
        assert abs(measured - expected_routed_fraction(held, 8, 2)) < 0.005, held
    assert expected_routed_fraction(8, 8, 2) == 1.0


def test_plan_check_prints_the_exposure_table(capsys):
    assert main(["plan", "check", str(PLANS / "three-orgs" / "federation.yaml")]) == 0
    out = capsys.readouterr().out
    assert "what each organisation receives" in out and "hidden states after layer 1 (every token)" in out


def test_a_frozen_replicated_piece_is_not_said_to_be_averaged(tmp_path):
    """Under LoRA the ends' embedding, final norm and head are frozen: only layer 0's adapters
    are averaged between the hospitals."""
    plan = finetuned("u-shape-3", tmp_path, method="lora", rank=4, alpha=8, targets=ALL)
    (line,) = [e.what for e in exposures(plan) if "round's average" in e.what and e.receiver == "hospital-a"]
    assert line.startswith("the round's average of layers.0, which") and "embed" not in line


def test_the_expected_routed_share_is_what_a_uniform_hierarchical_gate_gives():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    routing = hierarchical_routing(
        torch.randn(n, 4, generator=gen), torch.randn(n, 8, generator=gen), group_top_k=2, top_k=1, normalize=True
    )
    for held in ([0], [0, 1], [0, 2], [1, 4, 6]):
        measured = torch.isin(routing.experts, torch.tensor(held)).any(dim=-1).float().mean().item()
        per_group = [sum(e // 2 == g for e in held) for g in range(4)]
        assert abs(measured - expected_hierarchical_fraction(per_group, [2] * 4, 2, 1)) < 0.005, held


def test_plan_check_says_a_soft_router_sends_every_token_to_every_expert_holder(tmp_path, capsys):
    plan = plan_with(tmp_path, "experts", top_k=8, router={"kind": "soft"})
    lines = [e.what for e in exposures(plan) if "experts" in e.what and "routed" in e.what]
    assert lines and all("~100% of tokens under soft routing: every expert gets every token" in w for w in lines)
