"""What every command shares: the consoles, the one error type, loading a plan, common options.

Nothing here imports torch or the modules that do: ``fedsplit --help`` stays instant, and each
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from ..plan import Plan

LOG_WIDTH = 10_000  # columns of output that is not a terminal: wide enough that nothing wraps


def _console(stderr: bool = False) -> Console:
    """Rich fits tables to 80 columns when output is a file or a pipe, cutting cells short
    (``organisat…``); a log keeps every cell whole instead."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else LOG_WIDTH)


console = _console()
err_console = _console(stderr=True)

OK, FAILED, USAGE = 0, 1, 2  # exit codes: done; a failed run or invalid input; a command line that cannot work


class CliError(Exception):
    """What a command could not do and why; ``main`` prints it and exits with ``code``."""

    def __init__(self, message: str, code: int = FAILED, lines: tuple[str, ...] = ()):
        super().__init__(message)
        self.code, self.lines = code, lines


def load(path: str) -> Plan:
    """The plan at ``path``, or a :class:`CliError` listing every problem (file, line, field)."""
    from ..plan import PlanError, load_plan

    try:
        return load_plan(path)
    except PlanError as e:
        raise CliError(f"invalid plan {path}:", FAILED, tuple(f"✗ {p}" for p in e.problems)) from None


def with_overrides(plan: Plan, args: argparse.Namespace) -> Plan:
    """``plan`` with the command line's ``--rounds`` and ``--steps``."""
    update = {k: v for k, v in (("rounds", args.rounds), ("steps_per_round", args.steps)) if v is not None}
    return plan.with_training(**update) if update else plan


def warn_insecure() -> None:
    err_console.print(
        "[bold red]WARNING: --insecure: the data plane runs WITHOUT TLS and WITHOUT credentials. "
        "Activations, gradients and weights cross the network in plaintext and anyone who can "
        "reach a worker can call it. Use this only on loopback for tests.[/]"
    )


def credentials(args: argparse.Namespace) -> Path | None:
    """The ``--credentials`` directory, once it holds the CA of ``fedsplit certs`` (the
    deployment options make it absolute for Flower's processes)."""
    if args.insecure:
        warn_insecure()
        return None
    path = Path(args.credentials)
    if not (path / "ca.pem").is_file():
        raise CliError(
            f"--credentials {args.credentials}: {path.resolve()} has no ca.pem; "
            "make the credentials with `fedsplit certs`"
        )
    return path


def run_arguments(parser: argparse.ArgumentParser) -> None:
    """What every command that makes a run directory takes."""
    parser.add_argument("--rounds", type=int, help="override training.rounds")
    parser.add_argument("--steps", type=int, help="override training.steps_per_round")
    parser.add_argument("--runs-dir", default="runs", help="where run directories go (default runs/)")


def security_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--credentials", metavar="DIR", help=f"`fedsplit certs` output: {what}")
    group.add_argument(
        "--insecure", action="store_true", help="no TLS and no tokens on either plane (trusted networks only)"
    )


def say(text: str) -> None:
    """A line of output that keeps its words as they are (no highlighting, no wrapping mid-word)."""
    console.print(text, highlight=False, soft_wrap=True)
