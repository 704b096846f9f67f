"""The interfaces between the runtime's parts, whichever side of a network they are on.

* :class:`Peer`: one organisation's worker as another organisation sees it. The in-process
  :class:`~fedsplit.runtime.local.LocalPeer` and :class:`~fedsplit.hosting.grpc_peer.GrpcPeer`
  implement it; a worker never knows which one it calls.
* :class:`Federation`: a whole federation driven step by step, by ``verify`` and the tests: the
  in-process :class:`~fedsplit.runtime.inprocess.InProcessFederation` and the one worker process
  per organisation of :class:`~fedsplit.hosting.processes.ProcessFederation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from ..plan import Partition, Plan
    from .calls import CallKey
    from .ops import Op

Batches = Mapping[str, tuple[Tensor, Tensor]]  # data owner -> (tokens, labels)


@dataclass(frozen=True)
class Traffic:
    """Data-plane bytes of the calls one organisation made: as they crossed the wire (sent and
    received) and as the uncompressed tensors they carried."""

    sent: int = 0
    received: int = 0
    tensor_bytes: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.sent + other.sent, self.received + other.received, self.tensor_bytes + other.tensor_bytes)

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.sent - other.sent, self.received - other.received, self.tensor_bytes - other.tensor_bytes)

    @property
    def wire_bytes(self) -> int:
        return self.sent + self.received


class RoundControl(Protocol):
    """What a data owner asks of each organisation on its path to keep a round in step."""

    def await_round(self, round: int, attempt: int) -> None:
        """Returns once the organisation has begun that attempt of ``round`` (holds its weights)."""
        ...

    def finish_step(self, data_owner: str, step: int) -> None:
        """``data_owner``'s batch of ``step`` went through; returns once the organisation applied the step."""
        ...

    def abort(self, round: int, attempt: int, reason: str) -> None: ...


class Peer(RoundControl, Protocol):
    """One organisation's partitions, as another organisation sees them."""

    name: str
    # True when calls cross the network (worth overlapping on threads); an in-process peer
    # computes on the caller's thread.
    remote: bool

    def forward(self, key: CallKey, op: Op, inputs: Sequence[Tensor]) -> list[Tensor]: ...

    def backward(self, key: CallKey, op: Op, grads: Sequence[Tensor | None]) -> list[Tensor | None]: ...

    def evaluate(self, key: CallKey, op: Op, inputs: Sequence[Tensor]) -> list[Tensor]:
        """A forward that keeps no graph: no backward follows."""
        ...

    def add_replica_grads(self, org: str, step: int, grads: Sequence[tuple[str, Tensor]]) -> None:
        """``org``'s gradients of ``step`` on the replicas it keeps in step with this peer."""
        ...

    def reduce_norm(self, org: str, step: int, squared: float) -> float:
        """(To the step's reducer) ``org``'s share of the squared gradient norm of ``step``; the
        whole model's, once every organisation of the step has sent its share."""
        ...

    def reachable(self, timeout: float) -> bool:
        """Whether the peer can be reached (or is connected) within ``timeout`` seconds."""
        ...

    def traffic(self) -> Traffic:
        """Bytes of the calls made to this peer so far."""
        ...


class Federation(Protocol):
    """Every organisation of a plan, trained one step at a time."""

    plan: Plan

    def train_step(self, step: int, batches: Batches) -> dict[str, dict[str, float]]:
        """Every data owner's batch forward and backward, then every organisation's optimizer
        step; each data owner's metrics."""
        ...

    def replicas(self, partition: Partition) -> dict[str, dict[str, Tensor]]: ...

    def load_partition(self, partition: Partition, state: Mapping[str, Tensor]) -> None: ...

    def reassembled(self) -> dict[str, Tensor]: ...

    def close(self) -> None: ...
