"""`fedsplit coordinator` and `fedsplit client` as separate processes, as on separate machines:
a real SuperLink and SuperNodes, TLS and tokens on both planes, on loopback and (where this
machine allows it) with every organisation in its own network namespace and address."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedsplit.federation.checkpoint import latest_checkpoint
from fedsplit.federation.deploy import FLWR_RUN_LOG, free_port, wait_until_closed
from fedsplit.federation.rundir import MetricsLog
from fedsplit.model import MoETransformer
from fedsplit.plan import load_plan

from ..reference_training import max_diff, monolithic

ROOT = Path(__file__).resolve().parents[2]
PLANS = ROOT / "configs" / "plans"
ORGS = ("hospital-a", "hospital-b", "compute-c")

pytestmark = pytest.mark.slow


def sgd_plan(tmp_path: Path) -> Path:
    """u-shape-3 (layer, expert and head partitions, replicated ends on two data owners) with one
    SGD step per round: then averaging replicas by tokens equals the monolithic step exactly."""
    source = PLANS / "u-shape-3"
    fed = tmp_path / "federation.yaml"
    fed.write_text(f"""name: u-shape-3-sgd
model: {(PLANS.parent / "models" / "tiny.yaml").resolve()}
training: {{rounds: 2, steps_per_round: 1, batch_size: 4, seq_len: 64, micro_batches: 2,
           optimizer: {{name: sgd, lr: 0.05}}, seed: 0}}
