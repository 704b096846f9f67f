"""Frames on the wire, without tensors: how a call's header and its payload's bytes are framed,
chunked and checked, for any payload (:mod:`.wire`'s torch tensors, :mod:`.blobs`' opaque bytes).

A payload item is a :class:`~fedsplit.transport.proto.dataplane_pb2.TensorHeader` frame followed
by its bytes in chunk frames. Chunk frames are framed by hand (``0x1a``, varint length, bytes)
and decoded without copying; everything else is protobuf. A call small enough for one message
packs its frames into one ``Frames`` message, by hand too. Nothing here imports torch, so that a
process that only relays bytes (a deployed ClientApp) starts without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .proto import dataplane_pb2 as pb

CHUNK_BYTES = 1 << 20  # the fastest chunk size measured on loopback (256 KiB, 1 MiB and 4 MiB tried)
_CHUNK_TAG = 0x1A  # field 3 (chunk), wire type 2 (length-delimited)
_FRAMES_TAG = 0x0A  # Frames.frames: field 1, wire type 2
TENSOR_ALIGN = 64  # received tensors start at multiples of this, in segments and receive buffers
# What a header may hold. The model's tensors have at most 4 dimensions; names are organisations,
# runs, tensors and segments. A header frame is parsed whole, so its size bounds every list in it.
MAX_DIMS = 8
MAX_NAME = 256
MAX_HEADER_FRAME = 1 << 20
MAX_METRICS = 4096


class WireError(ValueError):
    """A frame or tensor that breaks the format; the message says what and where."""


@dataclass(frozen=True)
class Limits:
    max_tensor_bytes: int = 1 << 30
    max_tensors: int = 1 << 16
    require_finite: bool = True


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WireError("truncated or overlong varint in a chunk frame")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def chunk_frame(data: memoryview) -> bytes:
    return b"".join(_chunk_pieces(data))


def _chunk_pieces(data: memoryview) -> tuple[bytes, bytes, memoryview]:
    return bytes((_CHUNK_TAG,)), _varint(len(data)), data


def one_message(frames: Iterable[Sequence[bytes | memoryview]]) -> bytes:
    """A ``Frames`` message holding ``frames`` (each given as the pieces it is made of), built
    with one copy of the tensor bytes."""
    pieces: list[bytes | memoryview] = []
    for frame in frames:
        pieces += [bytes((_FRAMES_TAG,)), _varint(sum(len(p) for p in frame)), *frame]
    return b"".join(pieces)


def unpack_message(raw: bytes) -> Iterator[memoryview]:
    """The frames of a ``Frames`` message, as zero-copy views, checked as they are read."""
    view = memoryview(raw)
    pos = 0
    while pos < len(view):
        if view[pos] != _FRAMES_TAG:
            raise WireError(f"undecodable message: unexpected field tag {view[pos]} at byte {pos}")
        n, pos = _read_varint(view, pos + 1)
        if pos + n > len(view):
            raise WireError(f"a frame declares {n} bytes but the message has {len(view) - pos} left")
        yield view[pos : pos + n]
        pos += n


def parse_frame(raw: bytes | memoryview) -> pb.Frame | memoryview:
    """A chunk frame's payload as a zero-copy memoryview, or any other frame as protobuf."""
    view = memoryview(raw)
    if len(view) and view[0] == _CHUNK_TAG:
        n, pos = _read_varint(view, 1)
        if pos + n != len(view):
            raise WireError(f"chunk frame declares {n} bytes but carries {len(view) - pos}")
        return view[pos:]
    if len(view) > MAX_HEADER_FRAME:
        raise WireError(f"a header frame of {len(view)} bytes; at most {MAX_HEADER_FRAME} are accepted")
    try:
        return pb.Frame.FromString(raw)
    except Exception as e:  # protobuf's DecodeError and friends
        raise WireError(f"undecodable frame: {e}") from None


def check_call_header(header: pb.CallHeader) -> None:
    """A :class:`WireError` for a call header whose names or lists are longer than any valid
    call's (checked before anything else reads it; what an error echoes is cut short)."""
    for field in ("run", "caller", "data_owner", "shm_request", "shm_reply", "shm_pool"):
        if len(getattr(header, field)) > MAX_NAME:
            raise WireError(f"the call header's {field} is longer than {MAX_NAME} characters")
    if len(header.shm_released) > MAX_METRICS or len(header.metrics) > MAX_METRICS:
        raise WireError(f"the call header lists more than {MAX_METRICS} segments or metrics")


def call_frame(header: pb.CallHeader) -> bytes:
    return pb.Frame(call=header).SerializeToString()


@dataclass
class Encoded:
    """A tensor ready to send: its header and the byte views that carry it."""

    header: pb.TensorHeader
    parts: list[memoryview]


