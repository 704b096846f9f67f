"""Averaging the replicas of a partition, with Flower's own aggregation code."""

from __future__ import annotations

from typing import Mapping

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import Tensor


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
