"""Calls between partitions: their identity and the autograd bridge that makes a call to another
organisation one node of the caller's graph.

Every call names the data owner whose batch it carries, the step and the micro-batch, plus
the operation. A callee keeps the autograd graph of each forward call under that identity until
the matching backward call, so a retried call can be recognised and is never applied twice.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .threads import compute_pool

if TYPE_CHECKING:
    from .ops import Op
    from .protocols import Peer


@dataclass(frozen=True)
class CallKey:
    data_owner: str
    step: int
    micro_batch: int

    def noise_seed(self, base_seed: int, owner_index: int) -> int:
        """Seed of the router jitter of this micro-batch, identical in split and monolithic runs."""
        seed = ((base_seed * 1_000_003 + self.step) * 1_009 + owner_index) * 1_013 + self.micro_batch
        return seed % (1 << 63)  # what a torch.Generator takes; smaller seeds are unchanged


_current: contextvars.ContextVar[CallKey] = contextvars.ContextVar("fedsplit_call")


@contextmanager
def calling(key: CallKey) -> Iterator[None]:
    """Make ``key`` the identity of every nested call made while the block runs."""
    token = _current.set(key)
    try:
        yield
    finally:
        _current.reset(token)


_anchors: contextvars.ContextVar[list[Tensor]] = contextvars.ContextVar("fedsplit_anchors")


@contextmanager
def collecting_anchors() -> Iterator[list[Tensor]]:
    """Collect the anchors of the calls made while the block runs: a callee differentiates its
    graph for them too, so that calls whose inputs need no gradient (a frozen base before them)
    still get their backward."""
    anchors: list[Tensor] = []
    token = _anchors.set(anchors)
    try:
        yield anchors
    finally:
        _anchors.reset(token)


def current_call() -> CallKey:
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError(
            "a partitioned layer ran outside a fedsplit call (no data owner, step, micro-batch)"
        ) from None


# Calls of one layer to several organisations (head groups, experts) go out together. Threads,
# not asyncio: grpcio's sync stubs were as fast as aio here and release the GIL while waiting.
_fan_out = compute_pool(32, "fedsplit-fanout")

Call = tuple["Peer", CallKey, "Op", Sequence[Tensor]]


class _Calls(torch.autograd.Function):
    """Calls to peers as one node of the caller's graph. Forward collects their replies (already
    on their way, or computed now); backward sends all their backwards at once (the autograd
    engine would run one node's backward after another's) and returns the input gradients in
    call order, so that the caller adds them up in a fixed order. The anchor is an empty tensor
    that requires grad, so that even calls whose only inputs are token ids are in the graph."""

    @staticmethod
    def forward(
        ctx, calls: Sequence[Call], collect: Callable[[], list[Sequence[Tensor]]], anchor: Tensor, *inputs: Tensor
    ):
        ctx.calls = [call[:3] for call in calls]
        ctx.input_devices = [t.device for t in inputs]
        ctx.differentiable = [t.is_floating_point() for t in inputs]
        replies = collect()
        ctx.counts = [len(r) for r in replies]
        return tuple(o.to(anchor.device) for reply in replies for o in reply)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        it = iter(grads)
        sends = [(peer, key, op, [next(it) for _ in range(n)]) for (peer, key, op), n in zip(ctx.calls, ctx.counts)]
        if len(sends) == 1:  # nothing to overlap: no hand-off to another thread
            peer, key, op, output_grads = sends[0]
            input_grads = peer.backward(key, op, output_grads)
        else:
            futures = [_fan_out.submit(peer.backward, key, op, output_grads) for peer, key, op, output_grads in sends]
            input_grads = [g for f in futures for g in f.result()]
        out = [
            g.to(dev) if (g is not None and diff) else None
            for g, dev, diff in zip(input_grads, ctx.input_devices, ctx.differentiable)
        ]
        return (None, None, None, *out)


def _in_graph(calls: Sequence[Call], collect: Callable[[], list[Sequence[Tensor]]]) -> tuple[Tensor, ...]:
    """The calls' outputs, one after another, with the calls as one node of the caller's graph."""
    inputs = [t for call in calls for t in call[3]]
    anchor = torch.empty(0, device=inputs[0].device, requires_grad=True)
    collected = _anchors.get(None)
    if collected is not None:
        collected.append(anchor)
    return _Calls.apply(calls, collect, anchor, *inputs)


def remote_call(peer: Peer, key: CallKey, op: Op, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``op`` on ``peer`` as part of the caller's autograd graph; with gradients disabled
    (evaluation), a plain forward that leaves nothing behind on the peer."""
    if not torch.is_grad_enabled():
        return tuple(o.to(inputs[0].device) for o in peer.evaluate(key, op, list(inputs)))
    return _in_graph([(peer, key, op, inputs)], lambda: [peer.forward(key, op, [t.detach() for t in inputs])])


def remote_calls(calls: Sequence[Call]) -> Callable[[], list[tuple[Tensor, ...]]]:
    """Start several calls at once and return a function that waits for them and gives each
    call's outputs; the caller computes its own share in between. Calls to network peers go out
    on threads, their backwards too (see :class:`_Calls`); in-process peers compute at once. Either
    way the calls join the caller's graph as one node when their results are taken, so that the
    caller adds up their input gradients in the same order whichever way its peers are reached."""
    grad = torch.is_grad_enabled()
    pending = [
        _fan_out.submit(peer.forward if grad else peer.evaluate, key, op, [t.detach() for t in inputs])
        if peer.remote
        else _done((peer.forward if grad else peer.evaluate)(key, op, [t.detach() for t in inputs]))
        for peer, key, op, inputs in calls
    ]

    def results() -> list[tuple[Tensor, ...]]:
        if not calls:
            return []
        if grad:
            flat = iter(_in_graph(calls, lambda: [f.result() for f in pending]))
            return [tuple(next(flat) for _ in f.result()) for f in pending]
        return [tuple(o.to(c[3][0].device) for o in f.result()) for c, f in zip(calls, pending)]

    return results


def _done(value) -> Future:
    """The reply of a call computed at once, as a finished future."""
    future: Future = Future()
    future.set_result(value)
    return future
