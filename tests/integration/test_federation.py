"""The federation through the real Flower runtime (simulation engine) and the real data plane:
rounds, aggregation, reassembly, checkpoints, resume and failing organisations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedsplit.federation.baseline import held_out_loss
from fedsplit.federation.checkpoint import latest_checkpoint, load_checkpoint
from fedsplit.federation.settings import COORDINATOR_ENV
from fedsplit.federation.simulate import SimulationFailed, SimulationOptions, simulate
from fedsplit.model import MoETransformer
from fedsplit.plan import load_plan
from fedsplit.plan.schema import AggregationConfig, OptimizerConfig
from fedsplit.runtime import MonolithicTrainer, initial_weights
from fedsplit.runtime.batches import eval_batches_for

from ..reference_training import max_diff, monolithic

PLANS = Path(__file__).resolve().parents[2] / "configs" / "plans"

pytestmark = pytest.mark.slow


def small_plan(name: str, rounds: int, steps: int, **training):
    plan = load_plan(PLANS / name / "federation.yaml")
    plan = plan.with_settings(
        training=plan.training.model_copy(update={"rounds": rounds, "steps_per_round": steps, **training})
    )
    return plan


def test_simulated_rounds_without_replicas_equal_monolithic_training(tmp_path):
    plan = small_plan("three-orgs", rounds=2, steps=3)
    run_dir = simulate(plan, SimulationOptions(runs_root=tmp_path))
    # The in-process ServerApp's settings are found through the environment for that run only: a
    # later `flwr run` from this process (tests/integration/test_flower_app.py) ran an old run's.
    assert COORDINATOR_ENV not in os.environ
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.round == 2
    assert max_diff(ckpt.weights, monolithic(plan, 6)) <= 1e-5
    MoETransformer(plan.model).load_state_dict(ckpt.weights, strict=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["orgs"]["hospital-a"]["bytes_sent"] > 0
    assert rounds[0]["orgs"]["compute-b"]["bytes_sent"] > 0  # its calls to experts-c count too
    for org, m in rounds[0]["orgs"].items():  # how long its message and reply took through Flower
        assert 0 < m["flower_in_s"] < rounds[0]["seconds"] and 0 < m["flower_back_s"] < rounds[0]["seconds"], org
    assert json.loads((run_dir / "plan.json").read_text())["name"] == "three-orgs"
    credentials = run_dir / "workers" / "credentials"  # the run's own CA signs nothing after it started
    assert (credentials / "ca.pem").exists() and not (credentials / "ca.key").exists()
    for layer, load in rounds[-1]["expert_load"].items():
        assert len(load) == plan.model.num_experts and abs(sum(load) - 1) < 1e-6, layer


@pytest.mark.parametrize("name", ["three-orgs", "u-shape-3"])
def test_held_out_evaluation_through_the_split_model_equals_the_reassembled_models(tmp_path, monkeypatch, name):
    """Each round the data owners evaluate the weights they received (the previous round's
    reassembled model) on held-out batches through the split model; the last model is evaluated
    after the last step where nothing changes it after the round (three-orgs: no replicas), else
    in a final zero-step round (u-shape-3 averages its replicas). Each equals the monolithic
    model's evaluation of the checkpoint."""
    from fedsplit.federation import server_app

    plan = small_plan(name, rounds=2, steps=2, eval_tokens=512)
    extra_rounds = []
    evaluate_final = server_app.Coordinator.evaluate_final
    monkeypatch.setattr(
        server_app.Coordinator, "evaluate_final", lambda self: (extra_rounds.append(1), evaluate_final(self))
    )
    run_dir = simulate(plan, SimulationOptions(runs_root=tmp_path, insecure=True))
    assert len(extra_rounds) == (0 if name == "three-orgs" else 1)
    evals = {
        r["round"]: r
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["event"] == "eval"
    }
    assert sorted(evals) == [0, 1, 2]
    models = {
        0: initial_weights(plan),
        **{r: load_checkpoint(run_dir / "checkpoints" / f"round-{r:04d}").weights for r in (1, 2)},
    }
    for r, weights in models.items():
        for owner in plan.data_owners:
            expected, tokens = held_out_loss(MonolithicTrainer(plan, weights), eval_batches_for(plan, owner), owner)
            assert evals[r]["orgs"][owner]["tokens"] == tokens
            assert abs(evals[r]["orgs"][owner]["loss"] - expected) <= 1e-5, (r, owner)
    assert evals[2]["loss"] < evals[0]["loss"]  # something was learned through the split path


