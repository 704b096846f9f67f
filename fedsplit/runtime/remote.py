"""Workers over the gRPC data plane: a :class:`Peer` that calls another organisation's worker,
the handler that serves a worker, and a federation of worker processes on this host.

The control operations (``train``, ``step``, ``state``, ``load``, ``connect``) are what the
coordinator sends; per micro-batch traffic (``segment``, ``heads``, ``experts``, ``shared``)
flows directly between organisations.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import threading
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import grpc
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..plan import Partition, Plan, load_plan, reassemble, select, unit_slices
from ..plan.schema import CompressionConfig, TrainingConfig, TransportConfig
from ..transport.proto import dataplane_pb2 as pb
from ..transport.shm import remove_segments_of
from ..transport.wire import Limits
from ..transport.security import TLSConfig, generate_credentials, load_tokens
from ..transport.service import CallRejected, Credentials, DataPlaneChannel, DataPlaneServer, Named
from .calls import CallKey
from .worker import Worker

COORDINATOR = "coordinator"
# Intra-op threads of a worker process: several workers share a small host, and 1 thread per
# process avoided the slowdowns of oversubscribed copies measured in transport-probe.md.
WORKER_THREADS = 1


def is_local(address: str) -> bool:
    """Whether a data-plane address is on this host (where shared memory can replace the wire)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _header(run: str, key: CallKey, op: str, phase: int) -> pb.CallHeader:
    return pb.CallHeader(run=run, data_owner=key.data_owner, step=key.step, micro_batch=key.micro_batch, op=op, phase=phase)


def _positional(tensors: Sequence[Tensor | None]) -> Named:
    return [(str(i), t) for i, t in enumerate(tensors)]


class GrpcPeer:
    """Another organisation's worker, reached over the data plane. Activations (forward) and
    gradients (backward) are sent with the plan's codec for their role."""

    remote = True

    def __init__(self, channel: DataPlaneChannel, run: str, compression: CompressionConfig = CompressionConfig()):
        self.channel, self.run, self.compression = channel, run, compression
        self.name = channel.org

    def forward(self, key: CallKey, op: str, inputs: Sequence[Tensor]) -> list[Tensor]:
        reply = self.channel.call(_header(self.run, key, op, pb.FORWARD), _positional(inputs), codec=self.compression.activations)
        return [t for _, t in reply]

    def backward(self, key: CallKey, op: str, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        reply = self.channel.call(_header(self.run, key, op, pb.BACKWARD), _positional(grads), codec=self.compression.gradients)
        return [t for _, t in reply]


class WorkerHandler:
    """Serves one worker: checks every call against the plan before the worker sees it."""

    def __init__(self, worker: Worker, run: str, tls: TLSConfig | None, token: str | None = None):
        self.worker, self.run, self.tls, self.token = worker, run, tls, token

    def handle(self, header: pb.CallHeader, tensors: Named) -> tuple[Named, str]:
        if header.run != self.run:
            raise CallRejected(grpc.StatusCode.FAILED_PRECONDITION, f"a call of run {header.run!r} reached a worker of run {self.run!r}")
        if header.phase == pb.CONTROL:
            if header.caller != COORDINATOR:
                raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, f"{header.caller!r} may not send control operations")
            return self._control(header, tensors), "none"
        key = CallKey(header.data_owner, header.step, header.micro_batch)
        values = [t for _, t in tensors]
        codecs = self.worker.plan.transport.compression
        try:
            if header.phase == pb.FORWARD:
                if any(v is None for v in values):
                    raise ValueError("forward inputs cannot be absent")
                self.worker.check_call(header.caller, key, header.op, values)
                return _positional(self.worker.forward(key, header.op, values)), codecs.activations
            if header.phase == pb.BACKWARD:
                self.worker.check_call(header.caller, key, header.op)
                return _positional(self.worker.backward(key, header.op, values)), codecs.gradients
        except PermissionError as e:
            raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, str(e)) from None
        raise ValueError(f"unknown phase {header.phase}")

    def _control(self, header: pb.CallHeader, tensors: Named) -> Named:
        op, _, arg = header.op.partition("/")
        w = self.worker
        if op == "connect":
            addresses = json.loads(arg)
            t = w.plan.transport
            limits = Limits(max_tensor_bytes=t.max_tensor_mib << 20)
            peers = {org: GrpcPeer(DataPlaneChannel(org, addr, caller=w.name, tls=self.tls, token=self.token, timeout=t.timeout_s,
                                                    limits=limits, retries=t.retries, shared_memory=t.shared_memory and is_local(addr)),
                                   self.run, t.compression)
                     for org, addr in addresses.items() if org != w.name}
            w.connect({**peers, w.name: w})
            return []
        if op == "train":
            metrics = w.train_batch(int(arg), tensors[0][1], tensors[1][1])
            return [(k, torch.tensor(v, dtype=torch.float32)) for k, v in metrics.items()]
        if op == "step":
            w.step()
            return []
        if op == "state":
            return list(w.state_dict().items())
        if op == "load":
            w.load_state({k: v for k, v in tensors})
            return []
        if op == "stats":
            channels = [p.channel for p in w.peers.values() if isinstance(p, GrpcPeer)]
            return [("wire_bytes", torch.tensor(sum(c.wire_bytes for c in channels), dtype=torch.int64)),
                    ("tensor_bytes", torch.tensor(sum(c.tensor_bytes for c in channels), dtype=torch.int64))]
        raise ValueError(f"unknown control operation {op!r}")