class Payload(Protocol):
    """What a channel's calls carry and how: torch tensors (:data:`.wire.TENSORS`, the data
    plane) or opaque bytes (:data:`.blobs.BLOBS`, what a ClientApp relays)."""

    def prepare(self, items: Sequence[tuple[str, Any]], codec: str = "none") -> list[Encoded]: ...

    def decode(
        self, frames: Iterable[bytes | memoryview], count: int, limits: Limits, segment=None, view_segment: bool = False
    ) -> list[tuple[str, Any]]: ...

    def nbytes(self, item: Any) -> int: ...

    def own(self, item: Any) -> Any:
        """``item`` in memory of its own, not the call's receive buffers (which it would keep)."""
        ...


def payload_size(encoded: Sequence[Encoded]) -> int:
    return sum(e.header.nbytes for e in encoded)


def segment_bytes(nbytes: Iterable[int]) -> int:
    """Room that tensors of these byte counts take in a shared-memory segment."""
    return sum(-(-n // TENSOR_ALIGN) * TENSOR_ALIGN for n in nbytes)


def frame_pieces(
    encoded: Sequence[Encoded], chunk_bytes: int | None = CHUNK_BYTES
) -> Iterator[Sequence[bytes | memoryview]]:
    """Each tensor's header frame followed by its bytes in chunk frames (``None``: one chunk per
    part, for a single message), each frame as the pieces it is made of."""
    for e in encoded:
        yield (pb.Frame(tensor=e.header).SerializeToString(),)
        for data in e.parts:
            step = chunk_bytes or max(len(data), 1)
            for start in range(0, len(data), step):
                yield _chunk_pieces(data[start : start + step])


def to_frames(encoded: Sequence[Encoded], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Each tensor's header frame followed by its bytes in chunk frames."""
    return (b"".join(pieces) for pieces in frame_pieces(encoded, chunk_bytes))


def to_segment(encoded: Sequence[Encoded], segment) -> Iterator[bytes]:
    """Copy every tensor's bytes into a shared-memory segment; only header frames remain."""
    offset = 0
    for e in encoded:
        header = pb.TensorHeader()
        header.CopyFrom(e.header)
        if not header.absent:
            header.in_shm, header.shm_offset = True, offset
            for data in e.parts:
                segment.view(offset, len(data))[:] = data
                offset += len(data)
            offset = segment_bytes([offset])
        yield pb.Frame(tensor=header).SerializeToString()


def read_header(frame: bytes | memoryview | None, index: int, count: int) -> pb.TensorHeader:
    """Payload item ``index`` of ``count``'s header frame, its names' lengths checked."""
    if frame is None:
        raise WireError(f"stream ended after {index} of {count} tensors")
    header = parse_frame(frame)
    if isinstance(header, memoryview) or header.WhichOneof("kind") != "tensor":
        raise WireError(f"tensor {index}: expected a tensor header frame")
    header = header.tensor
    if len(header.name) > MAX_NAME or len(header.dtype) > MAX_NAME or len(header.codec) > MAX_NAME:
        raise WireError(f"a tensor header's name, dtype or codec is longer than {MAX_NAME} characters")
    return header


def check_shape(name: str, header: pb.TensorHeader, itemsize: int, limits: Limits) -> None:
    """A :class:`WireError` for a shape that no valid call has: too many dimensions, a negative
    one, or more elements of ``itemsize`` bytes than ``limits`` allow (with a zero dimension too:
    no library could lay out even an empty tensor of that shape)."""
    if len(header.shape) > MAX_DIMS:
        raise WireError(f"tensor {name!r}: {len(header.shape)} dimensions; at most {MAX_DIMS} are accepted")
    if any(d < 0 for d in header.shape):
        raise WireError(f"tensor {name!r}: negative dimension in shape {list(header.shape)}")
    if math.prod(max(d, 1) for d in header.shape) * itemsize > limits.max_tensor_bytes:
        raise WireError(
            f"tensor {name!r}: shape {list(header.shape)} of {header.dtype} exceeds the limit of "
            f"{limits.max_tensor_bytes} bytes"
        )


def read_chunks(name: str, frames: Iterator[bytes | memoryview], view: memoryview) -> None:
    """Fill ``view`` with the chunk frames that follow a header, exactly."""
    expected, filled = len(view), 0
    while filled < expected:
        frame = next(frames, None)
        if frame is None:
            raise WireError(f"tensor {name!r}: stream ended after {filled} of {expected} bytes")
        chunk = parse_frame(frame)
        if not isinstance(chunk, memoryview):
            raise WireError(f"tensor {name!r}: expected a chunk frame after {filled} of {expected} bytes")
        if filled + len(chunk) > expected:
            raise WireError(f"tensor {name!r}: chunks carry more than the {expected} bytes declared")
        view[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
