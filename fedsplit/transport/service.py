"""The gRPC data plane: a server that hands validated calls to a handler, and a client channel.

The methods are registered without (de)serializers: frames are bytes that :mod:`.wire` builds
and parses, so tensor bytes are never copied by protobuf. A call whose tensors (both ways) fit
in ``ONE_MESSAGE_BYTES`` goes as one message each way (``CallOnce``); larger ones stream in
chunks. Every failure reaches the caller as a gRPC status with a reason (``INVALID_ARGUMENT``
for a malformed or inconsistent message, ``UNAUTHENTICATED``/``PERMISSION_DENIED`` for
credentials, ``DEADLINE_EXCEEDED`` and ``UNAVAILABLE`` for a slow or dead peer, ``ABORTED`` when
a nested call to a third organisation failed); the server keeps serving.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from torch import Tensor

from .proto import dataplane_pb2 as pb
from .security import TLSConfig, token_verifier
from .shm import AttachedSegments, Segment, SegmentPool
from .wire import (
    Encoded,
    Limits,
    WireError,
    call_frame,
    decode_tensors,
    frame_pieces,
    one_message,
    parse_frame,
    payload_size,
    prepare,
    segment_bytes,
    to_frames,
    to_segment,
    unpack_message,
)

log = logging.getLogger(__name__)

METHOD, METHOD_ONCE = "/fedsplit.v1.DataPlane/Call", "/fedsplit.v1.DataPlane/CallOnce"
# Above this, one message per call costs more (fresh multi-MiB buffers, no overlap of sending and
# decoding) than a stream's per-message overhead; below it, the stream's overhead dominates.
ONE_MESSAGE_BYTES = 16 << 20
_MESSAGE_BYTES = 64 << 20  # what a server accepts in one message: chunks, or a CallOnce request

Named = list[tuple[str, Tensor | None]]


class CallRejected(Exception):
    """Raised by a handler to refuse a call with a specific status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class PeerError(RuntimeError):
    """A call to another organisation failed; the message names it, its address and why."""

    def __init__(self, org: str, address: str, code: grpc.StatusCode | None, details: str):
        self.org, self.address, self.code, self.details = org, address, code, details
        status = code.name if code else "ERROR"
        super().__init__(f"call to organisation '{org}' at {address} failed: {status}: {details}")


@dataclass(frozen=True)
class Reply:
    """What a handler answers: tensors (sent with ``codec``) and, for control calls, metrics."""

    tensors: Named = ()
    codec: str = "none"
    metrics: Mapping[str, float] = field(default_factory=dict)


class Handler(Protocol):
    def handle(self, header: pb.CallHeader, tensors: Named) -> Reply:
        """The reply tensors and the codec to send them with."""
        ...


@dataclass(frozen=True)
class Credentials:
    """What a server checks callers' bearer tokens against: each organisation's token verifier
    (:func:`~.security.token_verifier`), never the tokens themselves."""

    verifiers: Mapping[str, str]

    @classmethod
    def of_tokens(cls, tokens: Mapping[str, str]) -> Credentials:
        return cls({org: token_verifier(token) for org, token in tokens.items()})

    def check(self, org: str, token: str) -> bool:
        expected = self.verifiers.get(org)
        return expected is not None and hmac.compare_digest(expected, token_verifier(token))


