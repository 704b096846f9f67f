"""``fedsplit report``: PNG plots and a Markdown summary from a run's metrics.jsonl, with or
without a baseline, and with older metrics that lack evaluation or expert load."""

from __future__ import annotations

import json
import math

import pytest

from fedsplit.cli import main
from fedsplit.federation.rundir import evaluation_record
from fedsplit.report import ReportError, dead_experts, expert_groups, figure_title, read_rounds, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _round(r: int, loss: float, full: bool = True) -> list[dict]:
    """A round line and, with ``full``, its expert load and the eval line the coordinator writes."""
    org = {"aux_loss": 0.02, "step_s": 0.1, "bytes_sent": 1_500_000 * r, "bytes_received": 900_000}
    record = {
        "event": "round",
        "round": r,
        "seconds": 2.0 + r,
        "loss": loss,
        "tokens": 1024,
        "orgs": {
            "hospital-a": {**org, "loss": loss + 0.1, "tokens": 512},
            "hospital-b": {**org, "loss": loss - 0.1, "tokens": 512},
            "compute-c": {**org, "loss": 0.0, "tokens": 0},
        },
    }
    if not full:
        return [record]
    record["expert_load"] = {str(layer): [0.1, 0.15, 0.125, 0.125, 0.1, 0.15, 0.125, 0.125] for layer in range(4)}
    return [record, evaluation_record(r, {"hospital-a": (loss + 0.05, 4096.0), "hospital-b": (loss - 0.05, 4096.0)})]


def _run(path, losses, full=True, extra=()):
    path.mkdir(parents=True)
    lines = [json.dumps(line) for r, loss in enumerate(losses, start=1) for line in _round(r, loss, full)]
    lines += [json.dumps(e) for e in extra]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_report_writes_plots_and_summary(tmp_path):
    run = _run(
        tmp_path / "run",
        [5.0, 4.2, 3.6],
        extra=[{"event": "round-failed", "round": 4, "failed": [], "gone": ["compute-c"]}],
    )
    report = write_report(run)
    assert report.directory == run / "report"
    assert {p.name for p in report.plots} == {"loss.png", "wire.png", "expert_load.png", "expert_load_rounds.png"}
    for plot in report.plots:
        assert plot.read_bytes()[:8] == PNG and plot.stat().st_size > 5_000
    summary = report.summary.read_text()
    assert "| 3 | 3.6000 | 3.6000 | 36.60 | 1,024 | 5.0 | 13.50 |" in summary  # 3 orgs x 4.5 MB sent in round 3
    assert "![loss](loss.png)" in summary and "hospital-b" in summary and not report.notes


def test_dead_experts_are_named_and_every_figure_is_titled_with_the_plan_and_run(tmp_path):
    run = _run(tmp_path / "run-7", [5.0, 4.2])
    (run / "plan.json").write_text(json.dumps({"name": "two-hospitals"}))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        if line["event"] == "round" and line["round"] == 2:
            line["expert_load"]["1"] = [0.3, 0.3, 0.2, 0.19, 0.005, 0.005, 0.0, 0.0]  # 0.0125 = a tenth of uniform
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert dead_experts(read_rounds(run)) == (2, {"1": [4, 5, 6, 7]})
    assert figure_title(run) == "plan two-hospitals, run run-7"
    summary = write_report(run).summary.read_text()
    assert summary.startswith("# Report: plan two-hospitals, run run-7")
    assert (
        "Dead experts in round 2 (under 0.1 of a uniform share of their layer's routed tokens): layer 1: 4, 5, 6, 7"
        in summary
    )


def test_report_compares_with_a_baseline(tmp_path):
    run = _run(tmp_path / "run", [5.0, 4.2])
    base = _run(tmp_path / "base", [4.9, 4.0])
    report = write_report(run, baseline=base, out=tmp_path / "out")
    assert (tmp_path / "out" / "baseline.png").read_bytes()[:8] == PNG
    summary = report.summary.read_text()
    assert (
        "baseline eval ppl" in summary
        and f"{math.exp(4.0):.2f}" in summary
        and f"{100 * (math.exp(0.2) - 1):+.1f}%" in summary
    )


def test_older_metrics_skip_their_plots_and_say_so(tmp_path):
    run = _run(tmp_path / "run", [5.0, 4.2], full=False)
    report = write_report(run)
    assert [p.name for p in report.plots] == ["loss.png", "wire.png"]
    summary = report.summary.read_text()
    assert "no held-out evaluation" in summary and "no expert_load" in summary


def test_a_run_without_rounds_is_an_error(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ReportError, match="metrics.jsonl does not exist"):
        write_report(tmp_path / "run")


def test_cli_report(tmp_path, capsys):
    run = _run(tmp_path / "run", [5.0, 4.2])
    assert main(["report", str(run)]) == 0
    assert "summary.md" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nowhere")]) == 1


def test_a_resumed_run_repairs_a_metrics_log_that_a_crash_cut_short(tmp_path):
    from fedsplit.federation.rundir import MetricsLog

    run = _run(tmp_path / "run", [5.0, 4.2])
    log = MetricsLog(run / "metrics.jsonl")
    round_3 = {"event": "round", "round": 3, "loss": 3.6, "tokens": 1024, "checkpoint": "round-0003"}
    with open(log.path, "a") as f:
        f.write('{"event": "round", "round": 3, "lo')  # the crash: checkpoint 3 written, its log line half
    assert [r["round"] for r in log.read() if r["event"] == "round"] == [1, 2]
    log.resume_after(3, round_3)  # what the coordinator does when it resumes from checkpoint 3
    log.resume_after(3, round_3)  # twice (a second crash before round 4): still one line for round 3
    assert [r["round"] for r in log.read() if r["event"] == "round"] == [1, 2, 3]
    assert [r["round"] for r in read_rounds(run)] == [1, 2, 3]


def test_the_expert_load_of_a_hierarchical_router_is_drawn_by_group(tmp_path):
    run = _run(tmp_path / "run", [5.0, 4.2])
    assert expert_groups(run) is None  # no plan.json
    model = {"num_experts": 8, "router": {"kind": "hierarchical", "groups": 4}}
    (run / "plan.json").write_text(json.dumps({"model": model}))
    assert expert_groups(run) == 4
    (run / "plan.json").write_text(json.dumps({"model": {"num_experts": 8}}))
    assert expert_groups(run) is None  # a top-k router
    (run / "plan.json").write_text(json.dumps({"model": model}))
    plots = {p.name: p for p in write_report(run).plots}
    assert plots["expert_load.png"].read_bytes()[:8] == PNG
