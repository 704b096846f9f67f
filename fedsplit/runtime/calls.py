"""Calls between partitions: their identity, the peer interface, and the autograd bridge.

Every call names the data owner whose batch it carries, the step and the micro-batch, plus
the operation. A callee keeps the autograd graph of each forward call under that identity until
the matching backward call, so a retried call can be recognised and is never applied twice.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class CallKey:
    data_owner: str
    step: int
    micro_batch: int

    def noise_seed(self, base_seed: int, owner_index: int) -> int:
        """Seed of the router jitter of this micro-batch, identical in split and monolithic runs."""
        return ((base_seed * 1_000_003 + self.step) * 1_009 + owner_index) * 1_013 + self.micro_batch


_current: contextvars.ContextVar[CallKey] = contextvars.ContextVar("fedsplit_call")


@contextmanager
def calling(key: CallKey) -> Iterator[None]:
    """Make ``key`` the identity of every nested call made while the block runs."""
    token = _current.set(key)
    try:
        yield
    finally:
        _current.reset(token)


def current_call() -> CallKey:
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("a partitioned layer ran outside a fedsplit call (no data owner, step, micro-batch)") from None


class Peer(Protocol):
    """One organisation's partitions, as another organisation sees them (in process or gRPC)."""

    name: str
    # True when calls cross the network (worth overlapping); an in-process peer computes on the
    # caller's thread, where torch's intra-op threads give the same rounding as the monolith.
    remote: bool

    def forward(self, key: CallKey, op: str, inputs: Sequence[Tensor]) -> list[Tensor]: ...

    def backward(self, key: CallKey, op: str, grads: Sequence[Tensor | None]) -> list[Tensor | None]: ...

    def evaluate(self, key: CallKey, op: str, inputs: Sequence[Tensor]) -> list[Tensor]:
        """A forward that keeps no graph: no backward follows."""
        ...

    def add_replica_grads(self, org: str, step: int, grads: Sequence[tuple[str, Tensor]]) -> None:
        """``org``'s gradients of ``step`` on the replicas it keeps in step with this peer."""
        ...


class _RemoteCall(torch.autograd.Function):
    """Forward runs ``op`` on a peer; backward sends the output gradients to the same peer and
    returns the input gradients it computed. The anchor is an empty tensor that requires grad,
    so that even a call whose only inputs are token ids is part of the caller's graph."""

    @staticmethod
    def forward(ctx, peer: Peer, key: CallKey, op: str, anchor: Tensor, *inputs: Tensor):
        ctx.peer, ctx.key, ctx.op = peer, key, op
        ctx.input_devices = [t.device for t in inputs]
        ctx.differentiable = [t.is_floating_point() for t in inputs]
        outputs = peer.forward(key, op, [t.detach() for t in inputs])
        return tuple(o.to(anchor.device) for o in outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        input_grads = ctx.peer.backward(ctx.key, ctx.op, grads)
        out = [g.to(dev) if (g is not None and diff) else None for g, dev, diff in zip(input_grads, ctx.input_devices, ctx.differentiable)]
        return (None, None, None, None, *out)


def remote_call(peer: Peer, key: CallKey, op: str, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``op`` on ``peer`` as part of the caller's autograd graph; with gradients disabled
    (evaluation), a plain forward that leaves nothing behind on the peer."""
    device = inputs[0].device
    if not torch.is_grad_enabled():
        return tuple(o.to(device) for o in peer.evaluate(key, op, list(inputs)))
    anchor = torch.empty(0, device=device, requires_grad=True)
    return _RemoteCall.apply(peer, key, op, anchor, *inputs)


# Calls of one layer to several organisations (head groups, experts) go out together. Threads,
# not asyncio: grpcio's sync stubs were as fast as aio here and release the GIL while waiting.
_fan_out = ThreadPoolExecutor(max_workers=32, thread_name_prefix="fedsplit-fanout")


def remote_calls(calls: Sequence[tuple[Peer, CallKey, str, Sequence[Tensor]]]) -> list[Future]:
    """Start several calls at once (those to network peers on threads); each future yields
    that call's outputs."""
    grad = torch.is_grad_enabled()

    def run(call):
        with torch.set_grad_enabled(grad):
            return remote_call(*call)

    futures = []
    for call in calls:
        if call[0].remote:
            futures.append(_fan_out.submit(run, call))
        else:
            done: Future = Future()
            done.set_result(remote_call(*call))
            futures.append(done)
    return futures
