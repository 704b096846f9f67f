"""The federation through the real Flower runtime (simulation engine) and the real data plane:
rounds, aggregation, reassembly, checkpoints, resume and failing organisations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsplit.data import batches_for
from fedsplit.federation.checkpoint import latest_checkpoint
from fedsplit.federation.simulate import SimulationOptions, simulate
from fedsplit.federation.verify import initial_weights
from fedsplit.model import MoETransformer
from fedsplit.plan import load_plan
from fedsplit.runtime import MonolithicTrainer

PLANS = Path(__file__).resolve().parents[1] / "configs" / "plans"

pytestmark = pytest.mark.slow


def small_plan(name: str, rounds: int, steps: int, **training):
    plan = load_plan(PLANS / name / "federation.yaml")
    plan.training = plan.training.model_copy(update={"rounds": rounds, "steps_per_round": steps, **training})
    return plan


def monolithic(plan, total_steps: int) -> dict[str, torch.Tensor]:
    mono = MonolithicTrainer(plan, initial_weights(plan))
    sources = {d: batches_for(plan, d) for d in plan.data_owners}
    for step in range(total_steps):
        mono.train_step(step, {d: sources[d](step) for d in plan.data_owners})
    return mono.state_dict()


def max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def test_simulated_rounds_without_replicas_equal_monolithic_training(tmp_path):
    plan = small_plan("three-orgs", rounds=2, steps=3)
    run_dir = simulate(plan, SimulationOptions(runs_root=tmp_path))
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.round == 2
    assert max_diff(ckpt.weights, monolithic(plan, 6)) <= 1e-5
    MoETransformer(plan.model).load_state_dict(ckpt.weights, strict=True)
    rounds = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["orgs"]["hospital-a"]["bytes_sent"] > 0
    assert json.loads((run_dir / "plan.json").read_text())["name"] == "three-orgs"
