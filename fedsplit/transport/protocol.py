"""What both ends of a data-plane call agree on, without tensors: the gRPC methods, when a call
goes in one message, what a failed call raises, and how calls are named in logs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from .proto import dataplane_pb2 as pb

if TYPE_CHECKING:
    from torch import Tensor

COORDINATOR = "coordinator"  # the caller name of the coordinator (and of verify) on the data plane
METHOD, METHOD_ONCE = "/fedsplit.v1.DataPlane/Call", "/fedsplit.v1.DataPlane/CallOnce"
# Above this, one message per call costs more (fresh multi-MiB buffers, no overlap of sending and
# decoding) than a stream's per-message overhead; below it, the stream's overhead dominates.
ONE_MESSAGE_BYTES = 16 << 20
MESSAGE_BYTES = 64 << 20  # what a server accepts in one message: chunks, or a CallOnce request

Named = list[tuple[str, "Tensor | None"]]  # a call's tensors by name (None: absent)


class PeerError(RuntimeError):
    """A call to another organisation failed; the message names it, its address and why."""

    def __init__(self, org: str, address: str, code: grpc.StatusCode | None, details: str):
        self.org, self.address, self.code, self.details = org, address, code, details
        status = code.name if code else "ERROR"
        super().__init__(f"call to organisation '{org}' at {address} failed: {status}: {details}")


def call_kind(header: pb.CallHeader) -> str:
    """What a call is, for logs and for sizing its reply: its phase and its operation's or
    control's kind (``FORWARD segment``, ``CONTROL read_state``)."""
    kind = header.operation.WhichOneof("kind") or header.control.WhichOneof("kind") or "call"
    return f"{pb.Phase.Name(header.phase)} {kind}"
