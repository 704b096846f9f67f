"""Worker host processes on this machine: started, awaited, stopped (and killed, in tests).

Used by ``fedsplit verify --transport grpc`` (one process per organisation, driven step by
step) and by ``fedsplit simulate`` (organisations grouped into processes, running rounds)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from ..plan import Partition, Plan, reassemble, write_resolved
from ..runtime.privacy import KEY_FILE
from ..runtime.protocols import Batches
from ..transport.security import TLSConfig, generate_credentials, load_token
from ..transport.shm import remove_segments_of
from .control import COORDINATOR, WorkerControl
from .host import REFUSED, REFUSED_EXIT, WORKER_THREADS


class HostStartError(RuntimeError):
    """A worker host did not start: why (its own one-line reason when it refused, e.g. bad data)."""


def _worker_env() -> dict[str, str]:
    """The environment of a worker process.

    * Every thread computes with ``WORKER_THREADS`` intra-op threads. ``torch.set_num_threads``
      sets only the calling thread's OpenMP thread count: the gRPC server, fan-out and data-owner
      threads that do a worker's arithmetic keep the process default, and MKL then blocks some
      matrix products differently on them (a (9, 64) x (64, 64) product differs in its last bits
      between the main thread and a new one), so results would depend on which thread served a
      call. The environment sets the default of every thread.
    * Multi-MiB tensor buffers stay in malloc's heap instead of fresh mmaps that page-fault on
      every message (1.4-2.7x faster gRPC paths on a 2-core VM); a user's setting wins."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(WORKER_THREADS)
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824")
    return env


