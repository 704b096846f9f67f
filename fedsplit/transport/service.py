"""The gRPC data plane's server, which hands validated calls to a handler, and what it shares with
the client channel (:mod:`.channel`).

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
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from .framing import (
    MAX_NAME,
    Encoded,
    Limits,
    WireError,
    call_frame,
    check_call_header,
    frame_pieces,
    one_message,
    parse_frame,
    segment_bytes,
    to_frames,
    to_segment,
    unpack_message,
)
from .proto import dataplane_pb2 as pb
from .protocol import MESSAGE_BYTES, METHOD, METHOD_ONCE, Named, PeerError, call_kind
from .security import TLSConfig, token_verifier
from .shm import AttachedSegments, Segment, segment_owner
from .wire import decode_tensors, prepare

log = logging.getLogger(__name__)


class CallRejected(Exception):
    """Raised by a handler to refuse a call with a specific status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


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


MAX_REASON = 512  # characters of a refusal's reason: what it echoes of the request is cut to fit


def _reason(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


class _Ticket:
    """One admitted call's place in its caller's quota, given back exactly once: when the call
    ends, or when gRPC drops the call's behaviour without running it (a request that never
    arrived)."""

    def __init__(self, open_calls: dict[str, int], lock: threading.Lock, org: str):
        self._open, self._lock, self._org, self._held = open_calls, lock, org, True

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._open[self._org] -= 1
                if not self._open[self._org]:  # callers' names (without credentials, any) never pile up
                    del self._open[self._org]


class _IdleWatch:
    """Cancels streams that go ``idle_s`` without sending their next frame, so that a caller who
    opens a stream and sends nothing (or trickles) holds a server thread only that long."""

    def __init__(self, idle_s: float):
        self.idle_s = idle_s
        self._waiting: dict[int, tuple[float, grpc.ServicerContext]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def frames(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        key = next(self._ids)
        while True:
            with self._lock:
                self._waiting[key] = (time.monotonic() + self.idle_s, context)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._watch, name="fedsplit-idle", daemon=True)
                    self._thread.start()
            try:
                frame = next(frames, None)
            except grpc.RpcError:  # cancelled: by the caller, or here for being idle
                raise WireError(f"the stream was cancelled (or sent nothing for {self.idle_s:g} s)") from None
            finally:
                with self._lock:
                    self._waiting.pop(key, None)
            if frame is None:
                return
            yield frame

    def _watch(self) -> None:
        while True:
            time.sleep(min(max(self.idle_s / 4, 0.05), 1.0))
            now = time.monotonic()
            with self._lock:
                late = [k for k, (deadline, _) in self._waiting.items() if deadline < now]
                contexts = [self._waiting.pop(k)[1] for k in late]
            for context in contexts:
                context.cancel()


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
        calls_per_caller: int = 64,
        callers: int = 4,
        idle_s: float = 30.0,
        shared_memory: bool = False,
    ):
        """``tls=None`` serves in plaintext: callers must ask for it explicitly. Each caller may
        have ``calls_per_caller`` calls open at once, and there are server threads for that many
        calls of ``callers`` callers (the organisations with a credential, when there are
        credentials), so no caller can take the threads another needs. ``idle_s``: how long a
        stream may go without sending its next frame. ``shared_memory``: whether callers on this
        host may pass tensors through /dev/shm (the plan's ``transport.shared_memory``)."""
        self.handler, self.credentials, self.limits = handler, credentials, limits
        self.shared_memory = shared_memory
        self._segments = AttachedSegments()
        self._calls_per_caller = calls_per_caller
        threads = calls_per_caller * (len(credentials.verifiers) if credentials else callers)
        self._open: dict[str, int] = {}
        self._open_lock = threading.Lock()
        self._idle = _IdleWatch(idle_s)
        # A CallOnce reply may exceed ONE_MESSAGE_BYTES when a caller underestimated it; the
        # caller's own limit (its largest tensor) is the one that matters.
        options = [("grpc.max_receive_message_length", MESSAGE_BYTES), ("grpc.max_send_message_length", -1)]
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads), options=options, maximum_concurrent_rpcs=threads
        )
        self._server.add_generic_rpc_handlers((_Admission(self),))
        bind = f"{host}:{port}"
        self.port = (
            self._server.add_secure_port(bind, tls.server_credentials())
            if tls
            else self._server.add_insecure_port(bind)
        )
        self.address = f"{host}:{self.port}"
        self._mutual_tls = bool(tls and tls.mutual)

    def start(self) -> DataPlaneServer:
        self._server.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace)

    def wait(self) -> None:
        self._server.wait_for_termination()

    def admit(self, metadata: Mapping[str, str]) -> tuple[str, _Ticket]:
        """The calling organisation and its place in its quota (:class:`CallRejected` if refused),
        checked on the call's metadata, before the call holds a server thread or reads a frame."""
        org = metadata.get("x-fedsplit-org", "")
        if self.credentials is not None:
            token = metadata.get("authorization", "").removeprefix("Bearer ")
            if not self.credentials.check(org, token):
                raise CallRejected(
                    grpc.StatusCode.UNAUTHENTICATED, _reason(f"no valid credential for organisation {org!r}")
                )
        elif len(org) > MAX_NAME:
            raise CallRejected(grpc.StatusCode.INVALID_ARGUMENT, "the caller's name is too long")
        with self._open_lock:
            if self._open.get(org, 0) >= self._calls_per_caller:
                raise CallRejected(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    _reason(f"organisation {org!r} has {self._calls_per_caller} calls open here, the most it may"),
                )
            self._open[org] = self._open.get(org, 0) + 1
        return org, _Ticket(self._open, self._open_lock, org)

    def _check_certificate(self, context: grpc.ServicerContext, org: str) -> None:
        """With mutual TLS the caller's certificate must name the organisation its token is of:
        one organisation's certificate with another's token is refused."""
        if not self._mutual_tls:
            return
        auth = context.auth_context()
        names = {n.decode(errors="replace") for n in auth.get("x509_common_name", [])}
        if org not in names:
            raise CallRejected(
                grpc.StatusCode.PERMISSION_DENIED,
                _reason(f"the caller's certificate is of {', '.join(sorted(names)) or 'no organisation'}, not {org!r}"),
            )

    def _check_shared_memory(self, context: grpc.ServicerContext, header: pb.CallHeader) -> None:
        """Shared memory only where the plan turns it on, from a caller on this host, in segments
        that caller's own pool made."""
        named = [n for n in (header.shm_request, header.shm_reply) if n]
        if not named:
            return
        if not self.shared_memory:
            raise WireError("shared memory is off for this worker (the plan's transport.shared_memory)")
        peer = context.peer()
        if not (peer.startswith(("ipv4:127.", "ipv6:[::1]", "unix:"))):
            raise WireError("shared memory is only for callers on this host")
        for name in named:
            if segment_owner(name) != header.caller:
                raise WireError(f"segment {name[:100]!r} is not one of {header.caller!r}'s")

    def _serve(
        self, frames, context: grpc.ServicerContext, org: str
    ) -> tuple[pb.CallHeader, list[Encoded], Segment | None, Mapping[str, float]]:
        """Check and run one call; its header, encoded outputs, the segment to reply in and the
        reply's metrics. Request
        tensors in shared memory are read in place: the caller lent their segment."""
        header = None
        try:
            self._check_certificate(context, org)
            first = next(frames, None)
            header = parse_frame(first) if first is not None else None
            if header is None or isinstance(header, memoryview) or header.WhichOneof("kind") != "call":
                raise WireError("a call must start with a call header frame")
            header = header.call
            check_call_header(header)
            if self.credentials is not None and header.caller != org:
                raise CallRejected(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"organisation {org!r} cannot call on behalf of {header.caller!r}",
                )
            self._check_shared_memory(context, header)
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
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _reason(str(e)))
        except CallRejected as e:
            context.abort(e.code, _reason(str(e)))
        except (ValueError, KeyError, TypeError, IndexError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _reason(str(e).strip("'\"")))
        except PeerError as e:  # a nested call to a third organisation failed: not worth a retry here
            context.abort(grpc.StatusCode.ABORTED, _reason(str(e)))
        except Exception as e:  # never take the server down; report and keep serving
            log.exception("call %s failed", call_kind(header) if header is not None else "?")
            context.abort(grpc.StatusCode.INTERNAL, _reason(f"{type(e).__name__}: {e}"))

    def _reply_failed(self, context: grpc.ServicerContext, header: pb.CallHeader, e: Exception):
        log.exception("reply to %s failed", call_kind(header))
        context.abort(grpc.StatusCode.INTERNAL, f"cannot send the reply: {type(e).__name__}: {e}")

    def _reply_header(self, header: pb.CallHeader, num_tensors: int, metrics: Mapping[str, float]) -> bytes:
        """The reply's call frame, naming the lent segments this caller may reuse now. Called
        once the reply no longer needs the request tensors (a reply that still streams them
        gives their segment back in a later reply)."""
        released = self._segments.released((header.caller, header.shm_pool)) if header.shm_request else []
        return call_frame(pb.CallHeader(num_tensors=num_tensors, shm_released=released, metrics=dict(metrics)))

    def _call(self, frames, context: grpc.ServicerContext, org: str):
        header, encoded, reply_segment, metrics = self._serve(self._idle.frames(frames, context), context, org)
        try:
            body = list(to_segment(encoded, reply_segment)) if reply_segment else to_frames(encoded)
            count = len(encoded)
            del encoded
            yield self._reply_header(header, count, metrics)
            yield from body
        except Exception as e:
            self._reply_failed(context, header, e)

    def _call_once(self, frames: Iterator[bytes], context: grpc.ServicerContext, org: str) -> Iterator[bytes]:
        """CallOnce: one request message, one reply message."""
        try:
            request = next(frames, None)
        except WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a CallOnce call carries one message")
        header, encoded, reply_segment, metrics = self._serve(unpack_message(request), context, org)
        try:
            body = (
                [(f,) for f in to_segment(encoded, reply_segment)]
                if reply_segment
                else list(frame_pieces(encoded, None))
            )
            count = len(encoded)
            del encoded
            return iter([one_message([(self._reply_header(header, count, metrics),), *body])])
        except Exception as e:
            self._reply_failed(context, header, e)