orgs: [{source.resolve()}/orgs/*.yaml]
""")
    return fed


def fedsplit(*args: str, prefix: tuple[str, ...] = (), log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "fedsplit.cli", *args],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def own_credentials(creds: Path, name: str) -> Path:
    """What one party is given of `fedsplit certs` output: the CA certificate, every token's
    verifier, and its own certificate, key and token; nobody else's secrets."""
    mine = creds.parent / f"creds-{name}"
    mine.mkdir()
    for file in ("ca.pem", "verifiers.yaml", f"{name}.pem", f"{name}.key", f"{name}.token"):
        shutil.copy(creds / file, mine / file)
    return mine


@dataclass
class Deployment:
    """What starting the coordinator or a client takes: the plan, each party's own credentials,
    the SuperLink's address and each organisation's host (and command prefix)."""

    tmp_path: Path
    fed: Path
    own: dict[str, Path]
    superlink: str
    org_hosts: dict[str, str]
    prefixes: dict[str, tuple[str, ...]]

    @classmethod
    def prepare(
        cls, tmp_path: Path, coordinator_host: str, org_hosts: dict[str, str], prefixes: dict[str, tuple[str, ...]]
    ) -> Deployment:
        fed = sgd_plan(tmp_path)
        creds = tmp_path / "creds"
        made = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedsplit.cli",
                "certs",
                str(fed),
                "--out",
                str(creds),
                "--hosts",
                "localhost",
                coordinator_host,
                *set(org_hosts.values()),
            ],
            capture_output=True,
            text=True,
        )
        assert made.returncode == 0, made.stderr
        own = {name: own_credentials(creds, name) for name in (*ORGS, "coordinator")}
        return cls(tmp_path, fed, own, f"{coordinator_host}:{free_port()}", org_hosts, prefixes)

    @property
    def runs(self) -> Path:
        return self.tmp_path / "runs"

    def coordinator(self, *extra: str, log: str = "coordinator.log") -> subprocess.Popen:
        return fedsplit(
            "coordinator",
            str(self.fed),
            "--listen",
            self.superlink,
            "--credentials",
            str(self.own["coordinator"]),
            "--runs-dir",
            str(self.runs),
            "--node-timeout",
            "1200",  # clients start slowly on a busy machine; the run itself is what the test waits on
            *extra,
            log=self.tmp_path / log,
        )

    def clients(self) -> list[subprocess.Popen]:
        return [
            fedsplit(
                "client",
                str(self.fed),
                "--org",
                org,
                "--superlink",
                self.superlink,
                "--data-plane-address",
                f"{self.org_hosts[org]}:{free_port()}",
                "--credentials",
                str(self.own[org]),
                "--state-dir",
                str(self.tmp_path / org),
                prefix=self.prefixes.get(org, ()),
                log=self.tmp_path / f"{org}.log",
            )
            for org in ORGS
        ]

    def run_dir(self) -> Path:
        (run_dir,) = self.runs.iterdir()
        return run_dir


STALL_S = 300.0  # how long a deployment may write nothing at all before a test calls it stuck


def last_write(directory: Path) -> float:
    """When anything under ``directory`` (logs, run directory, state) was last written."""
    return max((p.stat().st_mtime for p in directory.rglob("*") if p.is_file()), default=0.0)


def exit_code(proc: subprocess.Popen, watched: Path, what: str) -> int:
    """``proc``'s exit code, waiting as long as the deployment under ``watched`` keeps writing
    (a slow machine makes the test slower, not red); stuck for STALL_S, it fails."""
    while True:
        try:
            return proc.wait(5)
        except subprocess.TimeoutExpired:
            stalled = time.time() - last_write(watched)
            assert stalled < STALL_S, f"{what} is stuck: nothing under {watched} was written for {stalled:.0f} s"


def finished(coordinator: subprocess.Popen, log: Path) -> None:
    code = exit_code(coordinator, log.parent, "the coordinator")
    assert code == 0, log.read_text()[-4000:]


def clients_exit_once_the_run_is_over(clients: list[subprocess.Popen], logs: list[Path]) -> None:
    """Every client, told by the coordinator that the run is over, stops its SuperNode and exits 0
    (it waits for the SuperLink to go, which the coordinator stops once `flwr run` is done)."""
    for client, log in zip(clients, logs):
        said = log.read_text() if exit_code(client, log.parent, f"the client logging to {log.name}") == 0 else ""
        assert "the coordinator finished the run; client stopped" in said, log.read_text()[-3000:]


def deploy(
    tmp_path: Path, coordinator_host: str, org_hosts: dict[str, str], prefixes: dict[str, tuple[str, ...]]
) -> Path:
    """Run the coordinator to the end with one client per organisation; returns the run directory."""
    deployment = Deployment.prepare(tmp_path, coordinator_host, org_hosts, prefixes)
    coordinator = deployment.coordinator()
    clients = deployment.clients()
    try:
        finished(coordinator, tmp_path / "coordinator.log")
        clients_exit_once_the_run_is_over(clients, [tmp_path / f"{org}.log" for org in ORGS])
    finally:
        for proc in (coordinator, *clients):
            stop(proc)
    return deployment.run_dir()


def check_run(run_dir: Path, tmp_path: Path) -> None:
    plan = load_plan(sgd_plan(tmp_path))
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.round == 2
    MoETransformer(plan.model).load_state_dict(ckpt.weights, strict=True)
    assert max_diff(ckpt.weights, monolithic(plan, 2)) <= 1e-5


def test_coordinator_and_clients_as_separate_processes_train_the_plan_exactly(tmp_path):
    run_dir = deploy(tmp_path, "127.0.0.1", {org: "127.0.0.1" for org in ORGS}, {})
    check_run(run_dir, tmp_path)


def wait_for_round(deployment: Deployment, round: int, coordinator: subprocess.Popen) -> Path:
    """The run directory, once the checkpoint and the metrics of ``round`` are both written (as
    long as the deployment keeps writing)."""
    while (stalled := time.time() - last_write(deployment.tmp_path)) < STALL_S:
        assert coordinator.poll() is None, (
            f"the coordinator exited ({coordinator.returncode}) before round {round} was done"
        )
        if deployment.runs.exists() and any(deployment.runs.iterdir()):
            run_dir = deployment.run_dir()
            ckpt = latest_checkpoint(run_dir / "checkpoints")
            logged = {r["round"] for r in MetricsLog(run_dir / "metrics.jsonl").read() if r["event"] == "round"}
            if ckpt is not None and ckpt.round >= round and round in logged:
                return run_dir
        time.sleep(0.2)
    raise AssertionError(f"round {round} was not done: nothing was written for {stalled:.0f} s")


def test_a_deployed_run_resumes_after_the_coordinator_dies_and_ends_as_an_uninterrupted_run(tmp_path):
    """The coordinator is SIGKILLed (its process group, as in a crash) once round 1 is checkpointed;
    the clients stay up, and `fedsplit coordinator --resume RUN_DIR` runs round 2 only and ends
    with the weights of an uninterrupted run."""
    deployment = Deployment.prepare(tmp_path, "127.0.0.1", {org: "127.0.0.1" for org in ORGS}, {})
    crashed = deployment.coordinator(log="coordinator.log")
    clients = deployment.clients()
    procs = [crashed, *clients]
    try:
        run_dir = wait_for_round(deployment, 1, crashed)
        os.killpg(crashed.pid, signal.SIGKILL)
        crashed.wait()
        assert latest_checkpoint(run_dir / "checkpoints").round == 1, (
            "the coordinator was to die before round 2 was done"
        )
        # its SuperLink goes with it (parent-death signal)
        assert wait_until_closed(deployment.superlink, 60), f"something still listens on {deployment.superlink}"
        assert [c.poll() for c in clients] == [None] * len(ORGS), "a client exited when the coordinator died"
        resumed = deployment.coordinator("--resume", str(run_dir), log="coordinator-resumed.log")
        procs.append(resumed)
        finished(resumed, tmp_path / "coordinator-resumed.log")
        clients_exit_once_the_run_is_over(clients, [tmp_path / f"{org}.log" for org in ORGS])
    finally:
        for proc in procs:
            stop(proc)
    check_run(run_dir, tmp_path)
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    rounds = [(r["round"], r["event"]) for r in records if r["event"] in ("round", "round-failed")]
    assert rounds == [(1, "round"), (2, "round")]  # round 1 was not redone and round 2 did not fail
    assert f"resuming {run_dir.name} after round 1" in (run_dir / "logs" / FLWR_RUN_LOG).read_text()


def rehearsal_commands() -> list[list[str]]:
    """The README's one-machine rehearsal: each command of its code block, as arguments."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("**Rehearse on one machine first**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readme_rehearsal_runs_as_written_and_every_client_exits_when_the_run_is_over(tmp_path):
    """The README's commands, with its relative paths (`--credentials creds`, the shipped plan)
    from a directory holding the repository's configs/ and data/, on free ports instead of its
    fixed ones: the coordinator says who joined and finishes; each client exits 0 on its own."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "data", tmp_path / "data")
    ports = {port: str(free_port()) for port in ("9093", "7001", "7002")}
    commands = [[re.sub(r":(\d+)$", lambda m: ":" + ports.get(m[1], m[1]), a) for a in c] for c in rehearsal_commands()]
    assert [c[:2] for c in commands] == [
        ["fedsplit", "certs"],
        ["fedsplit", "coordinator"],
        *[["fedsplit", "client"]] * 2,
    ]

    def run(args: list[str], log: str) -> subprocess.Popen:  # `fedsplit` is this Python's fedsplit.cli
        return subprocess.Popen(
            [sys.executable, "-m", "fedsplit.cli", *args[1:]],
            cwd=tmp_path,
            stdout=open(tmp_path / log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    certs = run(commands[0], "certs.log")
    assert certs.wait(300) == 0, (tmp_path / "certs.log").read_text()
    coordinator = run(commands[1], "coordinator.log")
    clients = [run(c, f"client-{i}.log") for i, c in enumerate(commands[2:])]
    try:
        finished(coordinator, tmp_path / "coordinator.log")
        clients_exit_once_the_run_is_over(clients, [tmp_path / f"client-{i}.log" for i in range(len(clients))])
    finally:
        for proc in (coordinator, *clients):
            stop(proc)
    said = (tmp_path / "coordinator.log").read_text()
    assert "2 of 2 organisations joined" in said and "rounds of deploy-" in said, said[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert latest_checkpoint(run_dir / "checkpoints").round == load_plan(tmp_path / commands[1][2]).training.rounds
    assert "fedsplit: round 2/2" in (run_dir / "logs" / FLWR_RUN_LOG).read_text()


class Namespaces:
    """A bridge with the coordinator's address and one network namespace per organisation, each
    with its own address on the bridge: organisations reach each other only over that network."""

    def __init__(self, orgs: tuple[str, ...]):
        self.tag = f"fs{os.getpid() % 10000}"
        self.bridge = f"{self.tag}br"
        self.coordinator = "10.213.0.1"
        self.hosts = {org: f"10.213.0.{10 + i}" for i, org in enumerate(orgs)}
        self.names = {org: f"{self.tag}-{i}" for i, org in enumerate(orgs)}

    def up(self) -> None:
        ip = self._ip
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.coordinator}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, (org, ns) in enumerate(self.names.items()):
            outer, inner = f"{self.tag}v{i}", f"{self.tag}p{i}"
            ip("netns", "add", ns)
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", outer, "master", self.bridge)
            ip("link", "set", outer, "up")
            ip("link", "set", inner, "netns", ns)
            ip("-n", ns, "addr", "add", f"{self.hosts[org]}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        for ns in self.names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def prefix(self, org: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.names[org])

    @staticmethod
    def _ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
        if done.returncode:
            raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@pytest.fixture
def namespaces():
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command: network namespaces cannot be made here")
    spaces = Namespaces(ORGS)
    try:
        spaces.up()
    except OSError as e:
        spaces.down()
        pytest.skip(f"network namespaces cannot be made here (needs CAP_NET_ADMIN): {e}")
    yield spaces
    spaces.down()


def test_organisations_in_their_own_network_namespaces_train_the_plan_exactly(tmp_path, namespaces):
    run_dir = deploy(tmp_path, namespaces.coordinator, namespaces.hosts, {org: namespaces.prefix(org) for org in ORGS})
    check_run(run_dir, tmp_path)


def test_a_supernode_killed_before_joining_a_run_is_started_again(tmp_path, monkeypatch, capsys):
    """gRPC's poller in a SuperNode now and then aborts at start-up on a busy machine (SIGABRT):
    the client starts another instead of leaving the coordinator waiting for it."""
    from fedsplit.federation import deploy

    starts = tmp_path / "starts"
    script = (
        "import os, pathlib, signal, sys\n"
        f"p = pathlib.Path({str(starts)!r}); n = int(p.read_text()) if p.exists() else 0; p.write_text(str(n + 1))\n"
        "os.kill(os.getpid(), signal.SIGABRT) if n == 0 else sys.exit(0)\n"
    )
    monkeypatch.setattr(deploy, "supernode_command", lambda plan, options, port: [sys.executable, "-c", script])
    plan = load_plan(ROOT / "configs" / "plans" / "layers" / "federation.yaml")
    options = deploy.ClientOptions(
        org="compute-b",
        superlink="127.0.0.1:1",
        data_plane_address=f"127.0.0.1:{free_port()}",
        insecure=True,
        state_dir=tmp_path / "state",
    )
    end = deploy.run_client(plan, options)
    assert starts.read_text() == "2"
    assert (
        "the SuperNode ended with code -6 before joining a run; starting it again (1 of 3)" in capsys.readouterr().out
    )
    assert end.code == 0 and "exited with code 0" in end.why
