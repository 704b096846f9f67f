"""Rounds run by the workers themselves: started and collected per organisation in any order,
kept in step by the step barrier, and equal to monolithic training."""

from __future__ import annotations

from pathlib import Path

from fedsplit.federation.aggregate import average_replicas
from fedsplit.hosting.control import COORDINATOR, WorkerControl
from fedsplit.hosting.host import WorkerHost
from fedsplit.plan import load_plan, reassemble, select, unit_slices
from fedsplit.plan.schema import OptimizerConfig
from fedsplit.runtime import initial_weights
from fedsplit.runtime.optim import learning_rate
from fedsplit.runtime.round_spec import RoundSpec

from ..reference_training import max_diff, monolithic

PLANS = Path(__file__).resolve().parents[2] / "configs" / "plans"


def run_rounds(plan, rounds: int, order: list[str], state_dir: Path | None = None):
    """Each round: begin every organisation in ``order`` (data owners first means they start
    before the organisations they call have their weights), collect, average replicas."""
    host = WorkerHost(plan, list(plan.orgs), run="r", credentials=None, state_dir=state_dir)
    controls = {
        org: WorkerControl(org, addr, caller=COORDINATOR, run="r", tls=None, token=None)
        for org, addr in host.addresses.items()
    }
    try:
        for c in controls.values():
            c.connect(host.addresses)
        weights, steps, metrics = initial_weights(plan), plan.training.steps_per_round, []
        for r in range(1, rounds + 1):
            spec = RoundSpec(r, (r - 1) * steps, steps, tuple(plan.data_owners), r - 1)
            for org in order:
                controls[org].begin(spec, select(weights, plan.slices_of(org)))
            metrics.append({org: controls[org].wait(120) for org in reversed(order)})
            states = {org: controls[org].state() for org in plan.orgs}
            parts = []
            for p in plan.partitions:
                keys = [s.key for s in unit_slices(plan.model, p.units)]
                replicas = {org: {k: states[org][k] for k in keys} for org in p.holders}
                tokens = {org: sum(metrics[-1][d]["tokens"] for d in plan.users(p, org)) for org in p.holders}
                parts.append(average_replicas(replicas, tokens))
            weights = reassemble(plan.model, parts)
        return weights, metrics
    finally:
        for c in controls.values():
            c.close()
        host.stop()


def test_rounds_without_replicas_equal_monolithic_training_whatever_the_begin_order():
    plan = load_plan(PLANS / "three-orgs" / "federation.yaml")
    plan = plan.with_settings(training=plan.training.model_copy(update={"steps_per_round": 3}))
    order = ["hospital-a", "experts-c", "compute-b"]  # the data owner starts before its peers hold weights
    weights, metrics = run_rounds(plan, 2, order)
    assert max_diff(weights, monolithic(plan, 6)) <= 1e-5
    assert metrics[1]["hospital-a"]["tokens"] == 3 * plan.training.batch_size * plan.training.seq_len
    assert metrics[1]["hospital-a"]["bytes_sent"] > 0 and metrics[1]["hospital-a"]["bytes_received"] > 0


def test_two_data_owners_step_together_through_their_shared_partitions():
    """The compute and expert hosts serve both hospitals: each step is applied once both
    hospitals finished it. With one step per round and plain SGD, averaging the replicas after
    each round is exactly the monolithic step on both batches."""
    plan = load_plan(PLANS / "two-hospitals" / "federation.yaml")
    plan = plan.with_settings(
        training=plan.training.model_copy(
            update={"steps_per_round": 1, "optimizer": OptimizerConfig(name="sgd", lr=0.05)}
        )
    )
    weights, _ = run_rounds(plan, 3, ["hospital-b", "hospital-a", "compute-c", "experts-d"])
    assert max_diff(weights, monolithic(plan, 3)) <= 1e-5


def test_a_restarted_worker_resumes_from_the_optimizer_state_and_the_schedule_of_the_last_round(tmp_path):
    """Mid-schedule too: the learning rate is a function of the global step, so round 2 after a
    restart steps at the rates of an uninterrupted run."""
    plan = load_plan(PLANS / "three-orgs" / "federation.yaml")
    schedule = {"warmup_steps": 1, "decay": "linear", "min_lr_ratio": 0.2}
    plan = plan.with_training(
        steps_per_round=2, optimizer={**plan.training.optimizer.model_dump(), "schedule": schedule}
    )
    order = ["hospital-a", "compute-b", "experts-c"]
    clean, clean_metrics = run_rounds(plan, 2, order)
    first, _ = run_rounds(plan, 1, order, state_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "compute-b").iterdir()) == ["optimizer-round-0001.safetensors"]

    host = WorkerHost(plan, list(plan.orgs), run="r2", credentials=None, state_dir=tmp_path)  # fresh processes' state
    controls = {
        org: WorkerControl(org, addr, caller=COORDINATOR, run="r2", tls=None, token=None)
        for org, addr in host.addresses.items()
    }
    try:
        for c in controls.values():
            c.connect(host.addresses)
        spec = RoundSpec(2, 2, 2, tuple(plan.data_owners), 1)
        for org in order:
            controls[org].begin(spec, select(first, plan.slices_of(org)))
        resumed_metrics = {org: c.wait(120) for org, c in controls.items()}
        states = {org: controls[org].state() for org in plan.orgs}
    finally:
        host.stop()
    resumed = reassemble(
        plan.model,
        [{s.key: states[p.holders[0]][s.key] for s in unit_slices(plan.model, p.units)} for p in plan.partitions],
    )
    assert max_diff(resumed, clean) == 0.0
    lrs = {k: v for k, v in resumed_metrics["hospital-a"].items() if k.startswith("lr/")}
    assert lrs == {k: v for k, v in clean_metrics[1]["hospital-a"].items() if k.startswith("lr/")}
    assert lrs == {f"lr/{s}": learning_rate(plan.training, s) for s in (2, 3)} and lrs["lr/2"] > lrs["lr/3"]
