"""Shared-memory segments for organisations whose workers share a host.

The caller owns every segment (one for the request, one for the reply), reuses them across
calls and unlinks them when its channel closes, so a callee never creates or frees anything.
Only control frames cross gRPC, and no tensor is copied on arrival. Ownership: the caller's
reply tensors are views of its reply segment, which is not reused while any of them lives
(reference counts say when). The callee's request tensors are views of the request segment too,
kept as long as the callee needs them (a forward's input until its backward): the caller *lends*
the segment and reuses it only after a later reply names it as released. A caller can therefore
still write into tensors its callee holds, so organisations that share a host this way must
trust each other with that memory (the plan turns it on: ``transport.shared_memory``). A segment's
name says which organisation made it (``fedsplit-PID-RANDOM-ORG``), and a callee maps only the
segments of the organisation that calls it.
Plain ``/dev/shm`` files with ``mmap`` (not ``multiprocessing.shared_memory``, whose resource
tracker unlinks segments it merely attached to on Python 3.11).
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import sys
import threading
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"^fedsplit-\d+-[0-9a-f]{16}-(?P<owner>[A-Za-z0-9][A-Za-z0-9_.-]{0,127})$")


def segment_owner(name: str) -> str:
    """The organisation whose pool made the segment ``name``; ValueError for any other name."""
    match = _NAME.match(name)
    if match is None:
        raise ValueError(f"not a fedsplit shared-memory segment name: {name[:100]!r}")
    return match["owner"]


class Segment:
    def __init__(self, name: str, size: int, create: bool):
        segment_owner(name)
        self.name = name
        path = SHM_DIR / name
        try:
            fd = os.open(path, (os.O_CREAT | os.O_EXCL | os.O_RDWR) if create else os.O_RDWR, 0o600)
        except FileNotFoundError:
            raise ValueError(f"no shared-memory segment {name!r} on this host") from None
        try:
            if create:
                # Reserve the pages now: a full /dev/shm then fails here with ENOSPC instead of
                # killing the process with SIGBUS at the first write into the mapping.
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    path.unlink(missing_ok=True)
                    raise OSError(e.errno, f"cannot reserve {size} bytes in {SHM_DIR}: {e.strerror}") from None
            self.size = os.fstat(fd).st_size
            self.buf = mmap.mmap(fd, self.size) if self.size else None
        finally:
            os.close(fd)

    @classmethod
    def create(cls, size: int, owner: str) -> Segment:
        return cls(f"fedsplit-{os.getpid()}-{secrets.token_hex(8)}-{owner}", size, create=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        return cls(name, 0, create=False)

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"bytes {offset}-{offset + nbytes} lie outside segment {self.name} of {self.size} bytes")
        return memoryview(self.buf)[offset : offset + nbytes] if nbytes else memoryview(b"")

    def in_use(self) -> bool:
        """Whether a tensor still views this segment (each holds a reference to its mapping)."""
        return self.buf is not None and sys.getrefcount(self.buf) > 2  # the attribute and the argument

    def close(self) -> None:
        """Unmap now, or, while tensors still view the mapping, when the last of them goes."""
        if self.buf is not None and not self.in_use():
            self.buf.close()
        self.buf = None

    def unlink(self) -> None:
        self.close()
        (SHM_DIR / self.name).unlink(missing_ok=True)


class SegmentPool:
    """Reusable segments of a caller, handed out one per in-flight call and direction, and
    again only once no tensor views them and the callee gave back what it was lent."""

    def __init__(self, owner: str) -> None:
        self.owner = owner  # the organisation whose calls use these segments
        self.id = secrets.token_hex(8)  # how a callee tells this pool's segments from others'
        self._free: list[Segment] = []
        self._all: list[Segment] = []
        self._lent: dict[str, Segment] = {}
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> Segment:
        with self._lock:
            fitting = [s for s in self._free if s.size >= nbytes and not s.in_use()]
            if fitting:
                seg = min(fitting, key=lambda s: s.size)
                self._free.remove(seg)
                return seg
        seg = Segment.create(max(nbytes, 1 << 20), self.owner)
        with self._lock:
            self._all.append(seg)
        return seg

    def release(self, seg: Segment) -> None:
        with self._lock:
            self._free.append(seg)

    def lend(self, seg: Segment) -> None:
        """The callee may go on reading ``seg``: keep it until :meth:`returned` names it."""
        with self._lock:
            self._lent[seg.name] = seg

    def returned(self, names) -> None:
        """The callee no longer reads these lent segments (unknown names are ignored)."""
        with self._lock:
            self._free += [seg for seg in (self._lent.pop(n, None) for n in names) if seg is not None]

    def discard(self, seg: Segment) -> None:
        """Never reuse ``seg``: after a failed call the callee might still write into it."""
        with self._lock:
            self._all.remove(seg)
        seg.unlink()

    def close(self) -> None:
        with self._lock:
            for seg in self._all:
                seg.unlink()
            self._all.clear()
            self._free.clear()
            self._lent.clear()


class AttachedSegments:
    """A callee's cache of the caller segments it has mapped, by name, and of the request
    segments each caller's pool lent it that it still reads."""

    def __init__(self) -> None:
        self._segments: dict[str, Segment] = {}
        self._lent: dict[tuple[str, str], list[Segment]] = {}  # (caller, pool) -> lent segments
        self._lock = threading.Lock()

    def borrow(self, owner: tuple[str, str], seg: Segment) -> None:
        with self._lock:
            held = self._lent.setdefault(owner, [])
            if seg not in held:
                held.append(seg)

    def released(self, owner: tuple[str, str]) -> list[str]:
        """Names of ``owner``'s lent segments that no tensor here views any more; forgotten as
        lent once said."""
        with self._lock:
            held = self._lent.get(owner, [])
            done = [seg for seg in held if not seg.in_use()]
            self._lent[owner] = [seg for seg in held if seg not in done]
            return [seg.name for seg in done]

    def get(self, name: str, min_size: int = 0) -> Segment:
        with self._lock:
            seg = self._segments.get(name)
            if seg is None or seg.size < min_size:
                if seg is not None:
                    seg.close()
                seg = self._segments[name] = Segment.attach(name)
            return seg


def remove_segments_of(pid: int) -> None:
    """Unlink the segments a (dead) process created."""
    for path in SHM_DIR.glob(f"fedsplit-{pid}-*"):
        path.unlink(missing_ok=True)
