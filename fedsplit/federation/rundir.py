"""A run's directory: ``runs/<name>-<timestamp>/`` with the merged plan, ``metrics.jsonl``,
checkpoints and logs."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..data import TOKENIZER_FILE
from ..plan import Plan
from ..plan.units import describe
from ..runtime.batches import tokenizer_for


def new_run_dir(plan: Plan, root: Path = Path("runs"), suffix: str = "") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{plan.name}-{suffix}" if suffix else plan.name
    path = Path(root) / f"{name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{name}-{stamp}-{n}"
    (path / "logs").mkdir(parents=True)
    write_merged_plan(plan, path / "plan.json")
    tokenizer_for(plan).save(path / TOKENIZER_FILE)  # what `fedsplit generate` decodes with
    return path


@dataclass
class RunPlace:
    """Where a run writes: the run directory being resumed, the fresh one given, or a new one under
    ``runs_root`` (made on first use, so that a caller can watch it before the run starts)."""

    runs_root: Path = Path("runs")
    resume: Path | None = None  # a run directory to continue from its last complete round
    run_dir: Path | None = None

    def directory(self, plan: Plan) -> Path:
        if self.resume is not None:
            return Path(self.resume)
        if self.run_dir is None:
            self.run_dir = new_run_dir(plan, self.runs_root)
        return self.run_dir


def write_merged_plan(plan: Plan, path: Path) -> None:
    """The plan as the coordinator understood it: every organisation's files merged."""
    merged = {
        "name": plan.name,
        "file": str(plan.file),
        "model": plan.model.model_dump(mode="json"),
        "training": plan.training.model_dump(mode="json"),
        "aggregation": plan.aggregation.model_dump(mode="json"),
        "transport": plan.transport.model_dump(mode="json"),
        "orgs": {
            name: {
                "file": str(o.file),
                "device": o.device,
                "train_data": [str(p) for p in o.train_data],
                "eval_data": [str(p) for p in o.eval_data],
                "holds": [e.selector for e in o.entries],
                "local": o.local,
                "address": o.address,
            }
            for name, o in plan.orgs.items()
        },
        "partitions": [
            {
                "name": p.name,
                "units": describe(p.units, plan.model),
                "holders": list(p.holders),
                "local": sorted(p.local_holders),
            }
            for p in plan.partitions
        ],
    }
    path.write_text(json.dumps(merged, indent=2))


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


def evaluation_record(round: int, losses: dict[str, tuple[float, float]]) -> dict:
    """The ``eval`` line of ``metrics.jsonl``: held-out loss and perplexity of the model after
    ``round`` (0: the initial model) per data owner, from ``{owner: (mean loss, tokens)}``, and
    overall (token-weighted)."""
    tokens = sum(n for _, n in losses.values())
    loss = sum(value * n for value, n in losses.values()) / tokens
    return {
        "round": round,
        "event": "eval",
        "loss": loss,
        "ppl": math.exp(loss),
        "tokens": tokens,
        "orgs": {d: {"loss": value, "ppl": math.exp(value), "tokens": n} for d, (value, n) in losses.items()},
    }
