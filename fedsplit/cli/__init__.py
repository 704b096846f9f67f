"""The ``fedsplit`` command: one module per group of subcommands, each registering its parsers.

Exit codes: 0 done; 1 a run that failed or an input that is invalid (a plan, a checkpoint);
2 a command line that cannot work as given (bad options, a file argument that is missing or of
the wrong kind).
"""

from __future__ import annotations

import argparse

from .. import __version__
from . import data, models, plans, runs
from .common import OK, CliError, err_console

EXAMPLES = """examples:
  fedsplit plan check configs/plans/demo/federation.yaml
  fedsplit verify configs/plans/three-orgs/federation.yaml --steps 10
  fedsplit simulate configs/plans/demo/federation.yaml --rounds 1 --steps 5
  fedsplit generate runs/<run> --prompt "ROMEO:"
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsplit",
        description="Federated split training of partitioned Mixture-of-Experts transformers.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fedsplit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (plans, runs, data, models):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except CliError as e:
        err_console.print(f"[red]{e}[/]", highlight=False, soft_wrap=True)
        for line in e.lines:
            err_console.print(f"  {line}", highlight=False, soft_wrap=True)
        return e.code
    return OK if code is None else code
