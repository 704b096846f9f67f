"""Tensors on the wire: raw bytes with dtype and shape, chunked, validated on arrival.

No pickle, no ``torch.save``, no base64 and no fp32 inflation of bf16: a tensor is a
:class:`TensorHeader` frame followed by its bytes in chunk frames. Chunk frames are framed by
hand (``0x1a``, varint length, bytes) and decoded without copying; everything else is protobuf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

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
CHUNK_BYTES = 1 << 20  # the fastest chunk size measured on loopback (transport-probe.md)
CODECS = ("none", "bf16", "fp16", "int8")
_CHUNK_TAG = 0x1A  # field 3 (chunk), wire type 2 (length-delimited)


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
    return b"".join((bytes((_CHUNK_TAG,)), _varint(len(data)), data))


def parse_frame(raw: bytes) -> pb.Frame | memoryview:
    """A chunk frame's payload as a zero-copy memoryview, or any other frame as protobuf."""
    view = memoryview(raw)
    if len(view) and view[0] == _CHUNK_TAG:
        n, pos = _read_varint(view, 1)
        if pos + n != len(view):
            raise WireError(f"chunk frame declares {n} bytes but carries {len(view) - pos}")
        return view[pos:]
    try:
        return pb.Frame.FromString(raw)
    except Exception as e:  # protobuf's DecodeError and friends
        raise WireError(f"undecodable frame: {e}") from None


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


def _decompress(codec: str, buf: bytearray, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    if codec == "":
        return torch.frombuffer(buf, dtype=dtype).reshape(shape) if len(buf) else torch.empty(shape, dtype=dtype)
    if codec in ("bf16", "fp16"):
        wire = torch.bfloat16 if codec == "bf16" else torch.float16
        return torch.frombuffer(buf, dtype=wire).reshape(shape).to(dtype)
    n = math.prod(shape)
    values = torch.frombuffer(buf, dtype=torch.int8, count=n).reshape(-1, shape[-1])
    scale = torch.frombuffer(buf, dtype=torch.float32, offset=n)
    return (values.to(torch.float32) * scale[:, None]).reshape(shape).to(dtype)


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
        t = t.detach().to("cpu").contiguous()
        used, parts = compress(t, codec)
        views = [_bytes(p) for p in parts]
        header = pb.TensorHeader(name=name, dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape), nbytes=sum(len(v) for v in views), codec=used)
        out.append(Encoded(header, views))
    return out


def payload_size(encoded: Sequence[Encoded]) -> int:
    return sum(e.header.nbytes for e in encoded)


def to_frames(encoded: Sequence[Encoded], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Each tensor's header frame followed by its bytes in chunk frames."""
    for e in encoded:
        yield pb.Frame(tensor=e.header).SerializeToString()
        for data in e.parts:
            for start in range(0, len(data), chunk_bytes):
                yield chunk_frame(data[start : start + chunk_bytes])


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
        yield pb.Frame(tensor=header).SerializeToString()


def encode_tensors(tensors: Sequence[tuple[str, Tensor | None]], codec: str = "none", chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Frames for named tensors (``None`` for an absent gradient), compressed with ``codec``."""
    return to_frames(prepare(tensors, codec), chunk_bytes)


def decode_tensors(frames: Iterable[bytes], count: int, limits: Limits, segment=None) -> list[tuple[str, Tensor | None]]:
    """Read exactly ``count`` tensors from ``frames`` (and the call's shared-memory ``segment``
    for tensors sent that way), validating each before it is used."""
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
        if header.absent:
            out.append((header.name, None))
            continue
        out.append((header.name, _read_tensor(header, it, limits, segment)))
    return out


def _read_tensor(header: pb.TensorHeader, frames: Iterator[bytes], limits: Limits, segment) -> Tensor:
    name = header.name or "<unnamed>"
    dtype = DTYPES.get(header.dtype)
    if dtype is None:
        raise WireError(f"tensor {name!r}: dtype {header.dtype!r} is not allowed (allowed: {', '.join(DTYPES)})")
    if any(d < 0 for d in header.shape):
        raise WireError(f"tensor {name!r}: negative dimension in shape {list(header.shape)}")
    if header.codec not in ("", *CODECS[1:]) or (header.codec and dtype != torch.float32):
        raise WireError(f"tensor {name!r}: codec {header.codec!r} is not allowed for {header.dtype}")
    if header.codec == "int8" and (not header.shape or header.shape[-1] == 0):
        raise WireError(f"tensor {name!r}: int8 needs a non-empty last dimension")
    expected = _wire_bytes(header.codec, header.shape, dtype)
    if header.nbytes != expected:
        raise WireError(f"tensor {name!r}: {header.nbytes} bytes declared but shape {list(header.shape)} of {header.dtype} needs {expected}")
    if expected > limits.max_tensor_bytes:
        raise WireError(f"tensor {name!r}: {expected} bytes exceeds the limit of {limits.max_tensor_bytes}")
    buf = bytearray(expected)
    filled = 0
    if header.in_shm:
        if segment is None:
            raise WireError(f"tensor {name!r}: marked as in shared memory but the call has no segment")
        try:
            buf[:] = segment.view(header.shm_offset, expected)
        except ValueError as e:
            raise WireError(f"tensor {name!r}: {e}") from None
        filled = expected
    while filled < expected:
        frame = next(frames, None)
        if frame is None:
            raise WireError(f"tensor {name!r}: stream ended after {filled} of {expected} bytes")
        chunk = parse_frame(frame)
        if not isinstance(chunk, memoryview):
            raise WireError(f"tensor {name!r}: expected a chunk frame after {filled} of {expected} bytes")
        if filled + len(chunk) > expected:
            raise WireError(f"tensor {name!r}: chunks carry more than the {expected} bytes declared")
        buf[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    t = _decompress(header.codec, buf, tuple(header.shape), dtype)
    # A NaN or inf anywhere makes the sum non-finite; the sum is ~25x cheaper than isfinite().
    # Only a non-finite sum (a bad value, or an overflow of large finite ones) needs the full check.
    if limits.require_finite and t.is_floating_point() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise WireError(f"tensor {name!r}: contains NaN or infinite values")
    return t
