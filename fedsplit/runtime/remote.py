"""Workers over the gRPC data plane: a :class:`Peer` that calls another organisation's worker,
and the handler that serves a worker.

Control operations (``connect``, ``begin``, ``wait``, ``state``, ...) come from the worker's own
organisation or the coordinator; per micro-batch traffic (``segment``, ``heads``, ``experts``,
``shared``) and the step barrier (``ready``, ``finished``, ``abort``) flow directly between
organisations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import grpc
import torch
from torch import Tensor

from ..plan.schema import CompressionConfig
from ..transport.proto import dataplane_pb2 as pb
from ..transport.security import TLSConfig
from ..transport.service import CallRejected, DataPlaneChannel, Named
from ..transport.wire import Limits
from .calls import CallKey
from .rounds import RoundFailed, RoundSpec, path_orgs
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
    return pb.CallHeader(
        run=run, data_owner=key.data_owner, step=key.step, micro_batch=key.micro_batch, op=op, phase=phase
    )


def _positional(tensors: Sequence[Tensor | None]) -> Named:
    return [(str(i), t) for i, t in enumerate(tensors)]


class GrpcPeer:
    """Another organisation's worker, reached over the data plane. Activations (forward) and
    gradients (backward) are sent with the plan's codec for their role."""

    remote = True

    def __init__(
        self,
        channel: DataPlaneChannel,
        run: str,
        compression: CompressionConfig = CompressionConfig(),
        step_timeout: float = 300.0,
    ):
        self.channel, self.run, self.compression, self.step_timeout = channel, run, compression, step_timeout
        self.name = channel.org

    def forward(self, key: CallKey, op: str, inputs: Sequence[Tensor]) -> list[Tensor]:
        reply = self.channel.call(
            _header(self.run, key, op, pb.FORWARD), _positional(inputs), codec=self.compression.activations
        )
        return [t for _, t in reply]

    def backward(self, key: CallKey, op: str, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        reply = self.channel.call(
            _header(self.run, key, op, pb.BACKWARD), _positional(grads), codec=self.compression.gradients
        )
        return [t for _, t in reply]

    def evaluate(self, key: CallKey, op: str, inputs: Sequence[Tensor]) -> list[Tensor]:
        reply = self.channel.call(
            _header(self.run, key, op, pb.EVALUATE), _positional(inputs), codec=self.compression.activations
        )
        return [t for _, t in reply]

    # RoundControl: these wait on the callee's step barrier, so their deadline is the barrier's.
    def await_round(self, round: int) -> None:
        self._control(f"ready/{round}")

    def finish_step(self, data_owner: str, step: int) -> None:
        self._control("finished", data_owner=data_owner, step=step)

    def abort(self, round: int, reason: str) -> None:
        self.channel.call(pb.CallHeader(run=self.run, op=f"abort/{round}/{reason}", phase=pb.CONTROL), [], timeout=10)

    def add_replica_grads(self, org: str, step: int, grads: Sequence[tuple[str, Tensor]]) -> None:
        self.channel.call(
            pb.CallHeader(run=self.run, op="replica-grads", phase=pb.CONTROL, data_owner=org, step=step), list(grads)
        )

    def _control(self, op: str, **fields) -> None:
        header = pb.CallHeader(run=self.run, op=op, phase=pb.CONTROL, **fields)
        self.channel.call(header, [], timeout=self.step_timeout + self.channel.timeout)


class WorkerHandler:
    """Serves one worker: checks every call against the plan before the worker sees it.

    ``run=None``: the worker joins the run its own organisation (or the coordinator) first
    connects it for, and connecting it for another run later starts it afresh."""

    # Control operations of the worker's own organisation (its Flower client) or the coordinator.
    OWNER_OPS = {"connect", "begin", "wait", "train", "share", "step", "state", "load", "stats"}
    # Sent by data owners whose batches pass through this worker, to keep rounds in step.
    ROUND_OPS = {"ready", "finished", "abort"}

    def __init__(self, worker: Worker, run: str | None, tls: TLSConfig | None, token: str | None = None):
        self.worker, self.run, self.tls, self.token = worker, run, tls, token
        self._addresses: dict[str, str] = {}

    def handle(self, header: pb.CallHeader, tensors: Named) -> tuple[Named, str]:
        if (
            header.phase == pb.CONTROL
            and header.op.partition("/")[0] in ("connect", "begin")
            and header.run != self.run
        ):
            self._check_owner(header)
            self.run = header.run  # a new run: channels to peers and optimizer state start afresh
            self._addresses = {}
            if self.worker.rounds is not None:
                self.worker.rounds.last_finished = -1
        # A data owner may ask whether this worker has begun the round (and a co-holder may send
        # its replica gradients) before this worker's own client connected it to the run.
        waiting_for_run = (
            self.run is None
            and header.phase == pb.CONTROL
            and (header.op.startswith("ready/") or header.op == "replica-grads")
        )
        if header.run != self.run and not waiting_for_run:
            raise CallRejected(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"a call of run {header.run!r} reached a worker of run {self.run!r}",
            )
        try:
            if header.phase == pb.CONTROL:
                return self._control(header, tensors), "none"
            key = CallKey(header.data_owner, header.step, header.micro_batch)
            values = [t for _, t in tensors]
            codecs = self.worker.plan.transport.compression
            if header.phase in (pb.FORWARD, pb.EVALUATE):
                if any(v is None for v in values):
                    raise ValueError("forward inputs cannot be absent")
                self.worker.check_call(header.caller, key, header.op, values)
                run = self.worker.forward if header.phase == pb.FORWARD else self.worker.evaluate
                return _positional(run(key, header.op, values)), codecs.activations
            if header.phase == pb.BACKWARD:
                self.worker.check_call(header.caller, key, header.op)
                return _positional(self.worker.backward(key, header.op, values)), codecs.gradients
        except PermissionError as e:
            raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, str(e)) from None
        except (TimeoutError, RoundFailed) as e:
            raise CallRejected(grpc.StatusCode.ABORTED, str(e)) from None
        raise ValueError(f"unknown phase {header.phase}")

    def _check_owner(self, header: pb.CallHeader) -> None:
        if header.caller not in (COORDINATOR, self.worker.name):
            raise CallRejected(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{header.caller!r} may not send control operations to {self.worker.name}",
            )

    def _control(self, header: pb.CallHeader, tensors: Named) -> Named:
        op, _, arg = header.op.partition("/")
        w = self.worker
        if op in self.ROUND_OPS:
            self._round_op(header, op, arg)
            return []
        if op == "replica-grads":  # from a holder of the same replicated partition (the worker checks it is one)
            if header.data_owner != header.caller:
                raise PermissionError(f"{header.caller!r} cannot send the gradients of {header.data_owner!r}")
            w.add_replica_grads(header.caller, header.step, tensors)
            return []
        if op not in self.OWNER_OPS:
            raise ValueError(f"unknown control operation {op!r}")
        self._check_owner(header)
        if op == "connect":
            self._connect(json.loads(arg))
            return []
        if op == "begin":
            self._rounds().begin(RoundSpec.from_json(arg), {k: v for k, v in tensors})
            return []
        if op == "wait":
            metrics = self._rounds().wait(float(arg))
            return [
                (k, torch.tensor(int(v)) if float(v).is_integer() else torch.tensor(v, dtype=torch.float32))
                for k, v in metrics.items()
            ]
        if op == "train":
            metrics = w.train_batch(int(arg), tensors[0][1], tensors[1][1])
            return [(k, torch.tensor(v, dtype=torch.float32)) for k, v in metrics.items()]
        if op == "share":
            w.share_replica_grads(int(arg))
            return []
        if op == "step":
            w.gather_replica_grads(int(arg))
            w.step()
            return []
        if op == "state":  # views, not copies: the reply is encoded before the worker can step again
            return [(k, p.detach()) for k, p in w.model.bindings.items()]
        if op == "load":
            w.load_state({k: v for k, v in tensors})
            return []
        channels = [p.channel for p in w.peers.values() if isinstance(p, GrpcPeer)]
        return [
            ("wire_bytes", torch.tensor(sum(c.wire_bytes for c in channels), dtype=torch.int64)),
            ("tensor_bytes", torch.tensor(sum(c.tensor_bytes for c in channels), dtype=torch.int64)),
        ]

    def _rounds(self):
        if self.worker.rounds is None:
            raise ValueError(f"the worker of {self.worker.name} does not run rounds on its own")
        return self.worker.rounds

    def _round_op(self, header: pb.CallHeader, op: str, arg: str) -> None:
        plan, rounds = self.worker.plan, self._rounds()
        if header.caller not in plan.data_owners or self.worker.name not in path_orgs(plan, header.caller):
            raise PermissionError(f"{header.caller!r} has no batches that pass through {self.worker.name}")
        if op == "ready":
            rounds.await_round(int(arg))
        elif op == "finished":
            if header.data_owner != header.caller:
                raise PermissionError(f"{header.caller!r} cannot report the steps of {header.data_owner!r}")
            rounds.finish_step(header.data_owner, header.step)
        else:
            round_text, _, reason = arg.partition("/")
            rounds.abort(int(round_text), reason)

    def _connect(self, addresses: dict[str, str]) -> None:
        """Channels to the other organisations' workers (kept while the addresses stay the same)."""
        w = self.worker
        if addresses == self._addresses and w.peers:
            return
        self.close()
        t = w.plan.transport
        limits = Limits(max_tensor_bytes=t.max_tensor_mib << 20)
        peers = {
            org: GrpcPeer(
                DataPlaneChannel(
                    org,
                    addr,
                    caller=w.name,
                    tls=self.tls,
                    token=self.token,
                    timeout=t.timeout_s,
                    limits=limits,
                    retries=t.retries,
                    shared_memory=t.shared_memory and is_local(addr),
                ),
                self.run,
                t.compression,
                t.step_timeout_s,
            )
            for org, addr in addresses.items()
            if org != w.name
        }
        w.connect({**peers, w.name: w})
        self._addresses = dict(addresses)

    def close(self) -> None:
        for peer in self.worker.peers.values():
            if isinstance(peer, GrpcPeer):
                peer.channel.close()


