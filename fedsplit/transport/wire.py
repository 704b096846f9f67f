"""Tensors on the wire: raw bytes with dtype and shape, chunked, validated on arrival.

No pickle, no ``torch.save``, no base64 and no fp32 inflation of bf16: a tensor is a
:class:`TensorHeader` frame followed by its bytes in chunk frames. Chunk frames are framed by
hand (``0x1a``, varint length, bytes) and decoded without copying; everything else is protobuf.
A call small enough for one message packs its frames into one ``Frames`` message, by hand too.

Received bytes land in buffers that are reused once no decoded tensor views them any more, so
the steady state neither allocates nor page-faults per message, and a decoded tensor owns its
memory for as long as it lives.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .proto import dataplane_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CHUNK_BYTES = 1 << 20  # the fastest chunk size measured on loopback (256 KiB, 1 MiB and 4 MiB tried)
CODECS = ("none", "bf16", "fp16", "int8")
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


def _bytes(t: Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def compress(t: Tensor, codec: str) -> tuple[str, list[Tensor]]:
    """The codec actually used and the tensors that carry ``t`` on the wire. Only fp32 tensors
    of two or more dimensions (activations, gradients, expert rows) are compressed; scalars such
    as losses always travel exactly."""
    if codec == "none" or t.dtype != torch.float32 or t.dim() < 2 or not t.numel():
        return "", [t]
    if codec == "bf16":
        return codec, [t.to(torch.bfloat16)]
    if codec == "fp16":
        return codec, [t.to(torch.float16)]
    if codec == "int8":
        rows = t.reshape(-1, t.shape[-1])
        scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        return codec, [torch.round(rows / scale[:, None]).to(torch.int8), scale.contiguous()]
    raise WireError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")


def _wire_bytes(codec: str, shape: Sequence[int], dtype: torch.dtype) -> int:
    n = math.prod(shape)
    if codec == "":
        return n * dtype.itemsize
    if codec in ("bf16", "fp16"):
        return n * 2
    rows = n // shape[-1] if len(shape) and shape[-1] else 0
    return n + 4 * rows


def _decompress(codec: str, buf, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The tensor in ``buf`` (a bytearray or mmap) at ``offset``; uncompressed, a view of it."""
    n = math.prod(shape)
    if not n:
        return torch.empty(shape, dtype=dtype)
    if codec == "":
        return torch.frombuffer(buf, dtype=dtype, count=n, offset=offset).reshape(shape)
    if codec in ("bf16", "fp16"):
        wire = torch.bfloat16 if codec == "bf16" else torch.float16
        return torch.frombuffer(buf, dtype=wire, count=n, offset=offset).reshape(shape).to(dtype)
    values = torch.frombuffer(buf, dtype=torch.int8, count=n, offset=offset).reshape(-1, shape[-1])
    scale = torch.frombuffer(buf, dtype=torch.float32, count=n // shape[-1], offset=offset + n)
    return (values.to(torch.float32) * scale[:, None]).reshape(shape).to(dtype)


class ReceiveBuffers:
    """Buffers that received tensors are decoded into, each reused once nothing views it.

    A decoded tensor holds a reference to its buffer for as long as it (or any view of it)
    lives, so a buffer whose only reference is this pool's is free: there is no ownership rule
    for the receiver to follow. Sizes are rounded up (at most 1/8 more) so that buffers fit the
    next tensors of about the same size; free buffers beyond ``max_free_bytes`` are dropped.

    A tensor starts at a multiple of :data:`TENSOR_ALIGN` in memory, like torch's own
    allocations: math libraries may pick another kernel, with other rounding, for data at another
    alignment, and a received tensor's alignment would otherwise depend on the heap (run-to-run
    differences in split training)."""

    def __init__(self, min_bytes: int = 1 << 16, max_free_bytes: int = 128 << 20):
        self.min_bytes, self.max_free_bytes = min_bytes, max_free_bytes
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()

    def _unused(self, i: int) -> bool:
        return sys.getrefcount(self._buffers[i]) == 2  # the list's reference and the argument's

    def take(self, nbytes: int) -> tuple[bytearray, int]:
        """A buffer that nothing else uses, and the aligned offset in it of ``nbytes`` for a
        tensor; its contents are arbitrary."""
        buf = self._buffer(nbytes + TENSOR_ALIGN)
        return buf, -torch.frombuffer(buf, dtype=torch.uint8).data_ptr() % TENSOR_ALIGN

    def _buffer(self, nbytes: int) -> bytearray:
        if nbytes < self.min_bytes:
            return bytearray(nbytes)
        size = -(-nbytes // (step := 1 << max(nbytes.bit_length() - 4, 0))) * step
        with self._lock:
            free = [i for i in range(len(self._buffers)) if self._unused(i)]
            for i in free:
                if len(self._buffers[i]) == size:
                    return self._buffers[i]
            spare = sum(len(self._buffers[i]) for i in free) - self.max_free_bytes
            for i in reversed(free):
                if spare <= 0:
                    break
                spare -= len(self._buffers.pop(i))
            self._buffers.append(bytearray(size))
            return self._buffers[-1]


RECEIVE_BUFFERS = ReceiveBuffers()


@dataclass
class Encoded:
    """A tensor ready to send: its header and the byte views that carry it."""

    header: pb.TensorHeader
    parts: list[memoryview]


def prepare(tensors: Sequence[tuple[str, Tensor | None]], codec: str = "none") -> list[Encoded]:
    """Headers and bytes of named tensors (``None`` for an absent gradient), with ``codec``."""
    out = []
    for name, t in tensors:
        if t is None:
            out.append(Encoded(pb.TensorHeader(name=name, absent=True), []))
            continue
        if t.dtype not in DTYPE_NAMES:
            raise WireError(f"tensor {name!r}: dtype {t.dtype} cannot be sent (allowed: {', '.join(DTYPES)})")
        used, parts = compress(t.detach(), codec)  # on the tensor's device: fewer bytes to copy off a GPU
        views = [_bytes(to_host(p)) for p in parts]
        header = pb.TensorHeader(
            name=name, dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape), nbytes=sum(len(v) for v in views), codec=used
        )
        out.append(Encoded(header, views))
    return out


def to_host(t: Tensor) -> Tensor:
    """``t`` in host memory, contiguous: a GPU tensor is copied into pinned memory (torch caches
    pinned blocks, so steady state allocates nothing) without staging through pageable memory."""
    if t.device.type == "cpu":
        return t.contiguous()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
    host.copy_(t, non_blocking=True)
    if t.device.type == "cuda":
        torch.cuda.current_stream(t.device).synchronize()
    return host


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


def encode_tensors(
    tensors: Sequence[tuple[str, Tensor | None]], codec: str = "none", chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """Frames for named tensors (``None`` for an absent gradient), compressed with ``codec``."""
    return to_frames(prepare(tensors, codec), chunk_bytes)


def decode_tensors(
    frames: Iterable[bytes | memoryview], count: int, limits: Limits, segment=None, view_segment: bool = False
) -> list[tuple[str, Tensor | None]]:
    """Read exactly ``count`` tensors from ``frames`` (and the call's shared-memory ``segment``
    for tensors sent that way), validating each before it is used. ``view_segment``: the
    segment is the receiver's own and is not reused while a tensor views it, so its tensors are
    views rather than copies (a segment another process owns is always copied from)."""
    if not 0 <= count <= limits.max_tensors:
        raise WireError(f"{count} tensors declared; at most {limits.max_tensors} are accepted")
    it = iter(frames)
    out: list[tuple[str, Tensor | None]] = []
    for index in range(count):
        frame = next(it, None)
        if frame is None:
            raise WireError(f"stream ended after {index} of {count} tensors")
        header = parse_frame(frame)
        if isinstance(header, memoryview) or header.WhichOneof("kind") != "tensor":
            raise WireError(f"tensor {index}: expected a tensor header frame")
        header = header.tensor
        if len(header.name) > MAX_NAME or len(header.dtype) > MAX_NAME or len(header.codec) > MAX_NAME:
            raise WireError(f"a tensor header's name, dtype or codec is longer than {MAX_NAME} characters")
        if header.absent:
            out.append((header.name, None))
            continue
        out.append((header.name, _read_tensor(header, it, limits, segment, view_segment)))
    return out


def _read_tensor(
    header: pb.TensorHeader, frames: Iterator[bytes | memoryview], limits: Limits, segment, view_segment: bool
) -> Tensor:
    name = header.name or "<unnamed>"
    if len(header.shape) > MAX_DIMS:
        raise WireError(f"tensor {name!r}: {len(header.shape)} dimensions; at most {MAX_DIMS} are accepted")
    dtype = DTYPES.get(header.dtype)
    if dtype is None:
        raise WireError(f"tensor {name!r}: dtype {header.dtype!r} is not allowed (allowed: {', '.join(DTYPES)})")
    if any(d < 0 for d in header.shape):
        raise WireError(f"tensor {name!r}: negative dimension in shape {list(header.shape)}")
    if math.prod(max(d, 1) for d in header.shape) * dtype.itemsize > limits.max_tensor_bytes:
        # with a zero dimension too: torch could not even lay out an empty tensor of that shape
        raise WireError(
            f"tensor {name!r}: shape {list(header.shape)} of {header.dtype} exceeds the limit of "
            f"{limits.max_tensor_bytes} bytes"
        )
    if header.codec not in ("", *CODECS[1:]) or (header.codec and dtype != torch.float32):
        raise WireError(f"tensor {name!r}: codec {header.codec!r} is not allowed for {header.dtype}")
    if header.codec == "int8" and (not header.shape or header.shape[-1] == 0):
        raise WireError(f"tensor {name!r}: int8 needs a non-empty last dimension")
    expected = _wire_bytes(header.codec, header.shape, dtype)
    if header.nbytes != expected:
        raise WireError(
            f"tensor {name!r}: {header.nbytes} bytes declared but shape {list(header.shape)} of "
            f"{header.dtype} needs {expected}"
        )
    if expected > limits.max_tensor_bytes:
        raise WireError(f"tensor {name!r}: {expected} bytes exceeds the limit of {limits.max_tensor_bytes}")
    if header.in_shm:
        if segment is None:
            raise WireError(f"tensor {name!r}: marked as in shared memory but the call has no segment")
        try:
            data = segment.view(header.shm_offset, expected)
        except ValueError as e:
            raise WireError(f"tensor {name!r}: {e}") from None
        if view_segment:
            t = _decompress(header.codec, segment.buf, header.shm_offset, tuple(header.shape), dtype)
        else:
            buf, start = RECEIVE_BUFFERS.take(expected)
            memoryview(buf)[start : start + expected] = data
            t = _decompress(header.codec, buf, start, tuple(header.shape), dtype)
    else:
        t = _read_chunks(name, header, frames, expected, dtype)
    if limits.require_finite:
        check_finite(name, t)
    return t


def check_finite(name: str, t: Tensor) -> None:
    """A :class:`WireError` when ``t`` holds a NaN or an infinity. A NaN or inf anywhere makes the
    sum non-finite, and the sum is ~25x cheaper than ``isfinite``: only a non-finite sum (a bad
    value, or an overflow of large finite ones) needs the full check."""
    if t.is_floating_point() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise WireError(f"tensor {name!r}: contains NaN or infinite values")


def _read_chunks(
    name: str, header: pb.TensorHeader, frames: Iterator[bytes | memoryview], expected: int, dtype: torch.dtype
) -> Tensor:
    buf, start = RECEIVE_BUFFERS.take(expected)
    view = memoryview(buf)[start : start + expected]
    filled = 0
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
    return _decompress(header.codec, buf, start, tuple(header.shape), dtype)
