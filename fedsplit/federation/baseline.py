"""The centralised baseline: the monolithic model trained on every data owner's batches together,
with the federation's rounds, steps, optimizer and token budget, evaluated on the same held-out
batches. Its run directory has the same ``metrics.jsonl`` lines (``round`` and ``eval``) and
checkpoints as a federated run, so the two compare round by round (``fedsplit report --baseline``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from ..plan import Plan
from ..runtime import MonolithicTrainer, initial_weights
from ..runtime.batches import batches_for, eval_batches_for
from ..runtime.driver import held_out_metrics
from .checkpoint import CHECKPOINTS, plan_hash, write_checkpoint
from .rundir import MetricsLog, TaskHeldOut, evaluation_record, new_run_dir

Progress = Callable[[int, int, dict], None]  # (step done, total steps, step metrics)


def _held_out(trainer: MonolithicTrainer, batches: list[tuple[Tensor, Tensor]], data_owner: str, round: int):
    return held_out_metrics([trainer.evaluate(tok, lab, data_owner, round) for tok, lab in batches], batches)


def held_out_loss(
    trainer: MonolithicTrainer, batches: list[tuple[Tensor, Tensor]], data_owner: str, round: int = 0
) -> tuple[float, float]:
    """(token-weighted mean cross-entropy, tokens) of ``data_owner``'s held-out batches, routed
    and noised as the split model evaluates them at the start of ``round``."""
    m = _held_out(trainer, batches, data_owner, round)
    return m["eval_loss"], m["eval_tokens"]


def held_out_task(
    trainer: MonolithicTrainer, batches: list[tuple[Tensor, Tensor]], data_owner: str, round: int = 0
) -> TaskHeldOut:
    """A task's data owner's held-out loss and accuracy (over its examples), as the split model
    evaluates them at the start of ``round``."""
    m = _held_out(trainer, batches, data_owner, round)
    return TaskHeldOut(trainer.plan.orgs[data_owner].task, m["eval_loss"], m["eval_accuracy"], m["eval_examples"])


def held_out_record(trainer: MonolithicTrainer, held_out: dict[str, list[tuple[Tensor, Tensor]]], r: int) -> dict:
    """The ``eval`` record of the model after round ``r``, on each data owner's held-out batches."""
    plan = trainer.plan
    lm = {d: held_out_loss(trainer, b, d, r + 1) for d, b in held_out.items() if plan.orgs[d].task is None}
    tasks = {d: held_out_task(trainer, b, d, r + 1) for d, b in held_out.items() if plan.orgs[d].task is not None}
    return evaluation_record(r, lm, tasks)


def run_baseline(
    plan: Plan, runs_root: Path = Path("runs"), device: str = "cpu", on_step: Progress | None = None
) -> Path:
    t = plan.training
    run_dir = new_run_dir(plan, runs_root, suffix="baseline")
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    trainer = MonolithicTrainer(plan, initial_weights(plan), device)
    owners = plan.data_owners
    sources = {d: batches_for(plan, d) for d in owners}
    held_out = {d: eval_batches_for(plan, d) for d in owners} if t.eval_tokens else {}

    def evaluate(r: int) -> None:
        if held_out:
            metrics.write(held_out_record(trainer, held_out, r))

    evaluate(0)
    total = t.rounds * t.steps_per_round
    for r in range(1, t.rounds + 1):
        started = time.monotonic()
        ce = {d: 0.0 for d in owners}
        tokens = {d: 0.0 for d in owners}
        for step in range((r - 1) * t.steps_per_round, r * t.steps_per_round):
            batches = {d: sources[d](step) for d in owners}
            out = trainer.train_step(step, batches)
            for d in owners:
                ce[d] += out[f"ce/{d}"] / t.steps_per_round
                tokens[d] += float(batches[d][0].numel())
            if on_step:
                on_step(step + 1, total, out)
        all_tokens = sum(tokens.values())
        record = {
            "round": r,
            "event": "round",
            "steps": t.steps_per_round,
            "seconds": time.monotonic() - started,
            "loss": sum(ce[d] * tokens[d] for d in owners) / all_tokens,
            "tokens": all_tokens,
            "orgs": {d: {"loss": ce[d], "tokens": tokens[d]} for d in owners},
            "alive": owners,
        }
        path = write_checkpoint(
            run_dir / CHECKPOINTS,
            r,
            trainer.state_dict(),
            {},
            {"plan": plan.name, "plan_hash": plan_hash(plan), "run": run_dir.name, "baseline": True, "metrics": record},
        )
        metrics.write({**record, "checkpoint": str(path)})
        evaluate(r)
    return run_dir
