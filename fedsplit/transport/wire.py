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


def encode_tensors(tensors: Sequence[tuple[str, Tensor | None]], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Frames for named tensors (``None`` for an absent gradient)."""
    for name, t in tensors:
        if t is None:
            yield pb.Frame(tensor=pb.TensorHeader(name=name, absent=True)).SerializeToString()
            continue
        if t.dtype not in DTYPE_NAMES:
            raise WireError(f"tensor {name!r}: dtype {t.dtype} cannot be sent (allowed: {', '.join(DTYPES)})")
        t = t.detach().to("cpu").contiguous()
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")
        header = pb.TensorHeader(name=name, dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape), nbytes=len(data))
        yield pb.Frame(tensor=header).SerializeToString()
        for start in range(0, len(data), chunk_bytes):
            yield chunk_frame(data[start : start + chunk_bytes])


def decode_tensors(frames: Iterable[bytes], count: int, limits: Limits) -> list[tuple[str, Tensor | None]]:
    """Read exactly ``count`` tensors from ``frames``, validating each before it is used."""
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
        out.append((header.name, _read_tensor(header, it, limits)))
    return out


def _read_tensor(header: pb.TensorHeader, frames: Iterator[bytes], limits: Limits) -> Tensor:
    name = header.name or "<unnamed>"
    dtype = DTYPES.get(header.dtype)
    if dtype is None:
        raise WireError(f"tensor {name!r}: dtype {header.dtype!r} is not allowed (allowed: {', '.join(DTYPES)})")
    if any(d < 0 for d in header.shape):
        raise WireError(f"tensor {name!r}: negative dimension in shape {list(header.shape)}")
    expected = math.prod(header.shape) * dtype.itemsize
    if header.nbytes != expected:
        raise WireError(f"tensor {name!r}: {header.nbytes} bytes declared but shape {list(header.shape)} of {header.dtype} needs {expected}")
    if expected > limits.max_tensor_bytes:
        raise WireError(f"tensor {name!r}: {expected} bytes exceeds the limit of {limits.max_tensor_bytes}")
    buf = bytearray(expected)
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
        buf[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    t = torch.frombuffer(buf, dtype=dtype).reshape(tuple(header.shape)) if expected else torch.empty(tuple(header.shape), dtype=dtype)
    if limits.require_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise WireError(f"tensor {name!r}: contains NaN or infinite values")
    return t
