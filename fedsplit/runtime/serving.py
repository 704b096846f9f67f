"""Serving forwards and backwards: each forward's autograd graph is kept under the call's
identity (data owner, step, micro-batch, operation) until its backward, which hands the
parameter gradients to the gradient book and returns the input gradients.

A call that arrives again (a retry after a lost reply) is answered from what the first one
left, never computed or applied twice, even after its backward. What a stage holds is bounded:
at most ``max_records`` forwards wait for their backward at once (the most one step can have).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .calls import CallKey, calling, collecting_anchors
from .gradients import GradientBook
from .ops import Op

Compute = Callable[[CallKey, Op, list[Tensor]], tuple[Tensor, ...]]


def _keep(t: Tensor) -> Tensor:
    return t


@dataclass
class _Record:
    inputs: list[Tensor]
    outputs: list[Tensor]
    anchors: list[Tensor]  # of the calls the forward made (see calls.collecting_anchors)


class Stage:
    """The calls one worker serves, with ``compute`` doing the arithmetic of an operation."""

    def __init__(
        self,
        org: str,
        compute: Compute,
        params: Mapping[str, nn.Parameter],
        grads: GradientBook,
        device: torch.device,
        max_records: int,
    ):
        self.org, self.compute, self.params, self.grads, self.device = org, compute, params, grads, device
        self.max_records = max_records
        self._records: dict[tuple[CallKey, Op], _Record] = {}
        # answered backwards: the forward's outputs and the input gradients, until the step ends
        self._done: dict[tuple[CallKey, Op], tuple[list[Tensor], list[Tensor | None]]] = {}
        self._lock = threading.Lock()

    def forward(self, key: CallKey, op: Op, inputs: Sequence[Tensor]) -> list[Tensor]:
        done = self._records.get((key, op))
        if done is not None:  # a retried call: answer it again, compute nothing
            return [o.detach() for o in done.outputs]
        answered = self._done.get((key, op))
        if answered is not None:  # a retry whose backward came already: the same answer, nothing kept
            return answered[0]
        if len(self._records) >= self.max_records:
            raise ValueError(
                f"{self.org} holds {len(self._records)} forwards waiting for their backward, the most a step can have"
            )
        leaves = [t.to(self.device).detach().requires_grad_(t.is_floating_point()) for t in inputs]
        # A caller in this process may be inside an activation-checkpointed block: its saved-tensor
        # hooks must not take this graph's tensors (its recompute gets this call's answer from the
        # record, without computing), so this graph saves under hooks of its own.
        with (
            calling(key),
            collecting_anchors() as anchors,
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(_keep, _keep),
        ):
            outputs = list(self.compute(key, op, leaves))
        with self._lock:
            self._records[(key, op)] = _Record(leaves, outputs, anchors)
        return [o.detach() for o in outputs]

    def evaluate(self, key: CallKey, op: Op, inputs: Sequence[Tensor]) -> list[Tensor]:
        """A forward for held-out evaluation: no graph is kept, nothing waits for a backward."""
        with calling(key), torch.no_grad():
            return list(self.compute(key, op, [t.to(self.device) for t in inputs]))

    def backward(self, key: CallKey, op: Op, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """The input gradients of a forward, given one gradient (or None) per output of the
        forward, shaped and typed like it (ValueError otherwise, and the forward stays)."""
        if (key, op) in self._done:
            return self._done[(key, op)][1]
        with self._lock:
            record = self._records.get((key, op))
            if record is None:
                raise KeyError(f"{self.org}: backward of {op} for {key} without a forward")
            if len(grads) != len(record.outputs) or any(
                g is not None and (g.shape != o.shape or g.dtype != o.dtype) for g, o in zip(grads, record.outputs)
            ):
                got = [None if g is None else (tuple(g.shape), str(g.dtype)) for g in grads]
                want = [(tuple(o.shape), str(o.dtype)) for o in record.outputs]
                raise ValueError(f"{self.org}: gradients for {op} must match its outputs {want}, got {got}")
            del self._records[(key, op)]
        pairs = [(o, g.to(self.device)) for o, g in zip(record.outputs, grads) if o.requires_grad and g is not None]
        wrt_inputs = [t for t in record.inputs if t.requires_grad]
        names = list(self.params)
        if pairs:
            with calling(key):
                result = torch.autograd.grad(
                    [o for o, _ in pairs],
                    wrt_inputs + [self.params[n] for n in names] + record.anchors,
                    [g for _, g in pairs],
                    allow_unused=True,
                )
        else:
            result = (None,) * (len(wrt_inputs) + len(names))
        self.grads.add(key.data_owner, {n: g for n, g in zip(names, result[len(wrt_inputs) :]) if g is not None})
        it = iter(result[: len(wrt_inputs)])
        input_grads = [next(it) if t.requires_grad else None for t in record.inputs]
        self._done[(key, op)] = ([o.detach() for o in record.outputs], input_grads)
        return input_grads

    @property
    def waiting(self) -> int:
        """Forwards still waiting for their backward."""
        return len(self._records)

    def end_step(self) -> None:
        """The step is applied: no backward of it can come again."""
        self._done.clear()

    def clear(self) -> None:
        """Drop what a failed step left: saved graphs and answered calls."""
        with self._lock:
            self._records.clear()
            self._done.clear()