def serve_worker(argv: Sequence[str] | None = None) -> None:
    """Entry point of one organisation's worker process (``python -m fedsplit.runtime.remote``)."""
    parser = argparse.ArgumentParser(prog="python -m fedsplit.runtime.remote")
    parser.add_argument("plan")
    parser.add_argument("org")
    parser.add_argument("--weights", required=True, help="safetensors file of the full initial model")
    parser.add_argument("--run", required=True, help="run id; calls of any other run are refused")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", required=True, help="where to write host:port once serving")
    parser.add_argument("--device")
    parser.add_argument("--credentials", help="directory of `fedsplit certs` output (TLS and tokens)")
    parser.add_argument("--insecure", action="store_true", help="plaintext and no tokens (tests on loopback only)")
    parser.add_argument("--exit-with-parent", action="store_true", help="stop when standard input closes")
    parser.add_argument("--settings", help="JSON of the coordinator's training and transport settings, overriding the file's")
    args = parser.parse_args(argv)
    if not args.credentials and not args.insecure:
        parser.error("give --credentials DIR, or --insecure explicitly")
    torch.set_num_threads(WORKER_THREADS)
    plan = load_plan(args.plan)
    if args.settings:
        settings = json.loads(args.settings)
        plan.training = TrainingConfig.model_validate(settings["training"])
        plan.transport = TransportConfig.model_validate(settings["transport"])
    weights = load_file(args.weights)
    worker = Worker(plan, args.org, select(weights, plan.slices_of(args.org)), args.device)
    tls = TLSConfig.load(args.credentials, args.org) if args.credentials else None
    tokens = load_tokens(args.credentials) if args.credentials else None
    handler = WorkerHandler(worker, args.run, tls, tokens[args.org] if tokens else None)
    limits = Limits(max_tensor_bytes=plan.transport.max_tensor_mib << 20)
    server = DataPlaneServer(handler, args.host, args.port, tls=tls, credentials=Credentials(tokens) if tokens else None, limits=limits).start()
    def shut_down(signum, frame) -> None:  # close channels so their shared-memory segments go
        server.stop(None)
        for peer in worker.peers.values():
            if isinstance(peer, GrpcPeer):
                peer.channel.close()

    signal.signal(signal.SIGTERM, shut_down)
    if args.exit_with_parent:  # the parent holds our stdin: its end (even a SIGKILL) ends us too
        threading.Thread(target=lambda: (sys.stdin.read(), os.kill(os.getpid(), signal.SIGTERM)), daemon=True).start()
    tmp = args.ready_file + ".tmp"
    Path(tmp).write_text(server.address)
    os.replace(tmp, args.ready_file)
    server.wait()


def _worker_env() -> dict[str, str]:
    """Keep multi-MiB tensor buffers in malloc's heap instead of fresh mmaps that page-fault on
    every message (1.4-2.7x on gRPC paths in transport-probe.md); a user's setting wins."""
    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824")
    return env


