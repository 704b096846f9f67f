"""A run's directory: ``runs/<name>-<timestamp>/`` with the merged plan, ``metrics.jsonl``,
checkpoints and logs."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..plan import Plan
from ..plan.units import describe


def new_run_dir(plan: Plan, root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{plan.name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{plan.name}-{stamp}-{n}"
    (path / "logs").mkdir(parents=True)
    write_merged_plan(plan, path / "plan.json")
    return path


def write_merged_plan(plan: Plan, path: Path) -> None:
    """The plan as the coordinator understood it: every organisation's files merged."""
    merged = {
        "name": plan.name, "file": str(plan.file), "model": plan.model.model_dump(mode="json"),
        "training": plan.training.model_dump(mode="json"), "aggregation": plan.aggregation.model_dump(mode="json"),
        "transport": plan.transport.model_dump(mode="json"),
        "orgs": {name: {"file": str(o.file), "device": o.device, "train_data": [str(p) for p in o.train_data],
                        "eval_data": [str(p) for p in o.eval_data], "holds": [e.selector for e in o.entries],
                        "local": o.local, "address": o.address} for name, o in plan.orgs.items()},
        "partitions": [{"name": p.name, "units": describe(p.units, plan.model), "holders": list(p.holders),
                        "local": sorted(p.local_holders)} for p in plan.partitions],
    }
    path.write_text(json.dumps(merged, indent=2))


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended as the run goes."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
