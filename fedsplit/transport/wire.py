"""Tensors on the wire: raw bytes with dtype and shape, chunked, validated on arrival.

No pickle, no ``torch.save``, no base64 and no fp32 inflation of bf16: a tensor is a
:class:`TensorHeader` frame followed by its bytes in chunk frames (:mod:`.framing`).

Received bytes land in buffers that are reused once no decoded tensor views them any more, so
the steady state neither allocates nor page-faults per message, and a decoded tensor owns its
memory for as long as it lives.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .framing import (
    CHUNK_BYTES,
    TENSOR_ALIGN,
    Encoded,
    Limits,
    WireError,
    check_shape,
    read_chunks,
    read_header,
    to_frames,
)
from .proto import dataplane_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CODECS = ("none", "bf16", "fp16", "int8")


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
        header = read_header(next(it, None), index, count)
        if header.absent:
            out.append((header.name, None))
            continue
        out.append((header.name, _read_tensor(header, it, limits, segment, view_segment)))
    return out


def _read_tensor(
    header: pb.TensorHeader, frames: Iterator[bytes | memoryview], limits: Limits, segment, view_segment: bool
) -> Tensor:
    name = header.name or "<unnamed>"
    dtype = DTYPES.get(header.dtype)
    if dtype is None:
        raise WireError(f"tensor {name!r}: dtype {header.dtype!r} is not allowed (allowed: {', '.join(DTYPES)})")
    check_shape(name, header, dtype.itemsize, limits)
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
    read_chunks(name, frames, memoryview(buf)[start : start + expected])
    return _decompress(header.codec, buf, start, tuple(header.shape), dtype)


class _Tensors:
    """The data plane's payload: torch tensors (:class:`~.framing.Payload`)."""

    prepare = staticmethod(prepare)
    decode = staticmethod(decode_tensors)

    @staticmethod
    def nbytes(t: Tensor) -> int:
        return t.numel() * t.element_size()

    @staticmethod
    def own(t: Tensor) -> Tensor:
        return t.clone()


TENSORS = _Tensors()
