"""What each organisation receives about each data owner's batches, read off the plan.

A data owner drives its micro-batches through its path (:meth:`.Plan.path`): it sends each segment
of consecutive blocks to the organisation computing them and gets the segment's output back, so
a segment's organisation receives the segment's input (the token ids, or the hidden states after
the block before it), the labels if it computes the loss, and in the backward the gradient of
its output. Inside a layer, the organisation running it sends the holders of its head groups,
routed experts and shared experts their inputs (the normalised hidden states: every token, or
for experts only the tokens routed to them) and, in the backward, the gradients of their outputs.
Holders of a replicated piece see each other's trained weights (averaged once a round) or, with
``replica_sync: step``, each other's gradients every step.

This is what an honest-but-curious organisation can observe; what it can infer from it (inputs
recovered from hidden states or gradients) is measured by the privacy benchmark, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

from ..model import ModelConfig
from .plan import Plan
from .units import Unit


@dataclass(frozen=True)
class Exposure:
    receiver: str
    sender: str  # the organisation it receives it from
    data_owner: str  # whose batches it is about
    what: str


def expected_routed_fraction(held: int, num_experts: int, top_k: int) -> float:
    """The expected share of tokens that reach a holder of ``held`` of ``num_experts`` routed
    experts under uniform top-``top_k`` routing: those with at least one of its experts."""
    return 1 - comb(num_experts - held, top_k) / comb(num_experts, top_k)


def expected_hierarchical_fraction(
    held: Sequence[int], reachable: Sequence[int], groups_kept: int, top_k: int
) -> float:
    """The same under a uniform hierarchical gate: ``groups_kept`` of the groups, then ``top_k``
    of the ``reachable[g]`` experts of each kept group, of which a holder has ``held[g]``. A token
    misses the holder when every kept group misses it: averaged over the kept sets, the product of
    the groups' miss probabilities, i.e. their elementary symmetric polynomial over C(G, kept)."""
    miss = [comb(r - h, top_k) / comb(r, top_k) for h, r in zip(held, reachable)]
    symmetric = [1.0] + [0.0] * groups_kept  # symmetric[j]: sum over j-sets of kept groups
    for q in miss:
        for j in range(groups_kept, 0, -1):
            symmetric[j] += symmetric[j - 1] * q
    return 1 - symmetric[groups_kept] / comb(len(miss), groups_kept)


def routed_share(cfg: ModelConfig, held: Sequence[int], blocked: Sequence[int]) -> tuple[float, str]:
    """(expected share of a data owner's tokens that reach a holder of experts ``held`` in a
    layer where ``blocked`` experts get none of them, under uniform gates; how, in words)."""
    router = cfg.router
    reachable = [e for e in range(cfg.num_experts) if e not in blocked]
    if router.kind == "soft":
        return (1.0 if held else 0.0), "soft routing: every expert gets every token"
    if router.kind == "hierarchical":
        size = cfg.group_size
        groups = range(cfg.num_experts // size)
        in_group = [[e for e in reachable if e // size == g] for g in groups]
        share = expected_hierarchical_fraction(
            [sum(e in held for e in members) for members in in_group],
            [len(members) for members in in_group],
            router.groups_kept,
            cfg.top_k,
        )
        return share, f"uniform hierarchical routing, top-{router.groups_kept} groups then top-{cfg.top_k}"
    return expected_routed_fraction(len(held), len(reachable), cfg.top_k), f"uniform top-{cfg.top_k} routing"


def _block_name(block: str | int) -> str:
    return f"layer {block}" if isinstance(block, int) else block


def exposures(plan: Plan) -> list[Exposure]:
    """Everything each organisation other than the data owner receives about its batches (what
    a data owner receives about its own batches is no exposure)."""
    cfg = plan.model
    out: list[Exposure] = []
    for d in plan.data_owners:
        route = plan.route(d)
        before: str | int | None = None
        for org, run in plan.path(d):
            if org != d:
                first = "token ids" if before is None else f"hidden states after {_block_name(before)} (every token)"
                out.append(Exposure(org, d, d, first))
                if "lm_head" in run:
                    out.append(Exposure(org, d, d, "labels (the next token of every position)"))
                elif "task_head" in run:
                    out.append(Exposure(org, d, d, f"labels (the class of every example, task {plan.orgs[d].task})"))
                else:
                    out.append(Exposure(org, d, d, "the gradients of the hidden states it returns"))
            before = run[-1]
        for layer in range(cfg.num_layers):
            runner = route[Unit("router", layer)]
            heads: dict[str, int] = {}
            experts: dict[str, list[int]] = {}
            for g in range(cfg.num_kv_heads):
                holder = route[Unit("kv", layer, g)]
                if holder not in (runner, d):
                    heads[holder] = heads.get(holder, 0) + 1
            blocked = plan.blocked_experts(d).get(layer, ())  # the others' owned experts never get its tokens
            for e in range(cfg.num_experts):
                holder = route[Unit("expert", layer, e)]
                if e not in blocked and holder not in (runner, d):
                    experts.setdefault(holder, []).append(e)
            for holder, groups in heads.items():
                what = (
                    f"layer {layer}'s normalised hidden states of every token (attention input of "
                    f"{groups * cfg.heads_per_kv_head} query heads) and the gradients of their output"
                )
                out.append(Exposure(holder, runner, d, what))
            for holder, held in experts.items():
                share, how = routed_share(cfg, held, blocked)
                what = (
                    f"layer {layer}'s normalised hidden states of the tokens routed to its {len(held)} experts "
                    f"(~{share:.0%} of tokens under {how}) and the gradients of their output"
                )
                out.append(Exposure(holder, runner, d, what))
            if cfg.num_shared_experts:
                holder = route[Unit("shared_experts", layer)]
                if holder not in (runner, d):
                    what = (
                        f"layer {layer}'s normalised hidden states of every token (shared experts) and their gradients"
                    )
                    out.append(Exposure(holder, runner, d, what))
    step = plan.aggregation.replica_sync == "step"
    shared: dict[tuple[str, str, str], list[str]] = {}  # (receiver, sender, data owner) -> partitions
    for p in plan.partitions:
        if not plan.trained_slices(p.units):  # a frozen base is not averaged: nothing to see
            continue
        group = [o for o in p.holders if o not in p.local_holders]
        for receiver in group:
            for sender in (o for o in group if o != receiver):
                for d in plan.users(p, sender):
                    shared.setdefault((receiver, sender, d), []).append(p.name)
    for (receiver, sender, d), names in shared.items():
        pieces = ", ".join(names)
        what = (
            f"every step's gradients of {pieces} on these batches"
            if step
            else f"the round's average of {pieces}, which mixes in the replica trained on these batches"
        )
        out.append(Exposure(receiver, sender, d, what))
    return out
