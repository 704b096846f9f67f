"""Aggregating the replicas of each partition within its replica group, with Flower's own code:
FedAvg (``aggregate_arrayrecords``) by default, FedAdam (Flower's ``FedAdam`` strategy, one per
partition) when the plan asks for it, and DiLoCo (an outer Nesterov SGD, torch's own, on the
group's averaged update). FedProx changes the clients' objective, not this step."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import Tensor

from ..plan import Plan, reassemble, select
from ..plan.schema import AggregationConfig


def average_replicas(replicas: Mapping[str, Mapping[str, Tensor]], weights: Mapping[str, float]) -> dict[str, Tensor]:
    """FedAvg of one partition's replicas, weighted by ``weights`` (tokens trained).

    Replicas that trained nothing (weight 0) take the average of the others; if none trained,
    the first replica is returned unchanged. Identical replicas (kept in step every step) are
    returned as they are: their weighted average would only add rounding.
    """
    trained = [org for org in replicas if weights.get(org, 0) > 0]
    first = replicas[trained[0]] if trained else next(iter(replicas.values()))
    if all(torch.equal(replicas[org][k], v) for org in trained for k, v in first.items()):
        return {k: v.clone() for k, v in first.items()}
    return dict(aggregate_arrayrecords(_records(replicas, weights, trained), WEIGHT).to_torch_state_dict())


WEIGHT = "num-examples"  # the metric Flower's strategies weight replies by


def _records(
    replicas: Mapping[str, Mapping[str, Tensor]], weights: Mapping[str, float], orgs: Iterable[str]
) -> list[RecordDict]:
    return [
        RecordDict(
            {
                "arrays": ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in replicas[org].items()}),
                "metrics": MetricRecord({WEIGHT: float(weights[org])}),
            }
        )
        for org in orgs
    ]


@dataclass
class _Reply:
    """The part of a reply Message that Flower's strategies read. A partition's replicas are not
    Messages of their own (one Message carries all of an organisation's partitions)."""

    content: RecordDict

    def has_error(self) -> bool:
        return False


class FedAvgAggregator:
    """Called per partition with (its name, the round, its weights before the round, its replicas
    after the round, their weights); returns its new weights. FedAvg keeps no state, and a
    checkpoint with a server optimizer's state was not written by it."""

    def __call__(
        self,
        partition: str,
        round: int,
        before: Mapping[str, Tensor],
        replicas: Mapping[str, Mapping[str, Tensor]],
        weights: Mapping[str, float],
    ) -> dict[str, Tensor]:
        return average_replicas(replicas, weights)

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            raise ValueError(
                f"{next(iter(state))!r} is a server optimizer's state: the run was trained with another strategy"
            )


class ServerOptimizer(FedAvgAggregator):
    """A server-side step along a replica group's averaged round update. When none of the
    replicas trained there is no update: the weights stay as they were."""

    def __call__(
        self,
        partition: str,
        round: int,
        before: Mapping[str, Tensor],
        replicas: Mapping[str, Mapping[str, Tensor]],
        weights: Mapping[str, float],
    ) -> dict[str, Tensor]:
        trained = {org: r for org, r in replicas.items() if weights.get(org, 0) > 0}
        if not trained:
            return {k: v.clone() for k, v in before.items()}
        return self.step(partition, round, before, trained, weights)

    def step(
        self,
        partition: str,
        round: int,
        before: Mapping[str, Tensor],
        trained: Mapping[str, Mapping[str, Tensor]],
        weights: Mapping[str, float],
    ) -> dict[str, Tensor]:
        raise NotImplementedError


class FedAdamAggregator(ServerOptimizer):
    """Adaptive server optimisation (Reddi et al., FedAdam): each partition's averaged update is a
    pseudo-gradient for a server-side Adam step. One Flower ``FedAdam`` per partition keeps that
    partition's moments; ``state_dict`` / ``load_state_dict`` carry them across a resume."""

    def __init__(self, config: AggregationConfig):
        self.config = config
        self.strategies: dict[str, FedAdam] = {}

    def _strategy(self, partition: str) -> FedAdam:
        if partition not in self.strategies:
            c = self.config
            self.strategies[partition] = FedAdam(
                eta=c.server_lr, beta_1=c.server_betas[0], beta_2=c.server_betas[1], tau=c.server_tau
            )
        return self.strategies[partition]

    def step(
        self,
        partition: str,
        round: int,
        before: Mapping[str, Tensor],
        trained: Mapping[str, Mapping[str, Tensor]],
        weights: Mapping[str, float],
    ) -> dict[str, Tensor]:
        strategy = self._strategy(partition)
        strategy.current_arrays = {k: v.detach().cpu().numpy() for k, v in before.items()}
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.WARNING)  # one "Received N results" line per partition is noise here
        try:
            arrays, _ = strategy.aggregate_train(round, [_Reply(r) for r in _records(trained, weights, trained)])
        finally:
            flwr_log.setLevel(level)
        return {k: torch.from_numpy(np.asarray(a.numpy())).to(before[k].dtype) for k, a in arrays.items()}

    def state_dict(self) -> dict[str, Tensor]:
        state = {}
        for partition, s in self.strategies.items():
            for moment, values in (("m", s.m_t), ("v", s.v_t)):
                for k, v in (values or {}).items():
                    state[f"{partition}::{moment}::{k}"] = torch.from_numpy(np.asarray(v, dtype=np.float32))
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for name, value in state.items():
            partition, moment, key = name.split("::", 2)
            if moment not in ("m", "v"):
                raise ValueError(f"{name!r} is not a FedAdam moment: the run was trained with another strategy")
            s = self._strategy(partition)
            moments = (s.m_t if moment == "m" else s.v_t) or {}
            moments[key] = value.numpy().astype(np.float32)
            if moment == "m":
                s.m_t = moments
            else:
                s.v_t = moments


