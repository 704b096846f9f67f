"""The commands that train: ``verify``, ``simulate``, ``baseline``, ``coordinator``, ``client``,
and ``certs`` for the credentials they use."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from .common import (
    FAILED,
    USAGE,
    CliError,
    console,
    credentials,
    err_console,
    load,
    run_arguments,
    say,
    security_arguments,
    warn_insecure,
    with_overrides,
)


def register(sub: argparse._SubParsersAction) -> None:
    verify = sub.add_parser("verify", help="train split and monolithic side by side and compare the parameters")
    verify.add_argument("federation", help="the federation YAML file")
    verify.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.add_argument("--device", default="cpu", help="device for every organisation and the reference (default cpu)")
    verify.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], help="override the plan's optimizer")
    verify.add_argument("--precision", choices=["fp32", "bf16-mixed"], help="override training.precision")
    verify.add_argument(
        "--transport",
        choices=["inprocess", "grpc"],
        default="inprocess",
        help="grpc: one worker process per organisation, activations and gradients over the data plane",
    )
    verify.add_argument(
        "--insecure", action="store_true", help="with --transport grpc: no TLS, no tokens (loopback tests only)"
    )
    verify.add_argument(
        "--tolerance", type=float, default=1e-5, help="max abs difference that passes (exit 1 above it)"
    )
    verify.set_defaults(func=verify_plan)

    certs = sub.add_parser("certs", help="make a self-signed CA, per-organisation certificates and tokens for a plan")
    certs.add_argument("federation", help="the federation YAML file")
    certs.add_argument("--out", required=True, help="directory to write them to")
    certs.add_argument(
        "--hosts",
        nargs="+",
        default=["localhost", "127.0.0.1"],
        help="host names and IP addresses the certificates are valid for",
    )
    certs.set_defaults(func=make_certs)

    sim = sub.add_parser("simulate", help="run the whole federation on this host through Flower's simulation engine")
    sim.add_argument("federation", help="the federation YAML file")
    run_arguments(sim)
    sim.add_argument(
        "--device", help="device of every organisation (default: each organisation's own, cuda when present)"
    )
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete round")
    sim.add_argument(
        "--process-per-org", action="store_true", help="one worker process per organisation instead of one for all"
    )
    sim.add_argument(
        "--actors", type=int, default=2, help="Ray actors running client messages (clients never block each other)"
    )
    sim.add_argument("--insecure", action="store_true", help="data plane without TLS and tokens (it stays on loopback)")
    sim.add_argument(
        "--sample", metavar="PROMPT", help="at the end, sample 200 tokens from the final model after PROMPT"
    )
    sim.set_defaults(func=simulate)

    base = sub.add_parser(
        "baseline", help="train the monolithic model centrally on every data owner's data, same budget, same metrics"
    )
    base.add_argument("federation", help="the federation YAML file")
    run_arguments(base)
    base.add_argument("--device", help="default cpu")
    base.set_defaults(func=baseline)

    coord = sub.add_parser(
        "coordinator", help="run a federation's rounds through a SuperLink that the organisations' clients join"
    )
    coord.add_argument("federation", help="the federation YAML file")
    run_arguments(coord)
    coord.add_argument(
        "--listen", default="0.0.0.0:9093", help="where the SuperLink started here listens (default 0.0.0.0:9093)"
    )
    coord.add_argument(
        "--superlink", metavar="HOST:PORT", help="use a running SuperLink (its control API) instead of starting one"
    )
    coord.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete round")
    coord.add_argument(
        "--node-timeout", type=float, default=300.0, help="seconds to wait for every organisation to join"
    )
    security_arguments(
        coord,
        "the coordinator's certificate (coordinator.pem) and verifiers.yaml (every organisation's token verifier)",
    )
    coord.set_defaults(func=coordinator)

    client = sub.add_parser(
        "client",
        help="serve one organisation: its worker (data plane) and its SuperNode (Flower)",
        usage="fedsplit client FEDERATION --org ORG --superlink HOST:PORT --data-plane-address HOST:PORT [options]",
    )
    client.add_argument(
        "federation", nargs="?", help="the federation YAML file (the same plan as the coordinator's), as everywhere"
    )
    client.add_argument("--plan", dest="plan_option", help=argparse.SUPPRESS)  # the old spelling of FEDERATION
    client.add_argument("--org", required=True, help="this organisation's name in the plan")
    client.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink")
    client.add_argument(
        "--data-plane-address",
        required=True,
        metavar="HOST:PORT",
        help="where the other organisations reach this worker (it listens on --bind at that port)",
    )
    client.add_argument("--bind", default="0.0.0.0", help="interface the worker listens on (default all)")
    client.add_argument("--device", help="this organisation's device (default: the plan's, cuda when present)")
    client.add_argument("--state-dir", default="fedsplit-state", help="optimizer state per round and Flower's home")
    client.add_argument(
        "--supernode-port", type=int, default=0, help="the SuperNode's local API port (default: any free one)"
    )
    client.add_argument(
        "--keep-serving",
        action="store_true",
        help="serve the coordinator's next runs too (default: exit once the coordinator finishes a run)",
    )
    security_arguments(client, "ca.pem, verifiers.yaml and this organisation's NAME.pem/NAME.key/NAME.token")
    client.set_defaults(func=client_)


def verify_plan(args: argparse.Namespace) -> int:
    from ..federation.verify import VerifyError, verify
    from ..hosting.processes import HostStartError
    from ..plan.schema import OptimizerConfig

    plan = load(args.federation)
    if args.precision:
        plan = plan.with_training(precision=args.precision)
    optimizer = None
    if args.optimizer:
        optimizer = OptimizerConfig(**{**plan.training.optimizer.model_dump(), "name": args.optimizer, "momentum": 0.0})
    if args.insecure:
        warn_insecure()
    try:
        result = verify(
            plan, args.steps, args.device, optimizer=optimizer, transport=args.transport, insecure=args.insecure
        )
    except VerifyError as e:
        raise CliError(f"cannot verify: {e}", USAGE) from None
    except HostStartError as e:
        raise CliError(f"cannot verify: {e}") from None
    ok = result.max_abs_diff <= args.tolerance
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        table = Table(title=f"split vs monolithic, {args.steps} steps, plan '{plan.name}'")
        table.add_column("step", justify="right")
        table.add_column("loss (split)", justify="right")
        table.add_column("loss (monolithic)", justify="right")
        for i, (a, b) in enumerate(zip(result.loss_split, result.loss_mono)):
            table.add_row(str(i + 1), f"{a:.6f}", f"{b:.6f}")
        console.print(table)
        console.print(f"max abs parameter difference: {result.max_abs_diff:.3e} (at {result.worst_parameter})")
        console.print(
            f"max rel parameter difference: {result.max_rel_diff:.3e} "
            "(|split - mono| / max(|mono|, 1e-6), worst element)"
        )
        if result.clip_split:
            worst = max(abs(a - b) / b for a, b in zip(result.clip_split, result.clip_mono))
            console.print(f"clip factors: split vs monolithic within {worst:.1e} relative in every step")
        verdict = "[green]exact within" if ok else "[red]differs by more than"
        console.print(f"{verdict} the tolerance {args.tolerance:g} (max abs difference, --tolerance)[/]")
    return 0 if ok else FAILED


def make_certs(args: argparse.Namespace) -> None:
    from ..transport.protocol import COORDINATOR
    from ..transport.security import generate_credentials

    plan = load(args.federation)
    out = generate_credentials([*plan.orgs, COORDINATOR], args.out, hosts=args.hosts)
    say(f"wrote a CA, a certificate, key and token per organisation and the coordinator, and verifiers.yaml to {out}")
    say("give each organisation ca.pem, verifiers.yaml and its own NAME.pem/NAME.key/NAME.token; keep ca.key offline")


def simulate(args: argparse.Namespace) -> None:
    from ..federation.simulate import SimulationFailed, SimulationOptions, simulate

    plan = with_overrides(load(args.federation), args)
    if args.insecure:
        warn_insecure()
    options = SimulationOptions(
        runs_root=Path(args.runs_dir),
        resume=Path(args.resume) if args.resume else None,
        device=args.device,
        insecure=args.insecure,
        process_per_org=args.process_per_org,
        actors=args.actors,
    )
    _run_rounds(plan, options, simulate, SimulationFailed, "simulation", args.sample)


def coordinator(args: argparse.Namespace) -> None:
    from ..federation.deploy import CoordinatorOptions, DeploymentError, run_coordinator

    plan = with_overrides(load(args.federation), args)
    options = CoordinatorOptions(
        runs_root=Path(args.runs_dir),
        resume=Path(args.resume) if args.resume else None,
        superlink=args.superlink,
        listen=args.listen,
        credentials=credentials(args),
        insecure=args.insecure,
        node_timeout_s=args.node_timeout,
    )
    _run_rounds(plan, options, run_coordinator, DeploymentError, "coordinator")


def client_(args: argparse.Namespace) -> int:
    from ..data import DataError
    from ..federation.deploy import ClientOptions, DeploymentError, run_client

    given = [f for f in (args.federation, args.plan_option) if f]
    if len(set(given)) != 1:
        raise CliError(
            "give the federation YAML file once, first: fedsplit client FEDERATION --org ORG ..."
            + (f" (got {' and '.join(given)})" if given else ""),
            USAGE,
        )
    plan = load(given[0])
    options = ClientOptions(
        org=args.org,
        superlink=args.superlink,
        data_plane_address=args.data_plane_address,
        bind=args.bind,
        credentials=credentials(args),
        insecure=args.insecure,
        device=args.device,
        state_dir=Path(args.state_dir),
        supernode_port=args.supernode_port,
        keep_serving=args.keep_serving,
    )
    say(
        f"{args.org}: serving its worker on the data plane at {args.data_plane_address} and joining the "
        f"SuperLink at {args.superlink} (Ctrl-C stops both)"
    )
    try:
        end = run_client(plan, options)
    except (DeploymentError, DataError) as e:
        raise CliError(f"client failed: {e}") from None
    say(f"{args.org}: {end.why}; client stopped")
    return end.code


def baseline(args: argparse.Namespace) -> None:
    from ..data import DataError
    from ..federation.baseline import run_baseline
    from ..federation.progress import progress_bar

    plan = with_overrides(load(args.federation), args)
    t = plan.training
    with progress_bar(console, "centralised baseline") as bar:
        task = bar.add_task("steps", total=t.rounds * t.steps_per_round, status="")
        try:
            run_dir = run_baseline(
                plan,
                Path(args.runs_dir),
                args.device or "cpu",
                on_step=lambda done, total, m: bar.update(task, completed=done, status=f"loss {m['loss']:.4f}"),
            )
        except DataError as e:
            raise CliError(f"baseline failed: {e}") from None
    finish_run(run_dir, None)


def _run_rounds(plan, options, run, failure: type[Exception], what: str, sample: str | None = None) -> None:
    """``run(plan, options)`` with a progress bar over its run directory, then the end-of-run summary."""
    from ..federation.progress import watch_rounds
    from ..interop import CheckpointError

    try:
        run_dir = options.directory(plan)
    except CheckpointError as e:  # resuming a run none of whose rounds is usable
        raise CliError(f"cannot resume: {e}") from None
    try:
        with watch_rounds(run_dir, plan.training.rounds, console):
            run(plan, options)
    except failure as e:
        raise CliError(f"{what} failed: {e}") from None
    finish_run(run_dir, sample)


def finish_run(run_dir: Path, prompt: str | None) -> None:
    """What a user wants to see at the end of a run: the rounds, the plots and where the model is,
    and (with a prompt) a sample of what it learned."""
    from ..report import ReportError, write_report
    from ..sampling import generate_text, load_model

    print_rounds(run_dir)
    try:
        report = write_report(run_dir)
        say(f"report: {report.summary} ({', '.join(p.name for p in report.plots)})")
    except ReportError as e:
        err_console.print(f"[yellow]no report:[/] {e}", highlight=False, soft_wrap=True)
    say(f"run directory: {run_dir} ({run_contents(run_dir)})")
    if prompt:
        text = generate_text(load_model(run_dir), prompt, 200, temperature=0.8, top_k=20, seed=0)
        console.print("[bold]sample[/] (200 tokens, temperature 0.8, top-k 20):", highlight=False)
        print(text)


def run_contents(run_dir: Path) -> str:
    """What a finished run's directory holds, logs by their paths in it (simulations log under
    ``workers/``, deployments under ``logs/``)."""
    logs = sorted(p.relative_to(run_dir).as_posix() for d in ("logs", "workers") for p in (run_dir / d).glob("*.log"))
    shown = ", ".join(logs) if len(logs) <= 4 else f"{', '.join(logs[:3])} and {len(logs) - 3} more"
    return "metrics.jsonl, checkpoints/, plan.json" + (f"; logs: {shown}" if logs else "")


def print_rounds(run_dir: Path) -> None:
    """Per round: train loss, held-out loss and perplexity of the model after the round, tokens, time."""
    from ..federation.rundir import MetricsLog

    records = MetricsLog(run_dir / "metrics.jsonl").read()
    evals = {r["round"]: r for r in records if r["event"] == "eval"}
    table = Table(title=f"rounds of {run_dir.name}")
    for col in ("round", "train loss", "held-out loss", "perplexity", "tokens", "seconds", "organisations"):
        table.add_column(col, justify="right")

    def held_out(ev: dict) -> tuple[str, str]:
        return (f"{ev['loss']:.4f}", f"{ev['ppl']:.2f}") if "ppl" in ev else ("", "")

    if 0 in evals:
        table.add_row("0", "", *held_out(evals[0]), "", "", "")
    for r in records:
        if r["event"] == "round":
            ev = evals.get(r["round"], {})
            table.add_row(
                str(r["round"]),
                f"{r['loss']:.4f}",
                *held_out(ev),
                f"{int(r['tokens']):,}",
                f"{r['seconds']:.1f}",
                str(len(r["alive"])),
            )
        elif r["event"] == "round-failed":
            table.add_row(str(r["round"]), "[red]failed[/]", "", "", "", "", "gone: " + ", ".join(r["gone"]))
    console.print(table)
