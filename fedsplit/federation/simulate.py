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
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..hosting.processes import HostProcesses, HostStartError
from ..plan import Plan
from .rundir import RunPlace
from .server_app import RESULT_FILE, run_result
from .settings import COORDINATOR_ENV, CoordinatorSettings

# Nothing leaves the host and nothing is installed at run time: Flower checks for updates, sends
# telemetry and installs an app's dependencies per run unless told not to.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # the behaviour Ray's FutureWarning announces, without it
}


SETTINGS_FILE = "coordinator.json"  # the coordinator's settings, in the run directory
FLOWER_LOG = "flower.log"  # under the run's logs/: Flower's and the coordinator's log lines


RAY_START_ATTEMPTS = 3


class SimulationFailed(RuntimeError):
    pass


def stop_ray() -> None:
    """Flower shuts Ray down when its backend ends; not when the run failed before that."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def start_ray(init_args: Mapping[str, object], attempts: int = RAY_START_ATTEMPTS) -> None:
    """Start the Ray runtime that Flower's simulation engine then finds running.

    Ray gives its raylet a fixed 30 s to register at start-up; on a busy machine it sometimes
    misses it ("The current node timed out during startup"), and Flower, which starts Ray itself,
    ends the whole simulation on it. Nothing of the run has happened yet, so this starts Ray
    again instead, as Flower would have started it (its ``init_args``, and the driver's
    ``sys.path`` as the workers' PYTHONPATH)."""
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, logging_level=logging.WARNING, **init_args)
            return
        except Exception as e:
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise SimulationFailed(f"Ray did not start ({e}); Flower's simulation engine needs it") from e
            logging.getLogger(__name__).warning(
                "Ray timed out starting (attempt %d of %d); starting it again", attempt, attempts
            )


@contextmanager
def flower_log_in(path: Path) -> Iterator[None]:
    """Flower's log lines (the coordinator's rounds, Flower's own notices) go to ``path``; the
    console keeps Flower's warnings and errors, without colour codes when it is not a terminal,
    and without the notice that ``run_simulation`` is deprecated (this is its caller, by design:
    the simulation engine runs in-process here)."""
    from flwr.common.logger import console_handler

    flwr_log = logging.getLogger("flwr")
    file = logging.FileHandler(path, encoding="utf-8")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    file.setLevel(logging.INFO)
    level, colored, flwr_level = console_handler.level, console_handler.colored, flwr_log.level
    console_handler.setLevel(logging.WARNING)
    console_handler.colored = console_handler.stream.isatty()
    console_handler.addFilter(_not_the_run_simulation_notice)
    flwr_log.addHandler(file)
    flwr_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        flwr_log.removeHandler(file)
        flwr_log.setLevel(flwr_level)
        file.close()
        console_handler.removeFilter(_not_the_run_simulation_notice)
        console_handler.setLevel(level)
        console_handler.colored = colored


def _not_the_run_simulation_notice(record: logging.LogRecord) -> bool:
    return "`run_simulation` function is deprecated" not in record.getMessage()


@dataclass
class SimulationOptions(RunPlace):
    device: str | None = None
    insecure: bool = False
    process_per_org: bool = False
    actors: int = 2


@contextmanager
def simulation_workers(plan: Plan, options: SimulationOptions) -> Iterator[tuple[HostProcesses, CoordinatorSettings]]:
    """The run's worker hosts, serving, and the coordinator's settings for them (written into the
    run directory, with the registry that tells each virtual client which organisation it is);
    the hosts are stopped on the way out."""
    run_dir = options.directory(plan)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    groups = [[org] for org in plan.orgs] if options.process_per_org else [list(plan.orgs)]
    plan_file = options.resolved_plan(plan)
    try:
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
    except HostStartError as e:
        raise SimulationFailed(str(e)) from None
    try:
        registry = run_dir / "simulation.json"
        credentials = str(hosts.credentials) if hosts.credentials else None
        registry.write_text(
            json.dumps({"orgs": list(plan.orgs), "workers": hosts.addresses, "credentials": credentials})
        )
        settings = CoordinatorSettings(
            plan=str(plan_file),
            run_dir=str(run_dir.resolve()),
            resume=options.resume is not None,
            credentials=credentials,
            simulation=str(registry.resolve()),
        )
        settings.write(run_dir / SETTINGS_FILE)
        yield hosts, settings
    finally:
        hosts.close()


@contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """``os.environ[name]`` set to ``value`` inside, and as it was after."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def outcome(run_dir: Path, crash: BaseException | None) -> Path:
    """``run_dir`` if its coordinator finished; else :class:`SimulationFailed` saying why."""
    status = run_result(run_dir)
    if status is None:
        raise SimulationFailed(
            f"the coordinator did not finish ({crash!r}); see {run_dir / 'logs' / FLOWER_LOG} and the "
            f"workers' logs in {run_dir / 'workers'}"
        )
    if status["status"] != "finished":
        raise SimulationFailed(status.get("error", "the coordinator failed"))
    return run_dir


def simulate(plan: Plan, options: SimulationOptions = SimulationOptions(), on_started=None) -> Path:
    """Run every round of ``plan``; returns the run directory. ``on_started(hosts, run_dir)`` is
    called once the workers serve (tests use it to kill one)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from flwr.simulation import run_simulation  # after the environment above is set

    from .client_app import app as client_app
    from .server_app import app as server_app

    run_dir = options.directory(plan)
    crash = None
    # The in-process ServerApp has no run config to read its settings from: it finds them through
    # the environment, for this run only (a later `flwr run` from this process must not).
    with (
        simulation_workers(plan, options) as (hosts, settings),
        environment(COORDINATOR_ENV, str(run_dir / SETTINGS_FILE)),
    ):
        if on_started:
            on_started(hosts, run_dir)
        # The client apps' own output (Flower's "Manually terminating ClientAppActor" at every
        # exit) stays in Ray's session logs; their failures come back in their replies, which the
        # coordinator reports.
        ray_args = {"num_cpus": max(1, options.actors), "include_dashboard": False, "log_to_driver": False}
        start_ray(ray_args)
        try:
            (run_dir / "logs").mkdir(exist_ok=True)
            with flower_log_in(run_dir / "logs" / FLOWER_LOG):
                run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=len(plan.orgs),
                    backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": ray_args},
                )
        except Exception as e:  # the ServerApp's own exception, re-raised by Flower; result.json says why
            crash = e
        finally:
            stop_ray()
    return outcome(run_dir, crash)
