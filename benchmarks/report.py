"""What every benchmark prints around its numbers: provenance, load, and median (min-max)."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def loadavg() -> str:
    """1/5/15-minute load averages, and the share of the last 60 s in which some runnable task
    waited for a CPU (Linux PSI), when the kernel reports it."""
    try:
        out = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"
    try:
        some = open("/proc/pressure/cpu").readline().split()
        out += f" (cpu pressure {float(dict(f.split('=') for f in some[1:])['avg60']):.0f}%)"
    except (OSError, KeyError, ValueError, IndexError):
        pass
    return out


def fmt_stats(xs: list[float], digits: int = 2) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def fmt_int_stats(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"


def table(cols: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, columns padded to their widest cell."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(x.ljust(w) for x, w in zip(cells, widths)) + " |"

    return [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]


def proc_cpu(pid: int | None) -> float | None:
    """User+system CPU seconds of another local process (Linux /proc; 10 ms resolution)."""
    if pid is None:
        return None
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def short_path(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "?"


def provenance(watched: str = "fedsplit") -> list[str]:
    """Command line, versions, commit (and uncommitted changes under ``watched``), malloc settings."""
    import grpc
    import torch

    dirty = _git("status", "--porcelain", "--", watched)
    return [
        f"command: (cd {shlex.quote(os.getcwd())} && {shlex.join([short_path(sys.executable), *sys.argv])})",
        f"python {platform.python_version()}  torch {torch.__version__}  grpcio {grpc.__version__}  "
        f"cpus {os.cpu_count()}  {platform.machine()}",
        f"git {_git('rev-parse', '--short', 'HEAD')}"
        + (f"  ({watched} has uncommitted changes: {' '.join(dirty.split())})" if dirty else ""),
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}",
    ]
