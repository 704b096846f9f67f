"""A client of one organisation's data-plane server: one call at a time per thread, tensors in
one message each way or streamed in chunks, through shared memory when the callee is on this
host, retried while the callee is unreachable and the deadline allows."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence

import grpc

from .framing import (
    Encoded,
    Limits,
    Payload,
    WireError,
    call_frame,
    frame_pieces,
    one_message,
    parse_frame,
    payload_size,
    segment_bytes,
    to_frames,
    to_segment,
    unpack_message,
)
from .proto import dataplane_pb2 as pb
from .protocol import MESSAGE_BYTES, METHOD, METHOD_ONCE, ONE_MESSAGE_BYTES, Named, PeerError, call_kind
from .security import TLSConfig
from .shm import Segment, SegmentPool

log = logging.getLogger(__name__)


class DataPlaneChannel:
    """A client of one organisation's data-plane server."""

    def __init__(
        self,
        org: str,
        address: str,
        *,
        caller: str,
        tls: TLSConfig | None,
        token: str | None = None,
        limits: Limits = Limits(),
        timeout: float = 60.0,
        retries: int = 0,
        shared_memory: bool = False,
        payload: Payload | None = None,
    ):
        """``tls=None`` connects in plaintext: callers must ask for it explicitly.
        ``shared_memory``: the callee is on this host; tensors go through /dev/shm segments.
        ``payload``: what calls carry, torch tensors unless given (imported only then, so that a
        process relaying bytes never imports torch)."""
        if payload is None:
            from .wire import TENSORS as payload
        self.payload = payload
        self._pool = SegmentPool(caller) if shared_memory else None
        self._shm_failed = False
        self._reply_bytes: dict[str, int] = {}
        self.org, self.address, self.caller, self.limits, self.timeout, self.retries = (
            org,
            address,
            caller,
            limits,
            timeout,
            retries,
        )
        # A CallOnce reply holds whole tensors: accept one as large as the largest tensor allowed.
        options = [
            ("grpc.max_receive_message_length", max(MESSAGE_BYTES, limits.max_tensor_bytes + (1 << 20))),
            ("grpc.max_send_message_length", -1),
        ]
        if tls:
            self._channel = grpc.secure_channel(address, tls.channel_credentials(), options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._rpc, self._rpc_once = self._channel.stream_stream(METHOD), self._channel.unary_unary(METHOD_ONCE)
        self._metadata = [("x-fedsplit-org", caller)] + ([("authorization", f"Bearer {token}")] if token else [])
        self.sent_bytes = 0  # frames sent, as they cross the network
        self.received_bytes = 0
        self.tensor_bytes = 0  # the same tensors uncompressed: what activations and gradients occupy

    @property
    def wire_bytes(self) -> int:
        return self.sent_bytes + self.received_bytes

    def _sent(self, frames):
        for f in frames:
            self.sent_bytes += len(f)
            yield f

    def _received(self, frames):
        for f in frames:
            self.received_bytes += len(f)
            yield f

    def _count_tensors(self, tensors: Named) -> int:
        n = sum(self.payload.nbytes(t) for _, t in tensors if t is not None)
        self.tensor_bytes += n
        return n

    def _segments(self, encoded: Sequence[Encoded], reply_bytes: int | None) -> list[Segment]:
        """The request and reply segments of a call, or none: no shared memory here, or /dev/shm
        has no room for them (the call then goes over gRPC, and the first time says so)."""
        if self._pool is None:
            return []
        taken = []
        try:
            taken.append(self._pool.acquire(segment_bytes(e.header.nbytes for e in encoded)))
            taken.append(self._pool.acquire(payload_size(encoded) if reply_bytes is None else reply_bytes))
            return taken
        except OSError as e:
            for seg in taken:
                self._pool.release(seg)
            if not self._shm_failed:
                log.warning(
                    "shared memory for calls to %s: %s; these calls go over gRPC until it has room "
                    "(in a container, give /dev/shm more space, e.g. docker run --shm-size)",
                    self.org,
                    e,
                )
            self._shm_failed = True
            return []

    def call(
        self,
        header: pb.CallHeader,
        tensors: Named,
        timeout: float | None = None,
        codec: str = "none",
    ) -> Named:
        """The reply's tensors (see :meth:`exchange`)."""
        return self.exchange(header, tensors, timeout, codec)[1]

    def exchange(
        self,
        header: pb.CallHeader,
        tensors: Named,
        timeout: float | None = None,
        codec: str = "none",
    ) -> tuple[pb.CallHeader, Named]:
        """Send one call and wait for its reply: the reply's header (its metrics) and tensors.
        A call whose peer is unreachable is retried while the deadline allows."""
        header.caller = self.caller
        header.num_tensors = len(tensors)
        self._count_tensors(tensors)
        encoded = self.payload.prepare(tensors, codec)
        kind = call_kind(header)
        # The largest reply of this kind so far; before the first, a forward or backward is
        # expected to answer about what it was sent, a control operation anything.
        reply_bytes = self._reply_bytes.get(kind, payload_size(encoded) if header.phase != pb.CONTROL else None)
        segments = self._segments(encoded, reply_bytes)
        if segments:
            request, reply = segments
            header.shm_request, header.shm_reply, header.shm_reply_capacity = request.name, reply.name, reply.size
            header.shm_pool = self._pool.id
            body = list(to_segment(encoded, request))
        # One message each way when both fit (with shared memory, only headers travel).
        once = reply_bytes is not None and (
            bool(segments) or max(reply_bytes, payload_size(encoded)) <= ONE_MESSAGE_BYTES
        )
        if once:
            message = one_message(
                itertools.chain(
                    [(call_frame(header),)], [(f,) for f in body] if segments else frame_pieces(encoded, None)
                )
            )
        deadline = time.monotonic() + (timeout or self.timeout)
        done = False
        try:
            for attempt in itertools.count():
                remaining = max(deadline - time.monotonic(), 0.001)
                try:
                    if once:
                        self.sent_bytes += len(message)
                        answer = self._rpc_once(message, timeout=remaining, metadata=self._metadata)
                        self.received_bytes += len(answer)
                        replies = unpack_message(answer)
                    else:
                        frames = self._sent(
                            itertools.chain([call_frame(header)], body if segments else to_frames(encoded))
                        )
                        replies = self._received(self._rpc(frames, timeout=remaining, metadata=self._metadata))
                    first = parse_frame(next(replies))
                    break
                except grpc.RpcError as e:
                    # Unreachable: try again (the callee recognises a call it already did by its
                    # identity and never applies it twice) while the deadline allows.
                    pause = 0.2 * 2**attempt
                    if (
                        e.code() != grpc.StatusCode.UNAVAILABLE
                        or attempt >= self.retries
                        or time.monotonic() + pause >= deadline
                    ):
                        raise
                    time.sleep(pause)
            if isinstance(first, memoryview) or first.WhichOneof("kind") != "call":
                raise WireError("a reply must start with a call header frame")
            out = self.payload.decode(
                replies, first.call.num_tensors, self.limits, segments[1] if segments else None, view_segment=True
            )
            released = first.call.shm_released
            self._count_tensors(out)
            size = segment_bytes(self.payload.nbytes(t) for _, t in out if t is not None)
            self._reply_bytes[kind] = max(self._reply_bytes.get(kind, 0), size)
            done = True
            return first.call, out
        except grpc.RpcError as e:
            raise PeerError(self.org, self.address, e.code(), e.details() or "") from None
        except (WireError, StopIteration) as e:
            raise PeerError(self.org, self.address, None, f"malformed reply: {e}") from None
        finally:
            if segments and done:
                request, reply = segments
                self._pool.lend(request)
                self._pool.release(reply)
                self._pool.returned(released)
            elif segments:
                for seg in segments:
                    self._pool.discard(seg)

    def reachable(self, timeout: float = 1.0) -> bool:
        """Whether a connection to the peer can be (or is) established within ``timeout``."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False
        except ValueError:  # closed here (replaced by a new connection): says nothing about the peer
            return True

    def close(self) -> None:
        self._channel.close()
        if self._pool is not None:
            self._pool.close()