def test_three_org_plan_with_every_partition_kind_averages_replicas_exactly(tmp_path):
    """Layer, expert and head partitions, ends replicated on two data owners. With one SGD step
    per round, averaging the replicas by tokens is exactly the monolithic step on both batches."""
    plan = small_plan("u-shape-3", rounds=2, steps=1, optimizer=OptimizerConfig(name="sgd", lr=0.05))
    run_dir = simulate(plan, SimulationOptions(runs_root=tmp_path))
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    MoETransformer(plan.model).load_state_dict(ckpt.weights, strict=True)
    assert max_diff(ckpt.weights, monolithic(plan, 2)) <= 1e-5


def test_replicas_kept_in_step_make_rounds_of_adamw_equal_centralised_training(tmp_path):
    """With ``replica_sync: step`` the replicated ends add up their gradients every step, so R
    rounds of S AdamW steps through Flower equal R*S monolithic steps on all owners' batches."""
    plan = small_plan(
        "u-shape-3", rounds=2, steps=2, optimizer=OptimizerConfig(name="adamw", lr=3e-4)
    )  # as in test_split_exactness
    plan = plan.with_settings(aggregation=plan.aggregation.model_copy(update={"replica_sync": "step"}))
    run_dir = simulate(plan, SimulationOptions(runs_root=tmp_path, insecure=True))
    assert max_diff(latest_checkpoint(run_dir / "checkpoints").weights, monolithic(plan, 4)) <= 1e-5


