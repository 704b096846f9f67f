"""The ``fedsplit`` command as a user runs it."""

import json
import subprocess
import sys

from fedsplit.cli import main

from ..conftest import PLANS, ROOT


def test_plan_check_prints_each_org_and_partition(capsys):
    assert main(["plan", "check", str(PLANS / "three-orgs" / "federation.yaml")]) == 0
    out = capsys.readouterr().out
    for text in ("hospital-a", "compute-b", "experts-c", "layers.2-3.experts.4-7", "plan is valid", "MiB"):
        assert text in out


def test_plan_check_marks_replicated_partitions(capsys):
    assert main(["plan", "check", str(PLANS / "two-hospitals" / "federation.yaml")]) == 0
    assert "replicated" in capsys.readouterr().out


def test_plan_check_says_how_replicas_are_kept_together(capsys, tmp_path):
    src = PLANS / "two-hospitals"
    text = (
        (src / "federation.yaml")
        .read_text()
        .replace("aggregation: {strategy: fedavg}", "aggregation: {strategy: fedavg, replica_sync: step}")
    )
    (tmp_path / "federation.yaml").write_text(
        text.replace("model: ../../models/", f"model: {ROOT}/configs/models/").replace(
            "orgs: [orgs/*.yaml]", f"orgs: [{src}/orgs/*.yaml]"
        )
    )
    assert main(["plan", "check", str(tmp_path / "federation.yaml")]) == 0
    assert "add up their gradients every step" in capsys.readouterr().out
    assert main(["plan", "check", str(src / "federation.yaml")]) == 0
    assert "averaged after each round" in capsys.readouterr().out
    (tmp_path / "federation.yaml").write_text(
        (tmp_path / "federation.yaml").read_text().replace("strategy: fedavg, replica_sync: step", "strategy: diloco")
    )
    assert main(["plan", "check", str(tmp_path / "federation.yaml")]) == 0
    assert "then take an outer SGD step (DiLoCo: rate 0.7, momentum 0.9, Nesterov)" in capsys.readouterr().out


def test_plan_check_exits_1_and_names_the_problem_on_an_invalid_plan(capsys, tmp_path):
    (tmp_path / "orgs").mkdir()
    (tmp_path / "federation.yaml").write_text(
        f"name: bad\nmodel: {ROOT}/configs/models/tiny.yaml\norgs: [orgs/*.yaml]\n"
    )
    (tmp_path / "orgs" / "a.yaml").write_text(
        "org: a\ndata: {train: a.yaml}\nholds: [embed, layers.0-7, final_norm, lm_head]\n"
    )
    assert main(["plan", "check", str(tmp_path / "federation.yaml")]) == 1
    err = capsys.readouterr().err
    assert "org 'a'" in err and "layers.0-7" in err and "outside the model" in err


def test_verify_json_reports_the_differences_and_both_loss_curves():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsplit.cli",
            "verify",
            str(PLANS / "experts" / "federation.yaml"),
            "--steps",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout)
    assert set(result) >= {"max_abs_diff", "max_rel_diff", "loss_split", "loss_mono"}
    assert result["max_abs_diff"] <= 1e-5 and len(result["loss_split"]) == len(result["loss_mono"]) == 2


def test_the_command_and_its_help_import_no_torch():
    probe = "import sys, fedsplit.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
    out = subprocess.run([sys.executable, "-m", "fedsplit.cli", "--help"], capture_output=True, text=True, check=True)
    assert "plan" in out.stdout and "simulate" in out.stdout and "examples:" in out.stdout


def test_the_client_app_relays_without_importing_torch():
    """Deployed, Flower starts a process per message for the ClientApp: importing torch there
    cost 3-7 s of every round (docs/performance.md)."""
    probe = "import sys, fedsplit.federation.client_app; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


def test_the_end_of_a_run_points_to_the_logs_where_they_are(tmp_path):
    from fedsplit.cli.runs import run_contents

    (tmp_path / "logs").mkdir()
    assert run_contents(tmp_path) == "metrics.jsonl, checkpoints/, plan.json"  # an empty logs/ is not named
    (tmp_path / "workers").mkdir()
    for i in range(2):
        (tmp_path / "workers" / f"host-{i}.log").write_text("")
    assert run_contents(tmp_path).endswith("; logs: workers/host-0.log, workers/host-1.log")
    for i in range(2, 6):
        (tmp_path / "workers" / f"host-{i}.log").write_text("")
    assert run_contents(tmp_path).endswith("workers/host-2.log and 3 more")


def test_credentials_without_the_ca_key_leave_none_behind(tmp_path):
    from fedsplit.transport.security import generate_credentials

    generate_credentials(["a"], tmp_path)
    assert (tmp_path / "ca.key").exists()
    generate_credentials(["a"], tmp_path, keep_ca_key=False)  # a resumed run's fresh credentials
    assert (tmp_path / "ca.pem").exists() and not (tmp_path / "ca.key").exists()


def test_client_takes_the_federation_file_first_like_every_command(capsys):
    common = ["--org", "a", "--superlink", "127.0.0.1:1", "--data-plane-address", "127.0.0.1:2", "--insecure"]
    assert main(["client", *common]) == 2
    assert "give the federation YAML file once, first: fedsplit client FEDERATION --org ORG" in capsys.readouterr().err
    assert main(["client", "a.yaml", *common, "--plan", "b.yaml"]) == 2
    assert "(got a.yaml and b.yaml)" in capsys.readouterr().err
    help_text = subprocess.run(
        [sys.executable, "-m", "fedsplit.cli", "client", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: fedsplit client FEDERATION --org ORG" in help_text and "--plan" not in help_text
