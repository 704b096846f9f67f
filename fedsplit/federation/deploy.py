"""Deployment on separate machines: ``fedsplit coordinator`` and ``fedsplit client``.

    coordinator machine    flower-superlink (started here, or one already running)
                           flwr run <app> -> the ServerApp (fedsplit.federation.server_app)
    each organisation      its worker: partitions, optimizer, data-plane server (this process, long-lived)
                           flower-supernode -> a ClientApp process per message, which drives the worker

Flower carries one message per organisation per round; activations and gradients go between
the workers over the data plane. Both planes use the credentials of ``fedsplit certs``: the
SuperLink serves TLS with the coordinator's certificate, SuperNodes trust the same CA, and each
organisation proves its name to the coordinator with its token when it registers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..hosting.host import WorkerHost
from ..plan import Plan
from ..plan.schema import host_port
from .checkpoint import layout_hash
from .rundir import RunPlace
from .server_app import RELEASE_TIMEOUT_S, RESULT_FILE, run_result
from .settings import COORDINATOR_ENV, CoordinatorSettings
from .simulate import QUIET_ENV

FLWR_RUN_LOG = "flwr-run.log"  # what `flwr run --stream` prints: the ServerApp's log
SUPERNODE_LOG = "supernode.log"  # in a client's state directory
SUPERNODE_RESTARTS = 3  # SuperNodes a client starts again after one is killed before joining a run
CONNECTION = "fedsplit"  # the one SuperLink connection in the run's own FLWR_HOME (never Flower's hosted default)
COORDINATOR_CERT = "coordinator"


class DeploymentError(RuntimeError):
    pass


def absolute(credentials: Path | None) -> Path | None:
    """The credentials directory as an absolute path: Flower's processes run in other
    directories and refuse relative certificate paths."""
    return Path(credentials).resolve() if credentials is not None else None


def split_address(address: str) -> tuple[str, int]:
    """Host and port of an address to listen on or connect to (no host: every interface)."""
    try:
        return host_port(address, default_host="0.0.0.0")
    except ValueError as e:
        raise DeploymentError(str(e)) from None


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Flower's processes with their own home, nothing installed at run time, no telemetry, and
    this Python's scripts first on PATH (the SuperLink and SuperNode start Flower's other
    executables by name)."""
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def wait_for_port(address: str, timeout: float, proc: subprocess.Popen | None = None, what: str = "server") -> None:
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeploymentError(f"the {what} exited with code {proc.returncode} before it listened on {address}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise DeploymentError(f"the {what} did not listen on {address} within {timeout:.0f} s")


def wait_until_closed(address: str, timeout: float, stop_waiting: Callable[[], bool] = lambda: False) -> bool:
    """Until nothing listens on ``address`` (True), or ``timeout`` passes or ``stop_waiting()``
    (False)."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop_waiting():
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.2)
    return False


def start(command: list[str], **popen) -> subprocess.Popen:
    """A Flower process in its own process group (so that stopping it reaches the processes it
    starts) that gets SIGTERM when this process dies, even by SIGKILL (Linux), so that a killed
    coordinator or client leaves no SuperLink or SuperNode holding its port."""
    return subprocess.Popen(command, start_new_session=True, preexec_fn=_terminate_with_parent, **popen)


def _terminate_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group (Flower's processes start children of their own), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


# -- coordinator --------------------------------------------------------------------------------


@dataclass
class CoordinatorOptions(RunPlace):
    superlink: str | None = None  # a running SuperLink's control address; None: start one here
    listen: str = "0.0.0.0:9093"  # where the SuperLink started here listens
    credentials: Path | None = None  # `fedsplit certs` output; None only with insecure
    insecure: bool = False
    node_timeout_s: float = 300.0
    start_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self.credentials = absolute(self.credentials)


def write_app(app_dir: Path) -> Path:
    """The Flower app `flwr run` submits: only a pyproject.toml naming fedsplit's installed
    ServerApp and ClientApp (every machine has fedsplit installed; nothing is installed at run time)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(f"""[project]
name = "fedsplit-app"
version = "{__version__}"
description = "fedsplit coordinator and clients"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedsplit"

[tool.flwr.app.components]
serverapp = "fedsplit.federation.server_app:app"
clientapp = "fedsplit.federation.client_app:app"

[tool.flwr.app.config]
fedsplit-settings = ""
""")
    return app_dir


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'
    )


