"""The micro-step loop, in one place: a batch cut into micro-batches, each forward then backward,
gradients accumulating until the step. The split runtime's data owners and the monolithic
reference both run their batches through it, with their own forward.

Schedules: ``sequential`` runs micro-batches one after another (the deterministic reference);
``gpipe`` runs every forward, then every backward, with micro-batches in flight across
organisations; ``1f1b`` starts a micro-batch's backward as soon as its forward is done and keeps
at most ``max_in_flight`` micro-batches' activations alive.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

from torch import Tensor

from ..plan import Plan
from .threads import compute_pool


@dataclass(frozen=True)
class MicroBatchLoss:
    objective: Tensor  # what backward differentiates: this micro-batch's share of the step's objective
    ce: float  # its mean cross-entropy
    aux: float  # its load-balancing loss


def owner_objective(plan: Plan, data_owner: str, ce: Tensor, aux: Tensor) -> Tensor:
    """A data owner's micro-batch share of its objective: ``(ce + aux_loss_coef * aux)`` times its
    weight (:meth:`~fedsplit.plan.Plan.objective_weight`, not multiplied when 1, so that plans
    without tasks compute the same bits), over the micro-batches."""
    weight = plan.objective_weight(data_owner)
    objective = ce + plan.model.aux_loss_coef * aux
    return (objective if weight == 1.0 else objective * weight) / plan.training.micro_batches


Forward = Callable[[int, Tensor, Tensor], MicroBatchLoss]  # (micro-batch, tokens, labels)
Backward = Callable[[int, Tensor], None]  # (micro-batch, objective)


def run_micro_batches(
    tokens: Tensor,
    labels: Tensor,
    count: int,
    forward: Forward,
    backward: Backward,
    schedule: str = "sequential",
    max_in_flight: int = 0,
) -> dict[str, float]:
    """Forward and backward ``count`` micro-batches of one batch; their mean cross-entropy and
    aux loss (``loss``, ``aux_loss``), summed objective and tokens."""
    mbs = list(zip(tokens.chunk(count), labels.chunk(count)))
    losses: list[MicroBatchLoss] = [None] * len(mbs)  # type: ignore[list-item]

    def forward_one(mb: int) -> None:
        losses[mb] = forward(mb, *mbs[mb])

    def backward_one(mb: int) -> None:
        backward(mb, losses[mb].objective)

    if schedule == "sequential" or len(mbs) == 1:
        for mb in range(len(mbs)):
            forward_one(mb)
            backward_one(mb)
    else:
        run_schedule(schedule, len(mbs), max_in_flight or len(mbs), forward_one, backward_one)
    return {
        "loss": sum(m.ce for m in losses) / len(mbs),
        "aux_loss": sum(m.aux for m in losses) / len(mbs),
        "objective": sum(m.objective.item() for m in losses),
        "tokens": float(tokens.numel()),
    }


def run_schedule(
    schedule: str, n: int, max_in_flight: int, forward: Callable[[int], None], backward: Callable[[int], None]
) -> None:
    """Run ``forward(i)`` and ``backward(i)`` for micro-batches ``0..n-1`` on threads.

    ``gpipe``: every forward in flight at once, then the backwards. ``1f1b``: at most
    ``max_in_flight`` micro-batches hold activations; a micro-batch's backward starts as soon as
    its forward is done, while later forwards run. Backwards run one at a time in micro-batch
    order, so every partition adds up its gradients in the same order as the monolithic model
    (no reassociation: layer and expert partitions stay bitwise exact). The first exception
    propagates."""
    if schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"unknown schedule {schedule!r}")
    limit = n if schedule == "gpipe" else max(1, min(n, max_in_flight))
    with compute_pool(limit + 1, "fedsplit-mb") as pool:
        forwards: dict[Future, int] = {}
        forwarded: set[int] = set()
        running_backward: Future | None = None
        started = finished = 0
        while finished < n:
            while started < n and started - finished < limit:
                forwards[pool.submit(forward, started)] = started
                started += 1
            ready = finished in forwarded and (schedule == "1f1b" or len(forwarded) == n)
            if running_backward is None and ready:
                running_backward = pool.submit(backward, finished)
            pending = [*forwards, *([running_backward] if running_backward else [])]
            for future in wait(pending, return_when=FIRST_COMPLETED).done:
                future.result()
                if future is running_backward:
                    running_backward = None
                    finished += 1
                else:
                    forwarded.add(forwards.pop(future))
