"""A :class:`~.protocols.Peer` for an organisation whose worker lives in this process: calls go
straight to it, on the caller's thread, with what the data plane would check and count: the
plan's rules for the caller (:class:`~.policy.CallPolicy`), finite values, and the bytes the
tensors would have taken on the wire."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from torch import Tensor

from ..transport.wire import check_finite
from .calls import CallKey
from .ops import Op
from .protocols import Traffic
from .worker import Worker


def _nbytes(tensors: Sequence[Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class LocalPeer:
    remote = False

    def __init__(self, worker: Worker, caller: str):
        self.worker, self.caller = worker, caller
        self._traffic = Traffic()
        self._lock = threading.Lock()  # a worker's micro-batches call at once

    @property
    def name(self) -> str:
        return self.worker.name

    def _count(self, sent: Sequence[Tensor | None], received: Sequence[Tensor | None]) -> None:
        out, back = _nbytes(sent), _nbytes(received)
        with self._lock:
            self._traffic = self._traffic + Traffic(out, back, out + back)

    def _checked(self, tensors: Sequence[Tensor | None]) -> Sequence[Tensor | None]:
        for i, t in enumerate(tensors):
            if t is not None:
                check_finite(str(i), t)
        return tensors

    def forward(self, key: CallKey, op: Op, inputs: Sequence[Tensor]) -> list[Tensor]:
        outputs = self.worker.forward(self.caller, key, op, self._checked(inputs))
        self._count(inputs, outputs)
        return outputs

    def backward(self, key: CallKey, op: Op, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        input_grads = self.worker.backward(self.caller, key, op, self._checked(grads))
        self._count(grads, input_grads)
        return input_grads

    def evaluate(self, key: CallKey, op: Op, inputs: Sequence[Tensor]) -> list[Tensor]:
        outputs = self.worker.forward(self.caller, key, op, self._checked(inputs), keep=False)
        self._count(inputs, outputs)
        return outputs

    def add_replica_grads(self, org: str, step: int, grads: Sequence[tuple[str, Tensor]]) -> None:
        self._checked([g for _, g in grads])
        self.worker.add_replica_grads(self.caller, org, step, grads)
        self._count([g for _, g in grads], [])

    def reduce_norm(self, org: str, step: int, squared: float) -> float:
        return self.worker.reduce_norm(self.caller, org, step, squared)

    def await_round(self, round: int, attempt: int) -> None:
        self.worker.policy.check_round_caller(self.caller)
        self._rounds().await_round(round, attempt)

    def finish_step(self, data_owner: str, step: int) -> None:
        self.worker.policy.check_round_caller(self.caller, data_owner)
        self._rounds().finish_step(data_owner, step)

    def abort(self, round: int, attempt: int, reason: str) -> None:
        self.worker.policy.check_round_caller(self.caller)
        self._rounds().abort(round, attempt, reason)

    def reachable(self, timeout: float) -> bool:
        return True

    def traffic(self) -> Traffic:
        return self._traffic

    def _rounds(self):
        if self.worker.rounds is None:
            raise RuntimeError(f"the worker of {self.worker.name} runs no rounds")
        return self.worker.rounds
