"""A :class:`~.protocols.Peer` for an organisation whose worker lives in this process: calls go
straight to it, on the caller's thread."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .calls import CallKey
from .ops import Op
from .protocols import Traffic
from .worker import Worker


class LocalPeer:
    remote = False

    def __init__(self, worker: Worker, caller: str):
        self.worker, self.caller = worker, caller

    @property
    def name(self) -> str:
        return self.worker.name

    def forward(self, key: CallKey, op: Op, inputs: Sequence[Tensor]) -> list[Tensor]:
        return self.worker.forward(key, op, inputs)

    def backward(self, key: CallKey, op: Op, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        return self.worker.backward(key, op, grads)

    def evaluate(self, key: CallKey, op: Op, inputs: Sequence[Tensor]) -> list[Tensor]:
        return self.worker.evaluate(key, op, inputs)

    def add_replica_grads(self, org: str, step: int, grads: Sequence[tuple[str, Tensor]]) -> None:
        self.worker.add_replica_grads(org, step, grads)

    def await_round(self, round: int) -> None:
        self._rounds().await_round(round)

    def finish_step(self, data_owner: str, step: int) -> None:
        self._rounds().finish_step(data_owner, step)

    def abort(self, round: int, reason: str) -> None:
        self._rounds().abort(round, reason)

    def reachable(self, timeout: float) -> bool:
        return True

    def traffic(self) -> Traffic:
        return Traffic()

    def _rounds(self):
        if self.worker.rounds is None:
            raise RuntimeError(f"the worker of {self.worker.name} runs no rounds")
        return self.worker.rounds