class _Admission(grpc.GenericRpcHandler):
    """Admits calls on gRPC's polling thread, before any takes a server thread: a call without a
    valid credential, or beyond its caller's quota, is refused at once."""

    def __init__(self, server: DataPlaneServer):
        self.server = server

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method not in (METHOD, METHOD_ONCE):
            return None
        try:
            org, ticket = self.server.admit({k: v for k, v in details.invocation_metadata if isinstance(v, str)})
        except CallRejected as rejected:
            return _refusal(rejected)

        def behaviour(frames, context: grpc.ServicerContext):
            if not context.add_callback(ticket.release):
                ticket.release()
            return calls(self.server._idle.frames(frames, context), context, org)

        # Both methods are served as streams, CallOnce's one message included (the wire is the
        # same): gRPC reads a unary request before the handler runs, with no deadline of ours.
        calls = self.server._call_once if details.method == METHOD_ONCE else self.server._call
        weakref.finalize(behaviour, ticket.release)  # gRPC dropped the call without running it
        return grpc.stream_stream_rpc_method_handler(behaviour)


def _refusal(rejected: CallRejected) -> grpc.RpcMethodHandler:
    """A handler that refuses without reading the request (served as a stream, for either method)."""

    def refuse(frames, context: grpc.ServicerContext):
        context.abort(rejected.code, str(rejected))

    return grpc.stream_stream_rpc_method_handler(refuse)
