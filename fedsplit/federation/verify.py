"""``fedsplit verify``: train through the split runtime and the monolithic model from the same
initial weights on the same batches, and measure how far the parameters drift apart."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..hosting.host import WORKER_THREADS
from ..hosting.processes import ProcessFederation
from ..plan import Plan
from ..plan.schema import OptimizerConfig
from ..runtime import InProcessFederation, MonolithicTrainer, initial_weights, synthetic_batches
from ..runtime.privacy import seeded_noise_keys
from .aggregate import average_replicas


class VerifyError(ValueError):
    pass


@dataclass
class VerifyResult:
    max_abs_diff: float
    max_rel_diff: float  # max over elements of |split - mono| / max(|mono|, 1e-6)
    loss_split: list[float] = field(default_factory=list)
    loss_mono: list[float] = field(default_factory=list)
    worst_parameter: str = ""
    lr: list[float] = field(default_factory=list)  # each step's learning rate (both runs use the same schedule)
    clip_split: list[float] = field(default_factory=list)  # with training.grad_clip: each step's clip factor
    clip_mono: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def verify(
    plan: Plan,
    steps: int,
    device: str = "cpu",
    optimizer: OptimizerConfig | None = None,
    transport: str = "inprocess",
    insecure: bool = False,
) -> VerifyResult:
    """Train ``steps`` steps both ways and compare.

    With replicated partitions the replicas see different batches between averagings, so the
    comparison averages them after every step (a one-step round) and holds exactly only for
    plain SGD, where the average of the replicas' steps is the step on the union of batches,
    unless the plan keeps its replicas in step (``aggregation.replica_sync: step``): they then
    add up their gradients before every step and any optimizer compares exactly.
    """
    if optimizer is not None:
        plan = plan.with_settings(training=plan.training.model_copy(update={"optimizer": optimizer}))
    replicated = [p for p in plan.partitions if p.replicated]
    if plan.aggregation.replica_sync == "step":
        replicated = [p for p in replicated if p.local_holders]  # local replicas are never kept in step
    opt = plan.training.optimizer
    if replicated and not (opt.name == "sgd" and opt.momentum == 0):
        raise VerifyError(
            f"the plan replicates {', '.join(p.name for p in replicated)}: replicas are averaged between "
            f"steps, which equals monolithic training only for plain SGD; rerun with --optimizer sgd, "
            f"or keep the replicas in step (aggregation: {{replica_sync: step}})"
        )
    weights = initial_weights(plan)
    keys = seeded_noise_keys(plan)  # both sides draw the privacy noise from the same keys, run after run
    mono = MonolithicTrainer(plan, weights, device, keys)
    if transport == "grpc":
        # Worker processes compute with one intra-op thread (WORKER_THREADS); the reference
        # uses the same, so that both run the same matmul kernels and blocking.
        threads = torch.get_num_threads()
        torch.set_num_threads(WORKER_THREADS)
        try:
            with ProcessFederation(plan, weights, device, insecure=insecure, noise_keys=keys) as split:
                return _train_and_compare(plan, steps, mono, split, replicated)
        finally:
            torch.set_num_threads(threads)
    split = InProcessFederation(plan, weights, device, noise_keys=keys)
    return _train_and_compare(plan, steps, mono, split, replicated)


def _train_and_compare(plan: Plan, steps: int, mono: MonolithicTrainer, split, replicated) -> VerifyResult:
    result = VerifyResult(0.0, 0.0)
    for step in range(steps):
        batches = synthetic_batches(plan, step)
        reference = mono.train_step(step, batches)
        result.loss_mono.append(reference["loss"])
        result.lr.append(reference["lr"])
        metrics = split.train_step(step, batches)
        result.loss_split.append(_mean_objective(plan, metrics))
        if plan.training.grad_clip is not None:
            result.clip_mono.append(reference["clip_factor"])
            result.clip_split.append(next(iter(metrics.values()))["clip_factor"])
        for p in replicated:
            users = {org: len(plan.users(p, org)) for org in p.holders}
            split.load_partition(p, average_replicas(split.replicas(p), users))
    _compare(split.reassembled(), mono.state_dict(), result)
    return result


def _mean_objective(plan: Plan, metrics: dict[str, dict[str, float]]) -> float:
    """The step's objective as the reference reports it: each data owner's weighted loss, averaged."""
    coef = plan.model.aux_loss_coef
    return sum(plan.objective_weight(d) * (m["loss"] + coef * m["aux_loss"]) for d, m in metrics.items()) / len(metrics)


def _compare(split: dict[str, torch.Tensor], mono: dict[str, torch.Tensor], result: VerifyResult) -> None:
    for name, ref in mono.items():
        diff = (split[name].cpu() - ref).abs()
        worst = float(diff.max())
        rel = float((diff / ref.abs().clamp_min(1e-6)).max())
        if worst > result.max_abs_diff:
            result.max_abs_diff, result.worst_parameter = worst, name
        result.max_rel_diff = max(result.max_rel_diff, rel)
