"""A :class:`~fedsplit.runtime.calls.Peer` that reaches another organisation's worker over the
gRPC data plane."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..plan.schema import CompressionConfig
from ..runtime.calls import CallKey
from ..transport.proto import dataplane_pb2 as pb
from ..transport.service import DataPlaneChannel, Named


def is_local(address: str) -> bool:
    """Whether a data-plane address is on this host (where shared memory can replace the wire)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _header(run: str, key: CallKey, op: str, phase: int) -> pb.CallHeader:
    return pb.CallHeader(
        run=run, data_owner=key.data_owner, step=key.step, micro_batch=key.micro_batch, op=op, phase=phase
    )


def positional(tensors: Sequence[Tensor | None]) -> Named:
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
            _header(self.run, key, op, pb.FORWARD), positional(inputs), codec=self.compression.activations
        )
        return [t for _, t in reply]

    def backward(self, key: CallKey, op: str, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        reply = self.channel.call(
            _header(self.run, key, op, pb.BACKWARD), positional(grads), codec=self.compression.gradients
        )
        return [t for _, t in reply]

    def evaluate(self, key: CallKey, op: str, inputs: Sequence[Tensor]) -> list[Tensor]:
        reply = self.channel.call(
            _header(self.run, key, op, pb.EVALUATE), positional(inputs), codec=self.compression.activations
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
