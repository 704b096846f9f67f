"""``fedsplit plan check | show | new | generate``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rich import box
from rich.table import Table

from .common import USAGE, CliError, console, load, say

if TYPE_CHECKING:
    from ..data import Tokenizer
    from ..data.corpus_split import CorpusSplit
    from ..plan import Plan
    from ..plan.schema import AggregationConfig


def register(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="check, show, start and generate partition plans")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    check = plan_sub.add_parser("check", help="validate a plan and print what goes where")
    check.add_argument("federation", help="the federation YAML file")
    check.add_argument(
        "--data",
        action="store_true",
        help="also read every data owner's training and held-out files as a run will (tokenizing them: "
        "seconds to minutes for large corpora), so that a bad file is found now, by file and line",
    )
    check.set_defaults(func=check_plan)
    show = plan_sub.add_parser(
        "show", help="the partition map: layers x (head groups, experts, other pieces) by organisation"
    )
    show.add_argument("federation", help="the federation YAML file")
    show.add_argument("--png", metavar="FILE", help="draw it into a PNG (default: print it as text)")
    show.set_defaults(func=show_plan)
    new = plan_sub.add_parser(
        "new",
        help="write a commented starting plan for a model: its shape, and a U-shaped three-organisation split",
        description=(
            "Write OUT/federation.yaml and OUT/orgs/{data-owner,compute,experts}.yaml: a data owner holding both "
            "ends of the model, a compute organisation holding the middle layers, and an expert holder carved out "
            "of them, with comments on the model's layers, heads, KV heads and experts. Edit it, then check it."
        ),
        epilog="example:\n  fedsplit plan new my-plan --model configs/models/small.yaml\n"
        "  fedsplit plan check my-plan/federation.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    new.add_argument("out", help="directory to write the plan into (new or empty)")
    new.add_argument("--model", help="model YAML or model directory (default: configs/models/tiny.yaml)")
    new.add_argument("--name", help="plan name (default: the directory's name)")
    new.set_defaults(func=new_plan)
    generate = plan_sub.add_parser(
        "generate", help="write a U-shaped plan for many organisations (data owners hold both ends)"
    )
    generate.add_argument("--orgs", type=int, required=True, help="number of organisations")
    generate.add_argument("--out", required=True, help="directory for federation.yaml and orgs/")
    generate.add_argument(
        "--data-owners", type=int, help="organisations with data (default: a quarter of --orgs, at least 1)"
    )
    generate.add_argument("--model", help="model YAML (default: configs/models/tiny.yaml)")
    generate.add_argument("--name", help="plan name (default: generated-ORGS)")
    training = generate.add_argument_group(
        "training", "defaults: seed 0, 1 round of 2 steps, batch 2 per data owner, seq_len 32 (small enough for a CPU)"
    )
    for flag in ("--seed", "--rounds", "--steps-per-round", "--batch-size", "--seq-len"):
        training.add_argument(flag, type=int)
    generate.add_argument(
        "--split",
        choices=["iid", "domain", "dirichlet"],
        help="give each data owner its own train/held-out files cut from the shipped corpora (under OUT/data/)",
    )
    generate.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration for --split dirichlet (default 0.5)"
    )
    generate.set_defaults(func=generate_plan)


def check_plan(args: argparse.Namespace) -> None:
    from ..plan.units import describe

    plan = load(args.federation)
    per = plan.bytes_per_parameter
    orgs = Table(title=f"plan '{plan.name}': {len(plan.orgs)} organisations, model {plan.model_source.name}")
    trains = plan.finetune is not None or bool(plan.frozen)
    columns = ("organisation", "holds", "parameters", *(("training",) if trains else ()), "memory", "data", "device")
    for col in columns:
        orgs.add_column(col, justify="right" if col in ("parameters", "training", "memory") else "left")
    total = 0
    for name, org in plan.orgs.items():
        n = plan.parameter_count(name)
        total += n
        orgs.add_row(
            name,
            "\n".join(e.selector for e in org.entries) or "-",
            f"{n:,}",
            *((f"{plan.trained_parameter_count(name):,}",) if trains else ()),
            f"{plan.training_bytes(name) / 2**20:.1f} MiB",
            "yes" if org.holds_data else "-",
            org.device,
        )
    console.print(orgs)
    sync = replica_sync_text(plan.aggregation)
    parts = Table(title=f"partitions (replicas {sync})")
    for col in ("partition", "units", "held by", ""):
        parts.add_column(col)
    for p in plan.partitions:
        mark = "local" if p.local_holders else ("replicated" if p.replicated else "")
        owners = plan.owners(p.units)
        if owners:
            mark = ", ".join(filter(None, (mark, f"owned by {', '.join(owners)}")))
        parts.add_row(p.name, describe(p.units, plan.model), ", ".join(p.holders), mark)
    console.print(parts)
    print_exposure(plan)
    copies = ", bf16 compute copies" if plan.training.precision == "bf16-mixed" else ""
    frozen = ""
    if trains:
        dtype = "2 bytes (bf16)" if copies else "4 bytes (fp32)"
        frozen = f", and {dtype} for each frozen one (no gradient or state)"
    console.print(
        f"memory = training parameters x {per} bytes (fp32 weights, gradients, {plan.training.optimizer.name} "
        f"state{copies}){frozen}; activations not included; {total:,} parameters held in all, replicas included"
    )
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    if args.data:
        check_data_files(plan)
    console.print("[green]plan is valid[/]" + (" and its data can be read" if args.data else ""))


def check_data_files(plan: Plan) -> None:
    """A table of what each data owner trains on; a :class:`CliError` naming the first file that
    a run could not read."""
    from ..data import DataError
    from ..runtime.batches import check_data

    table = Table(title="data, read as a run reads it")
    for col in ("data owner", "objective", "training", "held-out batches"):
        table.add_column(col, justify="right" if col in ("training", "held-out batches") else "left")
    for d in plan.data_owners:
        try:
            summary = check_data(plan, d)
        except DataError as e:
            raise CliError(f"a run could not start: {e}") from None
        table.add_row(d, summary.objective, f"{summary.train:,} {summary.unit}", str(summary.held_out_batches))
    console.print(table)


def show_plan(args: argparse.Namespace) -> None:
    from ..plan.partition_map import draw_partition_map, partition_map
    from ..plan.units import describe

    plan = load(args.federation)
    if args.png:
        say(f"wrote the partition map of plan '{plan.name}' to {draw_partition_map(plan, args.png)}")
        return
    table = Table(title=f"partition map of plan '{plan.name}', layer by layer", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("row", "pieces", "held by"):
        table.add_column(col)
    for row in partition_map(plan)[1]:
        for i, (holders, units) in enumerate(row.pieces()):
            mark = " [dim](replicated)[/]" if len(holders) > 1 else ""
            owners = plan.owners(units)
            if owners:
                mark += f" [dim](owned by {', '.join(owners)})[/]"
            table.add_row(row.label if i == 0 else "", describe(units, plan.model), ", ".join(holders) + mark)
    console.print(table)
    print_exposure(plan)


def generate_plan(args: argparse.Namespace) -> None:
    from ..plan import templates

    given = {k: getattr(args, k) for k in ("model", "seed", "rounds", "steps_per_round", "batch_size", "seq_len")}
    try:
        split = None
        if args.split is not None:  # the shipped corpora across the plan's data owners, by the plan's seed
            from ..data.corpus_split import split_corpora

            owners = args.data_owners if args.data_owners is not None else templates.default_data_owners(args.orgs)
            split = split_corpora(templates.data_owner_names(owners), args.split, alpha=args.alpha, seed=args.seed or 0)
        path = templates.generate_plan(
            args.orgs,
            args.out,
            data_owners=args.data_owners,
            name=args.name,
            split=split,
            **{k: v for k, v in given.items() if v is not None},
        )
    except ValueError as e:
        raise CliError(f"cannot generate: {e}", USAGE) from None
    plan = load(str(path))
    replicated = sum(p.replicated for p in plan.partitions)
    say(
        f"wrote {path}: plan '{plan.name}' is valid: {len(plan.orgs)} organisations, "
        f"{len(plan.data_owners)} data owners, {len(plan.partitions)} partitions ({replicated} replicated)"
    )
    if split is not None:
        print_split(split)


def print_exposure(plan: Plan) -> None:
    """What each organisation receives about each data owner's batches (docs/privacy.md)."""
    from ..plan.exposure import exposures

    table = Table(title="what each organisation receives about the data owners' batches (see docs/privacy.md)")
    for col in ("organisation", "from", "about the batches of", "what"):
        table.add_column(col)
    rows = sorted(exposures(plan), key=lambda e: (e.receiver, e.data_owner, e.sender))
    for e in rows:
        table.add_row(e.receiver, e.sender, e.data_owner, e.what)
    if rows:
        console.print(table)
    else:
        say("no organisation receives anything about another's batches: every data owner computes its whole path")


