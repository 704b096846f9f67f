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
        f"git {_git('rev-parse', '--short', 'HEAD')}" + (f"  ({watched} has uncommitted changes: {' '.join(dirty.split())})" if dirty else ""),
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}",
    ]
