"""Serving one organisation's worker on the data plane: every call is checked against the plan
before the worker sees it.

Control operations (``connect``, ``begin``, ``wait``, ``state``, ...) come from the worker's own
organisation or the coordinator; per micro-batch traffic (``segment``, ``heads``, ``experts``,
``shared``) and the step barrier (``ready``, ``finished``, ``abort``) flow directly between
organisations.
"""

from __future__ import annotations

import json

import grpc
import torch

from ..runtime.calls import CallKey
from ..runtime.rounds import RoundFailed, RoundSpec, path_orgs
from ..runtime.worker import Worker
from ..transport.proto import dataplane_pb2 as pb
from ..transport.security import TLSConfig
from ..transport.service import CallRejected, DataPlaneChannel, Named
from ..transport.wire import Limits
from .control import COORDINATOR
from .grpc_peer import GrpcPeer, is_local, positional


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
                return positional(run(key, header.op, values)), codecs.activations
            if header.phase == pb.BACKWARD:
                self.worker.check_call(header.caller, key, header.op)
                return positional(self.worker.backward(key, header.op, values)), codecs.gradients
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
