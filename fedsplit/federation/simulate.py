"""``fedsplit simulate``: a whole federation on this host through Flower's simulation engine.

The organisations' workers live in worker host processes (all in one by default: one torch
runtime and one CUDA context for the host; or one per organisation), talking over the gRPC data
plane on loopback. Flower runs the coordinator and one virtual client per organisation; the
clients only begin and collect rounds, so a couple of Ray actors serve any number of them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..hosting.processes import HostProcesses
from ..plan import Plan
from .rundir import RunPlace
from .server_app import RESULT_FILE
from .settings import COORDINATOR_ENV, SIMULATION_ENV, CoordinatorSettings

# Nothing leaves the host and nothing is installed at run time: Flower checks for updates, sends
# telemetry and installs an app's dependencies per run unless told not to.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
}


class SimulationFailed(RuntimeError):
    pass


@dataclass
class SimulationOptions(RunPlace):
    device: str | None = None
    insecure: bool = False
    process_per_org: bool = False
    actors: int = 2


def simulate(plan: Plan, options: SimulationOptions = SimulationOptions(), on_started=None) -> Path:
    """Run every round of ``plan``; returns the run directory. ``on_started(hosts, run_dir)`` is
    called once the workers serve (tests use it to kill one)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from flwr.common.logger import console_handler
    from flwr.simulation import run_simulation  # after the environment above is set

    console_handler.colored = console_handler.stream.isatty()  # no colour codes in a log file or a pipe

    from .client_app import app as client_app
    from .server_app import app as server_app

    run_dir = options.directory(plan)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    groups = [[org] for org in plan.orgs] if options.process_per_org else [list(plan.orgs)]
    plan_file = options.resolved_plan(plan)
    hosts = HostProcesses(
        plan,
        groups,
        run_dir / "workers",
        plan_file=plan_file,
        run=run_dir.name,
        device=options.device,
        insecure=options.insecure,
        state_dir=run_dir / "workers" / "state",
    )
    try:
        registry = run_dir / "simulation.json"
        registry.write_text(
            json.dumps(
                {
                    "orgs": list(plan.orgs),
                    "workers": hosts.addresses,
                    "credentials": str(hosts.credentials) if hosts.credentials else None,
                }
            )
        )
        settings = CoordinatorSettings(
            plan=str(plan_file),
            run_dir=str(run_dir),
            resume=options.resume is not None,
            credentials=str(hosts.credentials) if hosts.credentials else None,
        )
        os.environ[SIMULATION_ENV] = str(registry)
        os.environ[COORDINATOR_ENV] = str(settings.write(run_dir / "coordinator.json"))
        if on_started:
            on_started(hosts, run_dir)
        logging.getLogger("flwr").setLevel(logging.INFO)
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=len(plan.orgs),
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {"num_cpus": max(1, options.actors), "include_dashboard": False},
                },
            )
        except Exception as e:  # the ServerApp's own exception, re-raised by Flower; result.json says why
            crash = e
        else:
            crash = None
    finally:
        hosts.close()
    result = run_dir / RESULT_FILE
    if not result.exists():
        raise SimulationFailed(f"the coordinator did not finish ({crash!r}); see the log above and {run_dir}")
    outcome = json.loads(result.read_text())
    if outcome["status"] != "finished":
        raise SimulationFailed(outcome.get("error", "the coordinator failed"))
    return run_dir