class WorkerControl:
    """Drives one organisation's worker over its control operations: what that organisation's
    Flower client (or the coordinator, in ``verify``) does once per round, never per batch."""

    def __init__(
        self,
        org: str,
        address: str,
        *,
        caller: str,
        run: str,
        tls: TLSConfig | None,
        token: str | None,
        timeout: float = 60.0,
    ):
        self.org, self.run = org, run
        self.channel = DataPlaneChannel(org, address, caller=caller, tls=tls, token=token, timeout=timeout)

    def call(self, op: str, tensors: Named = (), timeout: float | None = None) -> Named:
        """One control operation (``op`` with its argument) and its reply tensors."""
        return self.channel.call(pb.CallHeader(run=self.run, op=op, phase=pb.CONTROL), list(tensors), timeout=timeout)

    def connect(self, addresses: Mapping[str, str]) -> None:
        self.call("connect/" + json.dumps(dict(addresses)))

    def begin(self, spec: RoundSpec, weights: Mapping[str, Tensor]) -> None:
        self.call("begin/" + spec.to_json(), list(weights.items()))

    def wait(self, timeout: float) -> dict[str, float]:
        return {k: float(v) for k, v in self.call(f"wait/{timeout}", timeout=timeout + self.channel.timeout)}

    def state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.call("state")}

    def close(self) -> None:
        self.channel.close()