def superlink_command(listen: str, credentials: Path | None, database: Path) -> list[str]:
    """The SuperLink keeps its state in ``database`` (SQLite): a SuperLink restarted with the
    coordinator (``--resume``) still knows the SuperNodes, which then rejoin. In memory, a
    round's replies reached it faster (3-7 s instead of 8-18 s from 4 SuperNodes on 2 cores),
    but after a restart no SuperNode could rejoin."""
    host, port = split_address(listen)
    tls = (
        [
            "--ssl-ca-certfile",
            str(credentials / "ca.pem"),
            "--ssl-certfile",
            str(credentials / f"{COORDINATOR_CERT}.pem"),
            "--ssl-keyfile",
            str(credentials / f"{COORDINATOR_CERT}.key"),
        ]
        if credentials
        else ["--insecure"]
    )
    return [
        executable("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        *tls,
        "--database",
        str(database),
        "--disable-runtime-dependency-installation",
    ]


def run_coordinator(plan: Plan, options: CoordinatorOptions) -> Path:
    """Run every round of ``plan`` through a SuperLink that the organisations' clients join; returns
    the run directory (``runs/<name>-<stamp>/``, with ``flwr/`` holding Flower's home and logs)."""
    if options.credentials is None and not options.insecure:
        raise DeploymentError("give the coordinator's credentials (fedsplit certs), or insecure explicitly")
    run_dir = options.directory(plan)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    flwr_home = run_dir / "flwr"
    env = flower_env(flwr_home)
    settings = CoordinatorSettings(
        plan=str(options.resolved_plan(plan)),
        run_dir=str(run_dir.resolve()),
        resume=options.resume is not None,
        node_timeout_s=options.node_timeout_s,
        one_message_per_round=True,
        credentials=str(options.credentials) if options.credentials else None,
        release_clients=True,
    )
    settings_file = settings.write(run_dir / "coordinator.json").resolve()
    superlink = None
    try:
        if options.superlink is None:
            log = open(run_dir / "logs" / "superlink.log", "ab")
            superlink = start(
                superlink_command(options.listen, options.credentials, run_dir / "superlink.db"),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            host, port = split_address(options.listen)
            address = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
            wait_for_port(address, options.start_timeout_s, superlink, "SuperLink")
        else:
            address = options.superlink
        write_connection(flwr_home, address, options.credentials / "ca.pem" if options.credentials else None)
        app_dir = write_app(run_dir / "app")
        flwr_log = run_dir / "logs" / FLWR_RUN_LOG
        with open(flwr_log, "ab") as out:
            flwr = subprocess.run(
                [
                    executable("flwr"),
                    "run",
                    str(app_dir),
                    CONNECTION,
                    "--stream",
                    "-c",
                    f"fedsplit-settings='{settings_file}'",
                ],
                env={**env, COORDINATOR_ENV: str(settings_file)},
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_terminate_with_parent,
            )
    finally:
        if superlink is not None:
            stop(superlink)
    outcome = run_result(run_dir)
    if outcome is None:  # `flwr run` exits 0 even when the ServerApp failed: the result file decides
        raise DeploymentError(
            f"the coordinator did not finish (flwr run exited {flwr.returncode}); "
            f"the end of {flwr_log}:\n{tail(flwr_log)}"
        )
    if outcome["status"] != "finished":
        raise DeploymentError(outcome.get("error", "the coordinator failed"))
    return run_dir


def tail(path: Path, lines: int = 12) -> str:
    """The last ``lines`` lines of a log, for an error message."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


# -- client -------------------------------------------------------------------------------------


@dataclass
class ClientOptions:
    org: str
    superlink: str  # the SuperLink's fleet address, HOST:PORT
    data_plane_address: str  # where the other organisations reach this worker, HOST:PORT
    bind: str = "0.0.0.0"  # the interface the worker listens on
    credentials: Path | None = None
    insecure: bool = False
    device: str | None = None
    state_dir: Path = Path("fedsplit-state")
    supernode_port: int = 0  # the SuperNode's local API port for its ClientApps; 0: any free one
    keep_serving: bool = False  # serve further runs after the coordinator ends one (else exit)

    def __post_init__(self) -> None:
        self.credentials = absolute(self.credentials)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supernode_command(plan: Plan, options: ClientOptions, port: int) -> list[str]:
    site = {
        "org": options.org,
        "worker": options.data_plane_address,
        "address": options.data_plane_address,
        "layout": layout_hash(plan),
    }
    if options.credentials:
        site["credentials"] = str(options.credentials)
    else:
        site["insecure"] = True
    node_config = " ".join(f"{k}={json.dumps(v)}" for k, v in site.items())
    tls = ["--root-certificates", str(options.credentials / "ca.pem")] if options.credentials else ["--insecure"]
    return [
        executable("flower-supernode"),
        "--superlink",
        options.superlink,
        *tls,
        "--port",
        str(port),
        "--node-config",
        node_config,
    ]


@dataclass(frozen=True)
class ClientEnd:
    """How a client ended: its exit code and why, in words."""

    code: int
    why: str


def run_client(plan: Plan, options: ClientOptions) -> ClientEnd:
    """Serve this organisation's worker and its SuperNode until the coordinator says the run is
    over (unless ``keep_serving``), the SuperNode ends, or a signal."""
    if options.credentials is None and not options.insecure:
        raise DeploymentError("give this organisation's credentials (fedsplit certs), or insecure explicitly")
    if options.org not in plan.orgs:
        raise DeploymentError(f"plan {plan.name!r} has no organisation {options.org!r}; it has {', '.join(plan.orgs)}")
    _, port = split_address(options.data_plane_address)
    state_dir = Path(options.state_dir)
    host = WorkerHost(
        plan,
        [options.org],
        run=None,
        credentials=options.credentials,
        host=options.bind,
        ports={options.org: port},
        device=options.device,
        state_dir=state_dir / "optimizer",
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    supernode_log = state_dir / SUPERNODE_LOG

    def start_supernode() -> subprocess.Popen:
        return start(
            supernode_command(plan, options, options.supernode_port or free_port()),
            env=flower_env(state_dir / "flwr"),
            stdout=open(supernode_log, "ab"),
            stderr=subprocess.STDOUT,
        )

    supernode = start_supernode()
    restarts = 0
    ended = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: ended.append(signum))

    def released() -> bool:
        return host.run_ended and not options.keep_serving

    try:
        while not ended and not released():
            if supernode.poll() is None:
                time.sleep(0.5)
                continue
            # A SuperNode killed by a signal before this organisation joined a run (gRPC's poller
            # aborts now and then at start-up under load) has left nothing behind: start another.
            if supernode.returncode >= 0 or restarts >= SUPERNODE_RESTARTS or host.began_a_round:
                break
            restarts += 1
            print(
                f"{options.org}: the SuperNode ended with code {supernode.returncode} before joining a run; "
                f"starting it again ({restarts} of {SUPERNODE_RESTARTS})",
                flush=True,
            )
            supernode = start_supernode()
        if released() and not ended:  # let the SuperNode send its reply: until the SuperLink goes
            wait_until_closed(options.superlink, RELEASE_TIMEOUT_S, lambda: bool(ended) or supernode.poll() is not None)
    finally:
        stop(supernode)
        host.stop()
    if ended:
        return ClientEnd(0, f"stopped by signal {signal.Signals(ended[0]).name}")
    if released():
        return ClientEnd(0, "the coordinator finished the run")
    return ClientEnd(
        supernode.returncode if supernode.returncode >= 0 else 1,  # < 0: ended by a signal
        f"the SuperNode exited with code {supernode.returncode}; the end of {supernode_log}:\n{tail(supernode_log)}",
    )