class HostProcesses:
    """Worker host processes (``python -m fedsplit.hosting.host``), one per group of organisations.

    Security material for the run is made under ``work_dir`` unless ``insecure``; processes
    end with this object (and with the parent process, even if it is killed)."""

    def __init__(
        self,
        plan: Plan,
        groups: Sequence[Sequence[str]],
        work_dir: Path,
        *,
        run: str | None = None,
        weights: Mapping[str, Tensor] | None = None,
        device: str | None = None,
        insecure: bool = False,
        state_dir: Path | None = None,
        start_timeout: float = 120.0,
        plan_file: Path | None = None,
    ):
        """``plan_file``: the run's resolved plan, which every worker process loads (default:
        ``plan`` written into ``work_dir``)."""
        self.plan, self.work_dir = plan, Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        plan_file = plan_file or write_resolved(plan, self.work_dir / "plan.json")
        self.credentials: Path | None = None
        if not insecure:
            self.credentials = generate_credentials(
                [*plan.orgs, COORDINATOR], self.work_dir / "credentials", keep_ca_key=False
            )
        common = [
            "--exit-with-parent",
            *(["--credentials", str(self.credentials)] if self.credentials else ["--insecure"]),
        ]
        if run:
            common += ["--run", run]
        if weights is not None:
            save_file({k: v.contiguous() for k, v in weights.items()}, self.work_dir / "init.safetensors")
            common += ["--weights", str(self.work_dir / "init.safetensors")]
        if device:
            common += ["--device", device]
        if state_dir:
            common += ["--state-dir", str(state_dir)]
        self.procs: dict[int, subprocess.Popen] = {}
        self.group_of: dict[str, int] = {}
        for i, orgs in enumerate(groups):
            self._ready(i).unlink(missing_ok=True)  # a previous run's (resume in the same directory)
            cmd = [
                sys.executable,
                "-m",
                "fedsplit.hosting.host",
                str(plan_file),
                "--orgs",
                *orgs,
                "--ready-file",
                str(self._ready(i)),
                *common,
            ]
            self.procs[i] = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=open(self.log(i), "wb"), env=_worker_env()
            )
            self.group_of.update({org: i for org in orgs})
        self.addresses = self._wait_ready(start_timeout)

    def _ready(self, i: int) -> Path:
        return self.work_dir / f"host-{i}.json"

    def log(self, i: int) -> Path:
        return self.work_dir / f"host-{i}.log"

    def tls_for(self, org: str) -> TLSConfig | None:
        return TLSConfig.load(self.credentials, org) if self.credentials else None

    def token_for(self, org: str) -> str | None:
        return load_token(self.credentials, org) if self.credentials else None

    def _wait_ready(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        addresses: dict[str, str] = {}
        while len(addresses) < len(self.group_of):
            for i, proc in self.procs.items():
                if proc.poll() is not None:
                    log = self.log(i).read_text(errors="replace")[-2000:]
                    self.close()
                    refused = [line for line in log.splitlines() if line.startswith(REFUSED)]
                    if proc.returncode == REFUSED_EXIT and refused:
                        raise HostStartError(refused[-1].removeprefix(REFUSED))
                    raise HostStartError(f"worker host {i} exited with code {proc.returncode} while starting:\n{log}")
                if self._ready(i).exists():
                    addresses.update(json.loads(self._ready(i).read_text()))
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(
                    f"workers not ready after {timeout:.0f} s: {sorted(set(self.group_of) - set(addresses))}"
                )
            time.sleep(0.05)
        return addresses

    def kill(self, org: str) -> None:
        """SIGKILL the process that hosts ``org`` (and whatever else it hosts)."""
        self.procs[self.group_of[org]].kill()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            remove_segments_of(proc.pid)  # a worker that was killed could not remove its own


class ProcessFederation:
    """Worker processes on loopback (one per organisation, or ``groups`` of organisations that
    then call each other in memory), driven over gRPC like the in-process
    :class:`~fedsplit.runtime.InProcessFederation`."""

    def __init__(
        self,
        plan: Plan,
        weights: Mapping[str, Tensor],
        device: str | None = None,
        timeout: float = 60.0,
        start_timeout: float = 120.0,
        insecure: bool = False,
        groups: Sequence[Sequence[str]] | None = None,
        noise_keys: Mapping[str, int] | None = None,
    ):
        """Workers get fresh TLS certificates and tokens for this run unless ``insecure``;
        data owners the ``noise_keys`` given (privacy.activations), else keys of their own."""
        self.plan, self.timeout = plan, timeout
        self.frozen = plan.frozen_part(weights)  # never changes
        self.run = f"{plan.name}-{secrets.token_hex(4)}"
        self._tmp = tempfile.TemporaryDirectory(prefix="fedsplit-")
        state = Path(self._tmp.name) / "state"
        for org, key in (noise_keys or {}).items():
            (state / org).mkdir(parents=True, exist_ok=True)
            (state / org / KEY_FILE).write_text(f"{key}\n")
        self.hosts = HostProcesses(
            plan,
            groups or [[org] for org in plan.orgs],
            Path(self._tmp.name),
            run=self.run,
            weights=weights,
            device=device,
            insecure=insecure,
            state_dir=state,
            start_timeout=start_timeout,
        )
        self.addresses = self.hosts.addresses
        tls, token = self.hosts.tls_for(COORDINATOR), self.hosts.token_for(COORDINATOR)
        self.controls = {
            org: WorkerControl(org, addr, caller=COORDINATOR, run=self.run, tls=tls, token=token, timeout=timeout)
            for org, addr in self.addresses.items()
        }
        for control in self.controls.values():
            control.connect(self.addresses)

    def train_step(self, step: int, batches: Batches) -> dict[str, dict[str, float]]:
        metrics = {d: self.controls[d].train_batch(step, *batches[d]) for d in self.plan.data_owners}
        # Every organisation applies the step at once: holders of replicas kept in step wait for
        # each other's gradients.
        timeout = self.plan.transport.step_timeout_s + self.timeout
        with ThreadPoolExecutor(max_workers=len(self.controls)) as pool:
            applied = {org: pool.submit(c.apply_step, step, timeout) for org, c in self.controls.items()}
            for d in metrics:
                metrics[d].update(applied[d].result())
            for done in applied.values():
                done.result()
        return metrics

    def traffic(self) -> dict[str, int]:
        """Bytes that crossed the data plane between organisations so far (control excluded),
        as sent and as the uncompressed tensors they carry."""
        total = {"wire_bytes": 0, "tensor_bytes": 0}
        for control in self.controls.values():
            for k, v in control.traffic().items():
                total[k] += int(v)
        return total

    def memory(self) -> dict[str, dict[str, float]]:
        """Each organisation's peak memory (its worker process's RSS, its GPU allocation)."""
        return {org: c.memory() for org, c in self.controls.items()}

    def state(self, org: str) -> dict[str, Tensor]:
        return self.controls[org].state()

    def replicas(self, partition: Partition) -> dict[str, dict[str, Tensor]]:
        keys = [s.key for s in self.plan.trained_slices(partition.units)]
        return {org: {k: v for k, v in self.state(org).items() if k in keys} for org in partition.holders}

    def load_partition(self, partition: Partition, state: Mapping[str, Tensor]) -> None:
        for org in partition.holders:
            self.controls[org].load_state(state)

    def reassembled(self) -> dict[str, Tensor]:
        states = {org: self.state(org) for org in self.plan.orgs}
        return reassemble(
            self.plan.model,
            [
                *(
                    {s.key: states[p.holders[0]][s.key] for s in self.plan.trained_slices(p.units)}
                    for p in self.plan.partitions
                ),
                self.frozen,
            ],
        )

    def close(self) -> None:
        for control in getattr(self, "controls", {}).values():
            control.close()
        if hasattr(self, "hosts"):
            self.hosts.close()
        self._tmp.cleanup()

    def __enter__(self) -> ProcessFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
