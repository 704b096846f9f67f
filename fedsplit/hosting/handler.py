"""Serving one organisation's worker on the data plane: each call's operation is parsed once
(:mod:`.messages`) and checked against the plan (:class:`~fedsplit.runtime.policy.CallPolicy`)
before the worker sees it.

Control calls of the worker's own organisation (its Flower client) or the coordinator connect
it, begin and collect rounds, and move weights; data owners whose batches pass through it keep
rounds in step (the step barrier); co-holders of replicas kept in step send their gradients.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import grpc

from ..runtime.calls import CallKey
from ..runtime.local import LocalPeer
from ..runtime.rounds import RoundFailed, Rounds
from ..runtime.worker import Worker
from ..transport.channel import DataPlaneChannel
from ..transport.framing import Limits
from ..transport.proto import dataplane_pb2 as pb
from ..transport.protocol import Named
from ..transport.security import TLSConfig
from ..transport.service import CallRejected, Reply
from .grpc_peer import GrpcPeer, is_local, positional
from .messages import op_from_proto
from .round_messages import spec_from_proto

# Control calls that may reach a worker before its own organisation connected it to the run: a
# data owner asking whether the round began, a co-holder's gradients.
_BEFORE_CONNECT = ("await_round", "replica_gradients", "reduce_norm")


class WorkerHandler:
    """Serves one worker. ``run=None``: the worker joins the run its own organisation (or the
    coordinator) first connects it for, and connecting it for another run later starts it afresh."""

    def __init__(
        self,
        worker: Worker,
        run: str | None,
        tls: TLSConfig | None,
        token: str | None = None,
        co_hosted: Mapping[str, Worker] | None = None,
    ):
        """``co_hosted``: the workers of this process, which this one calls in memory."""
        self.worker, self.run, self.tls, self.token = worker, run, tls, token
        self.co_hosted = co_hosted if co_hosted is not None else {worker.name: worker}
        self._addresses: dict[str, str] = {}
        self.run_ended = threading.Event()  # set when the coordinator says the run is over

    def handle(self, header: pb.CallHeader, tensors: Named) -> Reply:
        kind = header.control.WhichOneof("kind") if header.phase == pb.CONTROL else None
        if kind in ("connect", "begin") and header.run != self.run:
            self._owner_only(header)
            self.run = header.run  # a new run: channels to peers and optimizer state start afresh
            self._addresses = {}
            if self.worker.rounds is not None:
                self.worker.rounds.last_finished = -1
        if header.run != self.run and not (self.run is None and kind in _BEFORE_CONNECT):
            raise CallRejected(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"a call of run {header.run!r} reached a worker of run {self.run!r}",
            )
        try:
            if header.phase == pb.CONTROL:
                return self._control(kind, header, tensors)
            return self._data(header, [t for _, t in tensors])
        except PermissionError as e:
            raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, str(e)) from None
        except (TimeoutError, RoundFailed) as e:
            raise CallRejected(grpc.StatusCode.ABORTED, str(e)) from None

    def _data(self, header: pb.CallHeader, values: list) -> Reply:
        w, codecs = self.worker, self.worker.plan.transport.compression
        op = op_from_proto(header.operation)
        key = CallKey(header.data_owner, header.step, header.micro_batch)
        if header.phase in (pb.FORWARD, pb.EVALUATE):
            if any(v is None for v in values):
                raise ValueError("forward inputs cannot be absent")
            outputs = w.forward(header.caller, key, op, values, keep=header.phase == pb.FORWARD)
            return Reply(positional(outputs), codecs.activations)
        if header.phase == pb.BACKWARD:
            return Reply(positional(w.backward(header.caller, key, op, values)), codecs.gradients)
        raise ValueError(f"unknown phase {header.phase}")

    def _owner_only(self, header: pb.CallHeader) -> None:
        try:
            self.worker.policy.check_owner(header.caller)
        except PermissionError as e:
            raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, str(e)) from None

    def _control(self, kind: str | None, header: pb.CallHeader, tensors: Named) -> Reply:
        w, c, policy = self.worker, header.control, self.worker.policy
        if kind in ("await_round", "finish_step", "abort_round"):
            policy.check_round_caller(header.caller, header.data_owner if kind == "finish_step" else None)
            rounds = self._rounds()
            if kind == "await_round":
                rounds.await_round(c.await_round.round, c.await_round.attempt)
            elif kind == "finish_step":
                rounds.finish_step(header.data_owner, c.finish_step.step)
            else:
                rounds.abort(c.abort_round.round, c.abort_round.attempt, c.abort_round.reason)
            return Reply()
        if kind == "replica_gradients":
            w.add_replica_grads(header.caller, header.data_owner, c.replica_gradients.step, tensors)
            return Reply()
        if kind == "reduce_norm":
            total = w.reduce_norm(header.caller, header.data_owner, c.reduce_norm.step, c.reduce_norm.squared)
            return Reply(metrics={"total": total})
        if kind is None:
            raise ValueError("a control call must say what it asks")
        policy.check_owner(header.caller)
        if kind == "connect":
            self._connect(dict(c.connect.addresses))
        elif kind == "begin":
            self._rounds().begin(spec_from_proto(c.begin), dict(tensors))
        elif kind == "wait":
            return Reply(metrics=self._rounds().wait(c.wait.timeout_s))
        elif kind == "train_batch":
            if w.data_owner is None:
                raise ValueError(f"{w.name} has no data: it trains no batch of its own")
            return Reply(metrics=w.data_owner.train_batch(c.train_batch.step, tensors[0][1], tensors[1][1]))
        elif kind == "apply_step":
            return Reply(metrics=w.apply_step(c.apply_step.step))
        elif kind == "read_state":  # views, not copies: the reply is encoded before the worker can step again
            # the master weights (fp32 in bf16-mixed) of what trains: a frozen base never changes
            return Reply([(k, p.detach()) for k, p in w.weights.master.items()])
        elif kind == "load_state":
            w.load_state(dict(tensors))
        elif kind == "read_memory":
            return Reply(metrics=w.memory())
        elif kind == "end_run":
            self.run_ended.set()
        elif kind == "read_traffic":
            traffic = w.traffic()
            return Reply(metrics={"wire_bytes": traffic.wire_bytes, "tensor_bytes": traffic.tensor_bytes})
        return Reply()

    def _rounds(self) -> Rounds:
        if self.worker.rounds is None:
            raise ValueError(f"the worker of {self.worker.name} does not run rounds on its own")
        return self.worker.rounds

    def _connect(self, addresses: Mapping[str, str]) -> None:
        """Channels to the other organisations' workers (kept while the addresses stay the same)."""
        w = self.worker
        unknown = sorted(set(addresses) - set(w.plan.orgs))
        if unknown:
            raise ValueError(f"plan {w.plan.name!r} has no organisation {', '.join(map(repr, unknown[:5]))}")
        if addresses == self._addresses and w.peers:
            return
        self.close()
        t = w.plan.transport
        limits = Limits(max_tensor_bytes=t.max_tensor_mib << 20)

        def channel(org: str, address: str) -> DataPlaneChannel:
            return DataPlaneChannel(
                org,
                address,
                caller=w.name,
                tls=self.tls,
                token=self.token,
                timeout=t.timeout_s,
                limits=limits,
                retries=t.retries,
                shared_memory=t.shared_memory and is_local(address),
            )

        peers = {
            org: LocalPeer(self.co_hosted[org], w.name)
            if org in self.co_hosted
            else GrpcPeer(channel(org, address), self.run, t.compression, t.step_timeout_s)
            for org, address in addresses.items()
        }
        w.connect({**peers, w.name: LocalPeer(w, w.name)})
        self._addresses = dict(addresses)

    def close(self) -> None:
        for peer in self.worker.peers.values():
            if isinstance(peer, GrpcPeer):
                peer.channel.close()