class DiLoCoAggregator(ServerOptimizer):
    """DiLoCo's outer step (Douillard et al., 2023): a replica group's averaged round update,
    weights before the round minus their FedAvg, is the pseudo-gradient of an outer SGD with
    (Nesterov) momentum, ``torch.optim.SGD`` itself, one momentum buffer per partition.

    Only replicated partitions (two or more holders averaged together) take the outer step: a
    piece held once trains continuously, as in the monolith, and has no round update to
    synchronise. Flower's ``FedAvgM`` is this with heavy-ball momentum only; like it, an outer
    step of rate 1 without momentum is the identity on the average and is skipped, so that
    setting is FedAvg bit for bit."""

    def __init__(self, config: AggregationConfig, replicated: Iterable[str]):
        self.config = config
        self.replicated = frozenset(replicated)
        self.momentum: dict[str, dict[str, Tensor]] = {}  # per partition, per weight

    def step(
        self,
        partition: str,
        round: int,
        before: Mapping[str, Tensor],
        trained: Mapping[str, Mapping[str, Tensor]],
        weights: Mapping[str, float],
    ) -> dict[str, Tensor]:
        average = average_replicas(trained, weights)
        c = self.config
        if partition not in self.replicated or (c.outer_lr == 1 and c.outer_momentum == 0):
            return average
        params = {k: before[k].detach().to(torch.float32, copy=True) for k in average}
        for k, p in params.items():
            p.grad = p - average[k].to(torch.float32)
        outer = torch.optim.SGD(
            list(params.values()),
            lr=c.outer_lr,
            momentum=c.outer_momentum,
            nesterov=c.nesterov and c.outer_momentum > 0,
        )
        for k, buffer in self.momentum.get(partition, {}).items():
            outer.state[params[k]]["momentum_buffer"] = buffer.clone()
        outer.step()
        if c.outer_momentum > 0:
            self.momentum[partition] = {k: outer.state[p]["momentum_buffer"] for k, p in params.items()}
        return {k: p.to(before[k].dtype) for k, p in params.items()}

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{partition}::momentum::{k}": v for partition, m in self.momentum.items() for k, v in m.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for name, value in state.items():
            partition, kind, key = name.split("::", 2)
            if kind != "momentum":
                raise ValueError(f"{name!r} is not DiLoCo momentum: the run was trained with another strategy")
            self.momentum.setdefault(partition, {})[key] = value.to(torch.float32)


def replica_groups(plan: Plan) -> list[str]:
    """The partitions that two or more holders train apart and average each round."""
    return [p.name for p in plan.partitions if len(set(p.holders) - p.local_holders) > 1]


def make_aggregator(plan: Plan) -> FedAvgAggregator:
    config = plan.aggregation
    if config.strategy == "fedadam":
        return FedAdamAggregator(config)
    if config.strategy == "diloco":
        return DiLoCoAggregator(config, replica_groups(plan))
    return FedAvgAggregator()


def unchanged_after_rounds(plan: Plan) -> bool:
    """Whether aggregating a round leaves the trained weights as the organisations hold them: no
    server optimizer (FedAdam steps every partition; DiLoCo only replicated ones) and no replicas
    averaged after the round (none, or kept in step). Then the weights after a round's last step
    are the model the coordinator reassembles, and the data owners can evaluate the run's final
    model inside its last round instead of in a round of its own."""
    if plan.aggregation.strategy == "fedadam":
        return False
    return plan.aggregation.replica_sync == "step" or not any(p.replicated for p in plan.partitions)


def aggregate_round(
    plan: Plan,
    model: Mapping[str, Tensor],
    local: Mapping[str, Mapping[str, Tensor]],
    trained: Mapping[str, Mapping[str, Tensor]],
    metrics: Mapping[str, Mapping[str, float]],
    alive: Iterable[str],
    round: int = 0,
    aggregator: FedAvgAggregator = FedAvgAggregator(),
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """The reassembled model after a round (what trains of it: ``model`` and the result leave a
    fine-tune's frozen base out), and each organisation's local pieces.

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
        slices = plan.trained_slices(p.units)
        if not slices:  # all frozen: the model keeps it as it is
            continue
        keys = [s.key for s in slices]
        reported = [org for org in p.holders if org in trained and org in alive]
        for org in reported:
            if org in p.local_holders:
                new_local.setdefault(org, {}).update({k: trained[org][k] for k in keys})
        group = [org for org in reported if org not in p.local_holders]
        if group:
            replicas = {org: {k: trained[org][k] for k in keys} for org in group}
            served = {org: sum(tokens.get(d, 0.0) for d in plan.users(p, org)) for org in group}
            parts.append(aggregator(p.name, round, select(model, slices), replicas, served))
        elif reported:
            parts.append({k: trained[reported[0]][k] for k in keys})
        else:
            parts.append(select(model, slices))
    return reassemble(plan.model, parts, skip=plan.frozen), new_local
