"""A run's directory: ``runs/<name>-<timestamp>/`` with the run's resolved plan (``plan.json``),
``metrics.jsonl``, checkpoints and logs."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..data import TOKENIZER_FILE
from ..plan import Plan, write_resolved
from ..runtime.batches import tokenizer_for
from .checkpoint import CHECKPOINTS, SkippedCheckpoint, newest_usable_round

PLAN_FILE = "plan.json"  # the run's resolved plan: what every process of the run loads


def find_run_plan(start: Path) -> Path | None:
    """The run's ``plan.json`` in ``start`` (a directory, or a file's directory) or up to three
    directories above it (run/checkpoints/round-NNNN/model.safetensors), if there is one."""
    first = start if start.is_dir() else start.parent
    return next((d / PLAN_FILE for d in (first, *list(first.parents)[:3]) if (d / PLAN_FILE).exists()), None)


def new_run_dir(plan: Plan, root: Path = Path("runs"), suffix: str = "") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{plan.name}-{suffix}" if suffix else plan.name
    path = Path(root) / f"{name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{name}-{stamp}-{n}"
    (path / "logs").mkdir(parents=True)
    write_resolved(plan, path / PLAN_FILE)
    tokenizer_for(plan).save(path / TOKENIZER_FILE)  # what `fedsplit generate` decodes with
    return path


@dataclass
class RunPlace:
    """Where a run writes: the run directory being resumed, the fresh one given, or a new one under
    ``runs_root`` (made on first use, so that a caller can watch it before the run starts)."""

    runs_root: Path = Path("runs")
    resume: Path | None = None  # a run directory to continue from its last complete round
    run_dir: Path | None = None
    _resumable: bool = field(default=False, init=False, repr=False)

    def directory(self, plan: Plan) -> Path:
        """The run directory. Resuming, its checkpoints are checked first (once), so that a run
        with no usable round stops here, before any worker starts, naming each bad file
        (:class:`~fedsplit.interop.CheckpointError`)."""
        if self.resume is not None:
            if not self._resumable:
                newest_usable_round(Path(self.resume) / CHECKPOINTS)
                self._resumable = True
            return Path(self.resume)
        if self.run_dir is None:
            self.run_dir = new_run_dir(plan, self.runs_root)
        return self.run_dir

    def resolved_plan(self, plan: Plan) -> Path:
        """The run's resolved plan, written (again, when resuming) into its directory."""
        return write_resolved(plan, self.directory(plan) / PLAN_FILE).resolve()


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended as the run goes."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _complete(self) -> tuple[bytes, int]:
        """The file's bytes and where its complete lines end (a crash can cut the last one short)."""
        data = self.path.read_bytes() if self.path.exists() else b""
        return data, data.rfind(b"\n") + 1

    def read(self) -> list[dict]:
        """The records; a last line that a crash cut short is left out."""
        data, end = self._complete()
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]

    def resume_after(self, round: int, record: dict | None) -> None:
        """Before a resumed run appends: drop a line that a crash cut short, and log ``round``'s
        ``record`` (its checkpoint keeps it) when the crash came after the checkpoint was written
        but before this log was."""
        data, end = self._complete()
        if end < len(data):
            os.truncate(self.path, end)
        logged = any(r.get("event") == "round" and r.get("round") == round for r in self.read())
        if record is not None and not logged:
            self.write(record)


def evaluation_record(
    round: int, losses: dict[str, tuple[float, float]], tasks: dict[str, TaskHeldOut] | None = None
) -> dict:
    """The ``eval`` line of ``metrics.jsonl``: the held-out metrics of the model after ``round``
    (0: the initial model) per data owner. Next-token prediction from ``losses``, ``{owner: (mean
    loss, tokens)}``: loss and perplexity, and overall (token-weighted; absent when every owner
    trains a task). Tasks from ``tasks``, ``{owner: TaskHeldOut}``: loss and accuracy per owner,
    and per task under ``tasks`` (example-weighted)."""
    record: dict = {"round": round, "event": "eval"}
    tokens = sum(n for _, n in losses.values())
    if tokens:
        loss = sum(value * n for value, n in losses.values()) / tokens
        record.update(loss=loss, ppl=math.exp(loss), tokens=tokens)
    record["orgs"] = {d: {"loss": value, "ppl": math.exp(value), "tokens": n} for d, (value, n) in losses.items()}
    tasks = tasks or {}
    record["orgs"].update({d: t._asdict() for d, t in tasks.items()})
    if tasks:
        record["tasks"] = {}
        for name in dict.fromkeys(t.task for t in tasks.values()):
            mine = [t for t in tasks.values() if t.task == name]
            examples = sum(t.examples for t in mine)
            record["tasks"][name] = {
                "loss": sum(t.loss * t.examples for t in mine) / examples,
                "accuracy": sum(t.accuracy * t.examples for t in mine) / examples,
                "examples": examples,
            }
    return record


class TaskHeldOut(NamedTuple):
    """A task's data owner's held-out metrics: its task, mean loss and accuracy over its examples."""

    task: str
    loss: float
    accuracy: float
    examples: float


def skipped_checkpoint_record(skipped: SkippedCheckpoint, resumed_from: int) -> dict:
    """The ``checkpoint-skipped`` line of ``metrics.jsonl``: a resume passed over ``skipped``'s
    round (the file at fault and why) and went on from round ``resumed_from``."""
    return {
        "round": skipped.round,
        "event": "checkpoint-skipped",
        "path": str(skipped.error.file),
        "reason": skipped.error.reason,
        "resumed_from": resumed_from,
    }
