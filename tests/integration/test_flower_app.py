"""``flwr run .`` on the repository: fedsplit as a plain Flower app, run by Flower's own CLI on a
local simulation SuperLink (the Flower 1.42 way), with its run config from ``pyproject.toml``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedsplit.federation.rundir import MetricsLog

from ..conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLWR = Path(sys.executable).parent / "flwr"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_superlinks(flwr_home: Path) -> list[int]:
    """The managed SuperLinks that ``flwr run`` left running for ``flwr_home`` (they outlive it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flower-superlink") for a in args) and str(flwr_home).encode() in b" ".join(args):
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def flwr_run(tmp_path_factory) -> Iterator[Callable[..., str]]:
    """``flwr run <repository> local --stream ARGS`` with a Flower home and ports of its own; its output."""
    flwr_home = tmp_path_factory.mktemp("flwr-home")
    env = {
        **os.environ,
        "PATH": f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}",  # flwr starts flower-superlink by name
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else Flower installs torch into a fresh env
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }

    def run(*args: str) -> str:
        done = subprocess.run(
            [str(FLWR), "run", str(ROOT), "local", "--stream", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        return done.stdout + done.stderr

    try:
        yield run
    finally:
        for pid in _local_superlinks(flwr_home):
            os.kill(pid, signal.SIGTERM)


def test_flwr_run_on_the_repository_trains_a_round_of_the_shipped_plan(flwr_run, tmp_path):
    out = flwr_run("--federation-config", "num-supernodes=3", "-c", f"runs-dir='{tmp_path}' steps=2")
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "result.json").read_text()) == {"status": "finished"}, out
    rounds = [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1]
    assert (run_dir / "checkpoints" / "round-0001").is_dir()
    assert "fedsplit: round 1/1" in out and f"run directory {run_dir}" in out
    assert json.loads((run_dir / "plan.json").read_text())["training"]["steps_per_round"] == 2


def test_flwr_run_with_too_few_supernodes_says_how_many_the_plan_needs_in_one_line(flwr_run, tmp_path):
    out = flwr_run("--federation-config", "num-supernodes=2", "-c", f"runs-dir='{tmp_path}'")
    assert "cannot start: plan 'three-orgs' has 3 organisations" in out
    assert '--federation-config "num-supernodes=3"' in out
    assert "Traceback" not in out
    assert not list(tmp_path.iterdir())  # nothing was started
