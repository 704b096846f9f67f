"""NumPy arrays as a channel's payload (:class:`~.framing.Payload`): what a deployed ClientApp
relays between Flower's messages (whose arrays are NumPy's) and its organisation's worker, on the
same wire as the data plane's torch tensors and checked as strictly, without importing torch.
Only the dtypes both sides have travel: bfloat16, which NumPy lacks, is refused by name."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .framing import Encoded, Limits, WireError, check_shape, read_chunks, read_header
from .proto import dataplane_pb2 as pb

DTYPES = ("float32", "float16", "int64")


class _Arrays:
    @staticmethod
    def prepare(items: Sequence[tuple[str, np.ndarray | None]], codec: str = "none") -> list[Encoded]:
        if codec != "none":
            raise WireError(f"arrays travel uncompressed, not with codec {codec!r}")
        out = []
        for name, a in items:
            if a is None:
                out.append(Encoded(pb.TensorHeader(name=name, absent=True), []))
                continue
            if a.dtype.name not in DTYPES:
                raise WireError(f"array {name!r}: dtype {a.dtype.name} cannot be sent (allowed: {', '.join(DTYPES)})")
            data = memoryview(np.ascontiguousarray(a)).cast("B")
            out.append(Encoded(pb.TensorHeader(name=name, dtype=a.dtype.name, shape=a.shape, nbytes=len(data)), [data]))
        return out

    @staticmethod
    def decode(
        frames: Iterable[bytes | memoryview], count: int, limits: Limits, segment=None, view_segment: bool = False
    ) -> list[tuple[str, np.ndarray | None]]:
        """Exactly ``count`` arrays, each in memory of its own (nothing of the call's is reused)."""
        if not 0 <= count <= limits.max_tensors:
            raise WireError(f"{count} tensors declared; at most {limits.max_tensors} are accepted")
        it = iter(frames)
        out: list[tuple[str, np.ndarray | None]] = []
        for index in range(count):
            header = read_header(next(it, None), index, count)
            if header.absent:
                out.append((header.name, None))
                continue
            name = header.name or "<unnamed>"
            if header.dtype not in DTYPES:
                raise WireError(f"array {name!r}: dtype {header.dtype!r} is not allowed (allowed: {', '.join(DTYPES)})")
            if header.codec or header.in_shm:
                raise WireError(f"array {name!r}: arrays travel uncompressed in chunk frames")
            dtype = np.dtype(header.dtype)
            check_shape(name, header, dtype.itemsize, limits)
            expected = int(np.prod(header.shape, dtype=np.int64)) * dtype.itemsize
            if header.nbytes != expected:
                raise WireError(
                    f"array {name!r}: {header.nbytes} bytes declared but shape {list(header.shape)} of "
                    f"{header.dtype} needs {expected}"
                )
            buf = bytearray(expected)
            read_chunks(name, it, memoryview(buf))
            a = np.frombuffer(buf, dtype=dtype).reshape(tuple(header.shape))
            if limits.require_finite and a.dtype.kind == "f" and not np.isfinite(a).all():
                raise WireError(f"array {name!r}: contains NaN or infinite values")
            out.append((header.name, a))
        return out

    @staticmethod
    def nbytes(a: np.ndarray) -> int:
        return a.nbytes

    @staticmethod
    def own(a: np.ndarray) -> np.ndarray:
        return a  # decoded into a buffer of its own already


ARRAYS = _Arrays()