def test_deterministic_runs_with_several_data_owners_repeat_bitwise(tmp_path):
    """Both data owners' batches go through compute-c at once; with training.deterministic their
    gradients are added up in owner order, not arrival order, so two runs give the same bits."""
    plan = small_plan("u-shape-3", rounds=2, steps=3, deterministic=True, schedule="1f1b")
    runs = [simulate(plan, SimulationOptions(runs_root=tmp_path / str(i), insecure=True)) for i in range(2)]
    first, second = (latest_checkpoint(r / "checkpoints").weights for r in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (
        max_diff(first, monolithic(plan, 6)) > 0
    )  # replicas averaged per round: not the monolith, but the same every time


def test_diloco_through_the_simulation_is_fedavg_at_rate_one_and_checkpoints_its_momentum(tmp_path):
    """The coordinator's outer step on the replicated ends: at outer_lr 1 without momentum it is
    FedAvg bit for bit (deterministic runs repeat bitwise); with the paper's settings it moves the
    ends elsewhere and each checkpoint holds the momentum of exactly the replicated partitions."""
    plan = small_plan("u-shape-3", rounds=2, steps=2, deterministic=True, schedule="1f1b")
    settings = {
        "fedavg": AggregationConfig(strategy="fedavg"),
        "rate-one": AggregationConfig(strategy="diloco", outer_lr=1.0, outer_momentum=0.0),
        "diloco": AggregationConfig(strategy="diloco"),
    }
    ckpt = {
        name: latest_checkpoint(
            simulate(plan.with_settings(aggregation=a), SimulationOptions(runs_root=tmp_path / name, insecure=True))
            / "checkpoints"
        )
        for name, a in settings.items()
    }
    fedavg, rate_one, diloco = (ckpt[n].weights for n in settings)
    assert all(torch.equal(fedavg[k], rate_one[k]) for k in fedavg)
    replicated = {p.name for p in plan.partitions if len(p.holders) > 1}
    assert {name.split("::")[0] for name in ckpt["diloco"].server_state} == replicated
    ends = [k for k in fedavg if k.startswith(("embed", "lm_head"))]
    assert ends and all(not torch.equal(fedavg[k], diloco[k]) for k in ends)


def test_owned_experts_cross_flower_only_between_their_holder_and_the_coordinator(tmp_path, monkeypatch):
    """Through the real simulation: each organisation's Flower messages, both ways, carry no other
    owner's experts, and the run equals the monolith routed the same way (experts bitwise)."""
    from fedsplit.federation import server_app

    plan = small_plan("owned-experts", rounds=2, steps=2)
    sent: dict[str, set[str]] = {}
    returned: dict[str, set[str]] = {}
    weights_of, run_round = server_app.Coordinator._weights_of, server_app.Coordinator._run_round

    def spy_sent(self, org):
        weights = weights_of(self, org)
        sent.setdefault(org, set()).update(weights)
        return weights

    def spy_returned(self, make_spec):
        spec, outcome = run_round(self, make_spec)
        for org, reply in outcome.replies.items():
            returned.setdefault(org, set()).update(reply.content["arrays"].keys())
        return spec, outcome

    monkeypatch.setattr(server_app.Coordinator, "_weights_of", spy_sent)
    monkeypatch.setattr(server_app.Coordinator, "_run_round", spy_returned)
    run_dir = simulate(plan, SimulationOptions(runs_root=tmp_path, insecure=True))
    owned = {org: {f"layers.{u.layer}.moe.experts.{u.index}." for u in o.owned_experts} for org, o in plan.orgs.items()}
    assert set(sent) == set(returned) == set(plan.orgs)
    for org in plan.orgs:
        for messages in (sent[org], returned[org]):
            foreign = [
                k
                for k in messages
                for other, prefixes in owned.items()
                if other != org
                for p in prefixes
                if k.startswith(p)
            ]
            assert not foreign, (org, foreign[:3])
    assert any(k.startswith("layers.2.moe.experts.6.") for k in sent["hospital-a"] & returned["hospital-a"])
    final = latest_checkpoint(run_dir / "checkpoints").weights
    assert max_diff(final, monolithic(plan, 4)) <= 1e-5


def test_noised_activations_and_gradients_through_flower_equal_the_monolith_and_report_the_privacy_spent(tmp_path):
    """privacy.activations and privacy.gradients in a simulated run: the data owner noises what
    leaves it in its worker, the run equals the monolith noised alike, and each round's metrics
    carry its ε of both mechanisms."""
    import dataclasses

    from fedsplit.plan.schema import ActivationNoise, GradientNoise, PrivacyConfig
    from fedsplit.report import write_report
    from fedsplit.runtime.batches import batches_for
    from fedsplit.runtime.privacy import KEY_FILE, epsilon, noise_key

    plan = small_plan("layers", rounds=2, steps=2)
    privacy = PrivacyConfig(
        activations=ActivationNoise(clip=1.0, noise_multiplier=1.0),
        gradients=GradientNoise(clip=5e-3, noise_multiplier=1.0),
    )
    plan = dataclasses.replace(plan, privacy=privacy)
    run_dir = simulate(plan, SimulationOptions(runs_root=tmp_path, insecure=True))
    key_file = run_dir / "workers" / "state" / "hospital-a" / KEY_FILE  # the data owner's secret, never sent
    assert key_file.stat().st_mode & 0o077 == 0
    keys = {"hospital-a": noise_key(key_file.parent)}
    assert max_diff(latest_checkpoint(run_dir / "checkpoints").weights, monolithic(plan, 4, keys)) == 0.0
    assert max_diff(latest_checkpoint(run_dir / "checkpoints").weights, monolithic(plan, 4)) > 0  # other secrets
    rounds = [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())]
    spent = [r["privacy"] for r in rounds if r["event"] == "round"]
    tokens = batches_for(plan, "hospital-a").tokens
    assert [s["epsilon"]["hospital-a"] for s in spent] == pytest.approx(
        [epsilon(plan, "hospital-a", 2, tokens), epsilon(plan, "hospital-a", 4, tokens)]
    )
    assert spent[0]["delta"] == 1e-5 and 0 < spent[0]["epsilon"]["hospital-a"] < spent[1]["epsilon"]["hospital-a"]
    assert "Privacy spent (privacy's noise, ε at δ = 1e-05" in write_report(run_dir).summary.read_text()


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedsplit.cli", *args], capture_output=True, text=True, **kwargs)


def wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def test_a_killed_and_resumed_coordinator_reaches_the_weights_of_a_clean_run(tmp_path):
    fed = str(PLANS / "three-orgs" / "federation.yaml")
    common = ["--rounds", "3", "--steps", "2", "--insecure"]
    clean = run_cli("simulate", fed, "--runs-dir", str(tmp_path / "clean"), *common)
    assert clean.returncode == 0, clean.stderr[-3000:]
    printed = clean.stdout + clean.stderr  # a successful run prints what the user needs, in plain text
    assert "\x1b[" not in printed and "deprecated" not in printed and "ClientAppActor" not in printed
    assert "--insecure" in clean.stderr and "Warning" not in printed
    run_dir = next((tmp_path / "clean").iterdir())
    assert "fedsplit: round 3/3" in (run_dir / "logs" / "flower.log").read_text()  # the rest is in the run's log
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsplit.cli", "simulate", fed, "--runs-dir", str(tmp_path / "killed"), *common],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "killed").glob("*/checkpoints/round-0001/manifest.json")):
            assert time.monotonic() < deadline and proc.poll() is None, "round 1 never completed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the coordinator, Ray and the workers all at once
        proc.wait()
    run_dir = next((tmp_path / "killed").iterdir())
    assert latest_checkpoint(run_dir / "checkpoints").round < 3
    resumed = run_cli("simulate", fed, "--resume", str(run_dir), *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = latest_checkpoint(run_dir / "checkpoints")
    assert final.round == 3
    # Not bitwise: a worker that serves two data owners adds their gradients in the order their
    # backward calls arrive, which differs from run to run by a rounding step (7e-9 seen).
    assert (
        max_diff(final.weights, latest_checkpoint(next((tmp_path / "clean").iterdir()) / "checkpoints").weights) <= 1e-6
    )


def kill_after_round_one(org: str):
    def on_started(hosts, run_dir):
        def watch():
            wait_for(run_dir / "checkpoints" / "round-0001" / "manifest.json")
            hosts.kill(org)

        threading.Thread(target=watch, daemon=True).start()

    return on_started


@pytest.mark.parametrize("replica_sync", ["round", "step"])
def test_a_dead_data_owner_is_reported_and_the_others_go_on_with_its_replicas(tmp_path, replica_sync):
    """With replicas kept in step the survivor's gradient exchange with the dead holder fails
    (it does not wait for it) and the rerun keeps the survivors' replicas in step without it."""
    plan = small_plan("two-hospitals", rounds=3, steps=20)
    plan = plan.with_settings(aggregation=plan.aggregation.model_copy(update={"replica_sync": replica_sync}))
    run_dir = simulate(
        plan,
        SimulationOptions(runs_root=tmp_path, process_per_org=True, insecure=True),
        on_started=kill_after_round_one("hospital-b"),
    )
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    failed = [e for e in events if e["event"] == "round-failed"]
    assert failed and failed[0]["gone"] == ["hospital-b"] and "hospital-b" in failed[0]["failed"]
    rounds = [e for e in events if e["event"] == "round"]
    assert [e["round"] for e in rounds] == [1, 2, 3]
    assert "hospital-b" in rounds[0]["alive"] and "hospital-b" not in rounds[-1]["alive"]
    assert rounds[-1]["orgs"].keys() == {"hospital-a", "compute-c", "experts-d"}


def test_a_dead_organisation_without_replicas_stops_the_run_with_a_clear_error(tmp_path):
    plan = small_plan("u-shape-3", rounds=3, steps=20)
    with pytest.raises(SimulationFailed) as err:
        simulate(
            plan,
            SimulationOptions(runs_root=tmp_path, process_per_org=True, insecure=True),
            on_started=kill_after_round_one("hospital-b"),
        )
    assert "layers.2.experts.4-7" in str(err.value) and "no organisation left" in str(err.value)
    assert latest_checkpoint(next(tmp_path.iterdir()) / "checkpoints").round >= 1  # the last good weights stay


def test_a_hierarchical_router_with_capacity_through_flower_equals_the_monolith_and_reports_its_drops(tmp_path):
    from fedsplit.report import write_report

    from ..unit.test_router_kinds import plan_with

    (tmp_path / "plan").mkdir()
    router = {"kind": "hierarchical", "groups": 4, "group_top_k": 2, "capacity_factor": 1.0}
    plan = plan_with(tmp_path / "plan", "three-orgs", top_k=1, router=router)
    plan = plan.with_training(rounds=2, steps_per_round=2)
    run_dir = simulate(plan, SimulationOptions(runs_root=tmp_path / "runs", insecure=True))
    assert max_diff(latest_checkpoint(run_dir / "checkpoints").weights, monolithic(plan, 4)) <= 1e-5
    rounds = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == "round"]
    for r in rounds:
        assert set(r["capacity_dropped"]) == {str(layer) for layer in range(plan.model.num_layers)}
        assert all(0 < f < 1 for f in r["capacity_dropped"].values())
    assert "Expert capacity dropped in round 2" in write_report(run_dir).summary.read_text()
