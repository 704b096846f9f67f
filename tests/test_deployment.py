"""`fedsplit coordinator` and `fedsplit client` as separate processes, as on separate machines:
a real SuperLink and SuperNodes, TLS and tokens on both planes, on loopback and (where this
machine allows it) with every organisation in its own network namespace and address."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedsplit.federation.checkpoint import latest_checkpoint
from fedsplit.federation.deploy import free_port
from fedsplit.model import MoETransformer
from fedsplit.plan import load_plan

from .reference_training import max_diff, monolithic

PLANS = Path(__file__).resolve().parents[1] / "configs" / "plans"
ORGS = ("hospital-a", "hospital-b", "compute-c")

pytestmark = pytest.mark.slow


def sgd_plan(tmp_path: Path) -> Path:
    """u-shape-3 (layer, expert and head partitions, replicated ends on two data owners) with one
    SGD step per round: then averaging replicas by tokens equals the monolithic step exactly."""
    source = PLANS / "u-shape-3"
    fed = tmp_path / "federation.yaml"
    fed.write_text(f"""name: u-shape-3-sgd
model: {(PLANS.parent / 'models' / 'tiny.yaml').resolve()}
training: {{rounds: 2, steps_per_round: 1, batch_size: 4, seq_len: 64, micro_batches: 2,
           optimizer: {{name: sgd, lr: 0.05}}, seed: 0}}
orgs: [{source.resolve()}/orgs/*.yaml]
""")
    return fed


def fedsplit(*args: str, prefix: tuple[str, ...] = (), log: Path) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "-m", "fedsplit.cli", *args], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


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


def deploy(tmp_path: Path, coordinator_host: str, org_hosts: dict[str, str], prefixes: dict[str, tuple[str, ...]]) -> Path:
    """Run the coordinator to the end with one client per organisation; returns the run directory."""
    fed = sgd_plan(tmp_path)
    creds = tmp_path / "creds"
    made = subprocess.run([sys.executable, "-m", "fedsplit.cli", "certs", str(fed), "--out", str(creds),
                           "--hosts", "localhost", coordinator_host, *set(org_hosts.values())], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    own = {name: own_credentials(creds, name) for name in (*ORGS, "coordinator")}
    superlink = f"{coordinator_host}:{free_port()}"
    coordinator = fedsplit("coordinator", str(fed), "--listen", superlink, "--credentials", str(own["coordinator"]),
                           "--runs-dir", str(tmp_path / "runs"), "--node-timeout", "240", log=tmp_path / "coordinator.log")
    clients = [fedsplit("client", "--org", org, "--plan", str(fed), "--superlink", superlink,
                        "--data-plane-address", f"{org_hosts[org]}:{free_port()}", "--credentials", str(own[org]),
                        "--state-dir", str(tmp_path / org), prefix=prefixes.get(org, ()), log=tmp_path / f"{org}.log")
               for org in ORGS]
    try:
        code = coordinator.wait(600)
    finally:
        for proc in (coordinator, *clients):
            stop(proc)
    assert code == 0, (tmp_path / "coordinator.log").read_text()[-4000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def check_run(run_dir: Path, tmp_path: Path) -> None:
    plan = load_plan(sgd_plan(tmp_path))
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.round == 2
    MoETransformer(plan.model).load_state_dict(ckpt.weights, strict=True)
    assert max_diff(ckpt.weights, monolithic(plan, 2)) <= 1e-5


def test_coordinator_and_clients_as_separate_processes_train_the_plan_exactly(tmp_path):
    run_dir = deploy(tmp_path, "127.0.0.1", {org: "127.0.0.1" for org in ORGS}, {})
    check_run(run_dir, tmp_path)


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