class DataPlaneServer:
    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: TLSConfig | None,
        credentials: Credentials | None = None,
        limits: Limits = Limits(),
        max_workers: int = 32,
    ):
        """``tls=None`` serves in plaintext: callers must ask for it explicitly."""
        self.handler, self.credentials, self.limits = handler, credentials, limits
        self._segments = AttachedSegments()
        # A CallOnce reply may exceed ONE_MESSAGE_BYTES when a caller underestimated it; the
        # caller's own limit (its largest tensor) is the one that matters.
        options = [("grpc.max_receive_message_length", _MESSAGE_BYTES), ("grpc.max_send_message_length", -1)]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
        handlers = {
            "Call": grpc.stream_stream_rpc_method_handler(self._call),
            "CallOnce": grpc.unary_unary_rpc_method_handler(self._call_once),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("fedsplit.v1.DataPlane", handlers),)
        )
        bind = f"{host}:{port}"
        self.port = (
            self._server.add_secure_port(bind, tls.server_credentials())
            if tls
            else self._server.add_insecure_port(bind)
        )
        self.address = f"{host}:{self.port}"

    def start(self) -> DataPlaneServer:
        self._server.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace)

    def wait(self) -> None:
        self._server.wait_for_termination()

    def _authenticate(self, context: grpc.ServicerContext, header: pb.CallHeader) -> None:
        if self.credentials is None:
            return
        meta = dict(context.invocation_metadata())
        org, token = meta.get("x-fedsplit-org", ""), meta.get("authorization", "").removeprefix("Bearer ")
        if not self.credentials.check(org, token):
            raise CallRejected(grpc.StatusCode.UNAUTHENTICATED, f"no valid credential for organisation {org!r}")
        if header.caller != org:
            raise CallRejected(
                grpc.StatusCode.PERMISSION_DENIED, f"organisation {org!r} cannot call on behalf of {header.caller!r}"
            )

    def _serve(
        self, frames, context: grpc.ServicerContext
    ) -> tuple[pb.CallHeader, list[Encoded], Segment | None, Mapping[str, float]]:
        """Check and run one call; its header, encoded outputs, the segment to reply in and the
        reply's metrics. Request
        tensors in shared memory are read in place: the caller lent their segment."""
        header = None
        try:
            first = next(frames, None)
            header = parse_frame(first) if first is not None else None
            if header is None or isinstance(header, memoryview) or header.WhichOneof("kind") != "call":
                raise WireError("a call must start with a call header frame")
            header = header.call
            self._authenticate(context, header)
            request_segment = self._segments.get(header.shm_request) if header.shm_request else None
            tensors = decode_tensors(frames, header.num_tensors, self.limits, request_segment, view_segment=True)
            if request_segment is not None:
                self._segments.borrow((header.caller, header.shm_pool), request_segment)
            reply = self.handler.handle(header, tensors)
            encoded = prepare(reply.tensors, reply.codec)
            reply_segment = None
            if header.shm_reply and segment_bytes(e.header.nbytes for e in encoded) <= header.shm_reply_capacity:
                reply_segment = self._segments.get(header.shm_reply, header.shm_reply_capacity)
            return header, encoded, reply_segment, reply.metrics
        except WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except CallRejected as e:
            context.abort(e.code, str(e))
        except (ValueError, KeyError, TypeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e).strip("'\""))
        except PeerError as e:  # a nested call to a third organisation failed: not worth a retry here
            context.abort(grpc.StatusCode.ABORTED, str(e))
        except Exception as e:  # never take the server down; report and keep serving
            log.exception("call %s failed", call_kind(header) if header is not None else "?")
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    def _reply_failed(self, context: grpc.ServicerContext, header: pb.CallHeader, e: Exception):
        log.exception("reply to %s failed", call_kind(header))
        context.abort(grpc.StatusCode.INTERNAL, f"cannot send the reply: {type(e).__name__}: {e}")

    def _reply_header(self, header: pb.CallHeader, num_tensors: int, metrics: Mapping[str, float]) -> bytes:
        """The reply's call frame, naming the lent segments this caller may reuse now. Called
        once the reply no longer needs the request tensors (a reply that still streams them
        gives their segment back in a later reply)."""
        released = self._segments.released((header.caller, header.shm_pool)) if header.shm_request else []
        return call_frame(pb.CallHeader(num_tensors=num_tensors, shm_released=released, metrics=dict(metrics)))

    def _call(self, frames, context: grpc.ServicerContext):
        header, encoded, reply_segment, metrics = self._serve(frames, context)
        try:
            body = list(to_segment(encoded, reply_segment)) if reply_segment else to_frames(encoded)
            count = len(encoded)
            del encoded
            yield self._reply_header(header, count, metrics)
            yield from body
        except Exception as e:
            self._reply_failed(context, header, e)

    def _call_once(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        header, encoded, reply_segment, metrics = self._serve(unpack_message(request), context)
        try:
            body = (
                [(f,) for f in to_segment(encoded, reply_segment)]
                if reply_segment
                else list(frame_pieces(encoded, None))
            )
            count = len(encoded)
            del encoded
            return one_message([(self._reply_header(header, count, metrics),), *body])
        except Exception as e:
            self._reply_failed(context, header, e)


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
    ):
        """``tls=None`` connects in plaintext: callers must ask for it explicitly.
        ``shared_memory``: the callee is on this host; tensors go through /dev/shm segments."""
        self._pool = SegmentPool() if shared_memory else None
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
            ("grpc.max_receive_message_length", max(_MESSAGE_BYTES, limits.max_tensor_bytes + (1 << 20))),
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

    def _count_tensors(self, tensors: Sequence[tuple[str, Tensor | None]]) -> int:
        n = sum(t.numel() * t.element_size() for _, t in tensors if t is not None)
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
        tensors: Sequence[tuple[str, Tensor | None]],
        timeout: float | None = None,
        codec: str = "none",
    ) -> Named:
        """The reply's tensors (see :meth:`exchange`)."""
        return self.exchange(header, tensors, timeout, codec)[1]

    def exchange(
        self,
        header: pb.CallHeader,
        tensors: Sequence[tuple[str, Tensor | None]],
        timeout: float | None = None,
        codec: str = "none",
    ) -> tuple[pb.CallHeader, Named]:
        """Send one call and wait for its reply: the reply's header (its metrics) and tensors.
        A call whose peer is unreachable is retried while the deadline allows."""
        header.caller = self.caller
        header.num_tensors = len(tensors)
        self._count_tensors(tensors)
        encoded = prepare(tensors, codec)
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
            out = decode_tensors(
                replies, first.call.num_tensors, self.limits, segments[1] if segments else None, view_segment=True
            )
            released = first.call.shm_released
            self._count_tensors(out)
            size = segment_bytes(t.numel() * t.element_size() for _, t in out if t is not None)
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


def call_kind(header: pb.CallHeader) -> str:
    """What a call is, for logs and for sizing its reply: its phase and its operation's or
    control's kind (``FORWARD segment``, ``CONTROL read_state``)."""
    kind = header.operation.WhichOneof("kind") or header.control.WhichOneof("kind") or "call"
    return f"{pb.Phase.Name(header.phase)} {kind}"