def replica_sync_text(aggregation: AggregationConfig) -> str:
    """How replicas are kept together, as ``plan check`` says it: "replicas ..."."""
    if aggregation.replica_sync == "step":
        return "add up their gradients every step"
    if aggregation.strategy == "diloco":
        return (
            f"are averaged after each round, then take an outer SGD step (DiLoCo: rate {aggregation.outer_lr:g}, "
            f"momentum {aggregation.outer_momentum:g}{', Nesterov' if aggregation.nesterov else ''})"
        )
    if aggregation.strategy == "fedadam":
        return f"are averaged after each round, then take a server Adam step (FedAdam: rate {aggregation.server_lr:g})"
    return "are averaged after each round"


def new_plan(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..plan import starter

    try:
        path = starter.write_starting_plan(Path(args.out), Path(args.model or starter.DEFAULT_MODEL), args.name)
    except ValueError as e:
        raise CliError(f"cannot write a plan: {e}", USAGE) from None
    try:
        plan = load(str(path))
    except CliError:  # e.g. a --name that is not a plan name: leave nothing invalid behind
        starter.remove_starting_plan(Path(args.out))
        raise
    say(f"wrote {path}: plan '{plan.name}' is valid: {', '.join(plan.orgs)}")
    say(f"next: edit it, then `fedsplit plan check {path}` and `fedsplit simulate {path}`")


def print_split(split: CorpusSplit, tokenizer: Tokenizer | None = None) -> None:
    """Tokens per organisation and domain (train), and held-out tokens, of a corpus split."""
    counts = split.token_counts(*([tokenizer] if tokenizer else []))
    alpha = f", alpha {split.alpha:g}" if split.by == "dirichlet" else ""
    table = Table(
        title=f"{split.by} split{alpha}, seed {split.seed}: train tokens per domain",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ["org", *split.domains, "train", "held-out"]:
        table.add_column(col, justify="left" if col == "org" else "right", no_wrap=True)
    for org, roles in counts.items():
        table.add_row(
            org,
            *(f"{roles['train'][d]:,}" for d in split.domains),
            f"{sum(roles['train'].values()):,}",
            f"{sum(roles['eval'].values()):,}",
        )
    console.print(table)
