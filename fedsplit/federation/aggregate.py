"""Averaging the replicas of a partition, with Flower's own aggregation code."""

from __future__ import annotations

from typing import Iterable, Mapping

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import Tensor

from ..plan import Plan, reassemble, select, unit_slices


def average_replicas(replicas: Mapping[str, Mapping[str, Tensor]], weights: Mapping[str, float]) -> dict[str, Tensor]:
    """FedAvg of one partition's replicas, weighted by ``weights`` (tokens trained).

    Replicas that trained nothing (weight 0) take the average of the others; if none trained,
    the first replica is returned unchanged.
    """
    trained = [org for org in replicas if weights.get(org, 0) > 0]
    if not trained:
        first = next(iter(replicas.values()))
        return {k: v.clone() for k, v in first.items()}
    records = [
        RecordDict({"arrays": ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in replicas[org].items()}),
                    "metrics": MetricRecord({"weight": float(weights[org])})})
        for org in trained
    ]
    return dict(aggregate_arrayrecords(records, "weight").to_torch_state_dict())


def aggregate_round(plan: Plan, model: Mapping[str, Tensor], local: Mapping[str, Mapping[str, Tensor]],
                    trained: Mapping[str, Mapping[str, Tensor]], metrics: Mapping[str, Mapping[str, float]],
                    alive: Iterable[str]) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """The reassembled full model after a round, and each organisation's local pieces.

    Each partition is averaged within its replica group only: the holders that did not mark it
    local, each weighted by the tokens of the data owners it served this round. Holders that
    marked it local keep their own version; the full model takes the group's average (or, if
    every holder keeps it local, the first one's). A partition that no holder reported keeps
    its last good weights."""
    alive = set(alive)
    tokens = {org: m.get("tokens", 0.0) for org, m in metrics.items()}
    new_local = {org: dict(state) for org, state in local.items()}
    parts = []
    for p in plan.partitions:
        slices = unit_slices(plan.model, p.units)
        keys = [s.key for s in slices]
        reported = [org for org in p.holders if org in trained and org in alive]
        for org in reported:
            if org in p.local_holders:
                new_local.setdefault(org, {}).update({k: trained[org][k] for k in keys})
        group = [org for org in reported if org not in p.local_holders]
        if group:
            replicas = {org: {k: trained[org][k] for k in keys} for org in group}
            served = {org: sum(tokens.get(d, 0.0) for d in plan.users(p, org)) for org in group}
            parts.append(average_replicas(replicas, served))
        elif reported:
            parts.append({k: trained[reported[0]][k] for k in keys})
        else:
            parts.append(select(model, slices))
    return reassemble(plan.model, parts), new_local
