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
import logging
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from torch import Tensor

from .proto import dataplane_pb2 as pb
from .security import TLSConfig, token_verifier
from .shm import AttachedSegments, Segment
from .wire import (
    Encoded,
    Limits,
    WireError,
    call_frame,
    decode_tensors,
    frame_pieces,
    one_message,
    parse_frame,
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


def call_kind(header: pb.CallHeader) -> str:
    """What a call is, for logs and for sizing its reply: its phase and its operation's or
    control's kind (``FORWARD segment``, ``CONTROL read_state``)."""
    kind = header.operation.WhichOneof("kind") or header.control.WhichOneof("kind") or "call"
    return f"{pb.Phase.Name(header.phase)} {kind}"