class ProcessFederation:
    """One worker process per organisation on loopback, driven over gRPC like the in-process
    :class:`~fedsplit.runtime.InProcessFederation`."""

    def __init__(self, plan: Plan, weights: Mapping[str, Tensor], device: str | None = None, timeout: float = 60.0,
                 start_timeout: float = 120.0, insecure: bool = False):
        """Workers get fresh TLS certificates and tokens for this run unless ``insecure``."""
        self.plan = plan
        self.run = f"{plan.name}-{secrets.token_hex(4)}"
        self._tmp = tempfile.TemporaryDirectory(prefix="fedsplit-")
        tmp = Path(self._tmp.name)
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "init.safetensors")
        tls, token, security = None, None, ["--insecure"]
        if not insecure:
            creds = generate_credentials([*plan.orgs, COORDINATOR], tmp / "credentials")
            tls, token = TLSConfig.load(creds, COORDINATOR), load_tokens(creds)[COORDINATOR]
            security = ["--credentials", str(creds)]
        self.procs: dict[str, subprocess.Popen] = {}
        for org in plan.orgs:
            settings = json.dumps({"training": plan.training.model_dump(mode="json"), "transport": plan.transport.model_dump(mode="json")})
            cmd = [sys.executable, "-m", "fedsplit.runtime.remote", str(plan.file), org, "--run", self.run, "--weights", str(tmp / "init.safetensors"),
                   "--ready-file", str(tmp / f"{org}.addr"), "--settings", settings, "--exit-with-parent", *security]
            if device:
                cmd += ["--device", device]
            self.procs[org] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                               stderr=open(tmp / f"{org}.log", "wb"), env=_worker_env())
        self.addresses = self._wait_ready(tmp, start_timeout)
        self.channels = {org: DataPlaneChannel(org, addr, caller=COORDINATOR, tls=tls, token=token, timeout=timeout)
                         for org, addr in self.addresses.items()}
        for org in plan.orgs:
            self._control(org, "connect/" + json.dumps(self.addresses))

    def _wait_ready(self, tmp: Path, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        addresses: dict[str, str] = {}
        while len(addresses) < len(self.procs):
            for org, proc in self.procs.items():
                if proc.poll() is not None:
                    log = (tmp / f"{org}.log").read_text(errors="replace")[-2000:]
                    self.close()
                    raise RuntimeError(f"worker of '{org}' exited with code {proc.returncode} while starting:\n{log}")
                f = tmp / f"{org}.addr"
                if org not in addresses and f.exists():
                    addresses[org] = f.read_text()
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"workers not ready after {timeout:.0f} s: {sorted(set(self.procs) - set(addresses))}")
            time.sleep(0.05)
        return addresses

    def _control(self, org: str, op: str, tensors: Named = ()) -> Named:
        return self.channels[org].call(pb.CallHeader(run=self.run, op=op, phase=pb.CONTROL), list(tensors))

    def train_step(self, step: int, batches: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, dict[str, float]]:
        metrics = {}
        for d in self.plan.data_owners:
            tokens, labels = batches[d]
            reply = self._control(d, f"train/{step}", [("tokens", tokens), ("labels", labels)])
            metrics[d] = {k: float(v) for k, v in reply}
        for org in self.plan.orgs:
            self._control(org, "step")
        return metrics

    def traffic(self) -> dict[str, int]:
        """Bytes that crossed the data plane between organisations so far (control excluded),
        as sent and as the uncompressed tensors they carry."""
        total = {"wire_bytes": 0, "tensor_bytes": 0}
        for org in self.plan.orgs:
            for k, v in self._control(org, "stats"):
                total[k] += int(v)
        return total

    def state(self, org: str) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self._control(org, "state")}

    def replicas(self, partition: Partition) -> dict[str, dict[str, Tensor]]:
        keys = [s.key for s in unit_slices(self.plan.model, partition.units)]
        return {org: {k: v for k, v in self.state(org).items() if k in keys} for org in partition.holders}

    def load_partition(self, partition: Partition, state: Mapping[str, Tensor]) -> None:
        for org in partition.holders:
            self._control(org, "load", list(state.items()))

    def reassembled(self) -> dict[str, Tensor]:
        states = {org: self.state(org) for org in self.plan.orgs}
        return reassemble(self.plan.model, [
            {s.key: states[p.holders[0]][s.key] for s in unit_slices(self.plan.model, p.units)} for p in self.plan.partitions
        ])

    def close(self) -> None:
        for ch in getattr(self, "channels", {}).values():
            ch.close()
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
        self._tmp.cleanup()

    def __enter__(self) -> "ProcessFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    serve_worker()
