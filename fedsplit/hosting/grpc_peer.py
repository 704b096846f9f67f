"""A :class:`~fedsplit.runtime.protocols.Peer` that reaches another organisation's worker over the
gRPC data plane. Activations (forward) and gradients (backward) go with the plan's codec for
their role; the step barrier's calls wait as long as the barrier does."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..plan.schema import CompressionConfig
from ..runtime.calls import CallKey
from ..runtime.ops import Op
from ..runtime.protocols import Traffic
from ..transport.channel import DataPlaneChannel
from ..transport.proto import dataplane_pb2 as pb
from ..transport.protocol import Named
from .messages import op_to_proto

ABORT_TIMEOUT_S = 10.0  # an abort is best effort: the organisation told may be the one that is gone


def is_local(address: str) -> bool:
    """Whether a data-plane address is on this host (where shared memory can replace the wire)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def positional(tensors: Sequence[Tensor | None]) -> Named:
    return [(str(i), t) for i, t in enumerate(tensors)]


class GrpcPeer:
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

    def _call(self, key: CallKey, op: Op, phase: int, tensors: Sequence[Tensor | None], codec: str) -> list:
        header = pb.CallHeader(
            run=self.run,
            data_owner=key.data_owner,
            step=key.step,
            micro_batch=key.micro_batch,
            operation=op_to_proto(op),
            phase=phase,
        )
        return [t for _, t in self.channel.call(header, positional(tensors), codec=codec)]

    def forward(self, key: CallKey, op: Op, inputs: Sequence[Tensor]) -> list[Tensor]:
        return self._call(key, op, pb.FORWARD, inputs, self.compression.activations)

    def backward(self, key: CallKey, op: Op, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        return self._call(key, op, pb.BACKWARD, grads, self.compression.gradients)

    def evaluate(self, key: CallKey, op: Op, inputs: Sequence[Tensor]) -> list[Tensor]:
        return self._call(key, op, pb.EVALUATE, inputs, self.compression.activations)

    def add_replica_grads(self, org: str, step: int, grads: Sequence[tuple[str, Tensor]]) -> None:
        control = pb.Control(replica_gradients=pb.ReplicaGradients(step=step))
        self.channel.call(pb.CallHeader(run=self.run, phase=pb.CONTROL, data_owner=org, control=control), list(grads))

    def reduce_norm(self, org: str, step: int, squared: float) -> float:
        control = pb.Control(reduce_norm=pb.ReduceNorm(step=step, squared=squared))
        header = pb.CallHeader(run=self.run, phase=pb.CONTROL, data_owner=org, control=control)
        reply, _ = self.channel.exchange(header, [], timeout=self.step_timeout + self.channel.timeout)
        return reply.metrics["total"]

    # RoundControl: these wait on the callee's step barrier, so their deadline is the barrier's.
    def await_round(self, round: int, attempt: int) -> None:
        self._barrier(pb.Control(await_round=pb.AwaitRound(round=round, attempt=attempt)))

    def finish_step(self, data_owner: str, step: int) -> None:
        self._barrier(pb.Control(finish_step=pb.FinishStep(step=step)), data_owner=data_owner)

    def abort(self, round: int, attempt: int, reason: str) -> None:
        control = pb.Control(abort_round=pb.AbortRound(round=round, attempt=attempt, reason=reason))
        self.channel.call(pb.CallHeader(run=self.run, phase=pb.CONTROL, control=control), [], timeout=ABORT_TIMEOUT_S)

    def _barrier(self, control: pb.Control, data_owner: str = "") -> None:
        header = pb.CallHeader(run=self.run, phase=pb.CONTROL, data_owner=data_owner, control=control)
        self.channel.call(header, [], timeout=self.step_timeout + self.channel.timeout)

    def reachable(self, timeout: float) -> bool:
        return self.channel.reachable(timeout)

    def traffic(self) -> Traffic:
        c = self.channel
        return Traffic(c.sent_bytes, c.received_bytes, c.tensor_bytes)
