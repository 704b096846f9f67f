"""A classification head on one organisation and the LM objective on another, over the real data
plane (a process per organisation) and through Flower's simulation engine."""

import json

import pytest

from fedsplit.cli import main
from fedsplit.federation.baseline import held_out_task, run_baseline
from fedsplit.federation.checkpoint import latest_checkpoint
from fedsplit.federation.simulate import SimulationOptions, simulate
from fedsplit.federation.verify import verify
from fedsplit.model import MoETransformer
from fedsplit.plan import load_plan
from fedsplit.report import write_report
from fedsplit.runtime import MonolithicTrainer
from fedsplit.runtime.batches import eval_batches_for

from ..reference_training import max_diff, monolithic
from ..unit.test_task_heads import MIXED, TASK_HEAD, write_task_plan


def test_a_task_head_and_the_lm_objective_train_over_grpc_as_the_monolith_does(tmp_path):
    result = verify(load_plan(write_task_plan(tmp_path, MIXED)), steps=10, transport="grpc")
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)
    assert result.loss_mono[0] != result.loss_mono[-1]


@pytest.mark.slow
def test_flower_rounds_with_a_task_head_equal_centralised_training_and_report_its_accuracy(tmp_path):
    plan = load_plan(TASK_HEAD)
    plan = plan.with_training(rounds=2, steps_per_round=2, eval_tokens=1024)
    run_dir = simulate(plan, SimulationOptions(runs_root=tmp_path, insecure=True))
    weights = latest_checkpoint(run_dir / "checkpoints").weights
    MoETransformer(plan.model).load_state_dict(weights, strict=True)
    assert max_diff(weights, monolithic(plan, 4)) <= 1e-5
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["event"] == "eval" and set(last["orgs"]) == {"library", "classifier"}
    expected = held_out_task(MonolithicTrainer(plan, weights), eval_batches_for(plan, "classifier"), "classifier")
    measured = last["orgs"]["classifier"]
    assert measured["task"] == "domain" and measured["examples"] == expected.examples
    assert measured["accuracy"] == expected.accuracy and abs(measured["loss"] - expected.loss) <= 1e-5
    assert last["tasks"]["domain"]["accuracy"] == expected.accuracy
    assert last["ppl"] == last["orgs"]["library"]["ppl"]  # perplexity is the LM owners' alone
    assert f"| domain | {expected.accuracy:.1%} |" in write_report(run_dir).summary.read_text()
    # Replicas kept in step: the centralised baseline evaluates the same model the same way.
    baseline = run_baseline(plan, tmp_path / "baseline")
    centralised = [json.loads(line) for line in (baseline / "metrics.jsonl").read_text().splitlines()][-1]
    assert centralised["tasks"]["domain"]["accuracy"] == expected.accuracy


def test_a_bad_label_stops_a_simulation_at_start_with_its_file_and_line_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "to be", "label": "verse"}\n{"text": "x = 1", "label": "prose"}\n')
    orgs = {**MIXED, "classifier": {**MIXED["classifier"], "data": {"train": str(bad)}}}
    plan = write_task_plan(tmp_path / "plan", orgs)
    for command in (["simulate", "--insecure"], ["baseline"], ["verify", "--transport", "grpc", "--insecure"]):
        where = ["--runs-dir", str(tmp_path / "runs")] if command[0] != "verify" else []
        assert main([command[0], str(plan), *command[1:], *where]) != 0, command
        err = capsys.readouterr().err
        assert f'{bad}:2: label "prose" is not one of the task\'s labels' in err, (command, err)
        assert "Traceback" not in err, command


def test_plan_check_with_data_reads_each_owners_files_and_names_a_bad_line_before_any_run(tmp_path, capsys):
    plan = write_task_plan(tmp_path / "good", MIXED)
    assert main(["plan", "check", str(plan), "--data"]) == 0
    out = capsys.readouterr().out
    assert "plan is valid and its data can be read" in out
    assert "classifier" in out and "domain" in out and "examples" in out and "next-token" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "to be", "label": "verse"}\n{"text": "x = 1", "label": "prose"}\n')
    orgs = {**MIXED, "classifier": {**MIXED["classifier"], "data": {"train": str(bad)}}}
    plan = write_task_plan(tmp_path / "bad", orgs)
    assert main(["plan", "check", str(plan)]) == 0  # the plan itself is valid: only reading the data finds it
    capsys.readouterr()
    assert main(["plan", "check", str(plan), "--data"]) == 1
    captured = capsys.readouterr()
    assert f'{bad}:2: label "prose" is not one of the task\'s labels' in captured.err
    assert "Traceback" not in captured.err and "plan is valid" not in captured.out
