"""The ``fedsplit`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from .federation.progress import watch_rounds
from .federation.rundir import MetricsLog
from .model import ModelConfig
from .plan import Plan, PlanError, load_plan
from .plan.schema import OptimizerConfig
from .plan.units import describe

if TYPE_CHECKING:
    from .data import Tokenizer
    from .data.corpus_split import CorpusSplit

console = Console()
err_console = Console(stderr=True)


def _bytes_per_parameter(plan: Plan) -> int:
    """fp32 weights and gradients plus the optimizer's state per parameter."""
    opt = plan.training.optimizer
    state = 2 if opt.name in ("adam", "adamw") else (1 if opt.momentum else 0)
    return 4 * (2 + state)


def _load(path: str) -> Plan | None:
    try:
        return load_plan(path)
    except PlanError as e:
        err_console.print(f"[bold red]invalid plan[/] {path}:")
        for p in e.problems:
            err_console.print(f"  [red]✗[/] {p}", highlight=False)
        return None


def cmd_plan_check(args: argparse.Namespace) -> int:
    plan = _load(args.federation)
    if plan is None:
        return 1
    per = _bytes_per_parameter(plan)
    orgs = Table(title=f"plan '{plan.name}': {len(plan.orgs)} organisations, model {plan.model_source.name}")
    for col in ("organisation", "holds", "parameters", "memory", "data", "device"):
        orgs.add_column(col, justify="right" if col in ("parameters", "memory") else "left")
    total = 0
    for name, org in plan.orgs.items():
        n = plan.parameter_count(name)
        total += n
        orgs.add_row(
            name,
            "\n".join(e.selector for e in org.entries) or "-",
            f"{n:,}",
            f"{n * per / 2**20:.1f} MiB",
            "yes" if org.holds_data else "-",
            org.device,
        )
    console.print(orgs)
    in_step = plan.aggregation.replica_sync == "step"
    sync = "add up their gradients every step" if in_step else "are averaged after each round"
    parts = Table(title=f"partitions (replicas {sync})")
    for col in ("partition", "units", "held by", ""):
        parts.add_column(col)
    for p in plan.partitions:
        mark = "local" if p.local_holders else ("replicated" if p.replicated else "")
        parts.add_row(p.name, describe(p.units, plan.model), ", ".join(p.holders), mark)
    console.print(parts)
    console.print(
        f"memory = parameters x {per} bytes (fp32 weights, gradients, {plan.training.optimizer.name} state); "
        f"{total:,} parameters held in all, replicas included"
    )
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print("[green]plan is valid[/]")
    return 0


def cmd_plan_generate(args: argparse.Namespace) -> int:
    from .plan.templates import generate_plan

    given = {k: getattr(args, k) for k in ("model", "seed", "rounds", "steps_per_round", "batch_size", "seq_len")}
    try:
        split = _split_for_generated_plan(args)
        path = generate_plan(
            args.orgs,
            args.out,
            data_owners=args.data_owners,
            name=args.name,
            split=split,
            **{k: v for k, v in given.items() if v is not None},
        )
    except ValueError as e:
        err_console.print(f"[red]cannot generate:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    plan = _load(str(path))
    if plan is None:
        return 1
    replicated = sum(p.replicated for p in plan.partitions)
    console.print(
        f"wrote {path}: plan '{plan.name}' is valid: {len(plan.orgs)} organisations, "
        f"{len(plan.data_owners)} data owners, {len(plan.partitions)} partitions ({replicated} replicated)",
        highlight=False,
        soft_wrap=True,
    )
    if split is not None:
        print_split(split)
    return 0


def _split_for_generated_plan(args: argparse.Namespace) -> CorpusSplit | None:
    """The ``--split`` of ``plan generate``: the shipped corpora across the plan's data owners,
    by the plan's seed."""
    if args.split is None:
        return None
    from .data.corpus_split import split_corpora
    from .plan.templates import data_owner_names, default_data_owners

    owners = args.data_owners if args.data_owners is not None else default_data_owners(args.orgs)
    return split_corpora(data_owner_names(owners), args.split, alpha=args.alpha, seed=args.seed or 0)


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


def warn_insecure() -> None:
    err_console.print(
        "[bold red]WARNING: --insecure: the data plane runs WITHOUT TLS and WITHOUT credentials. "
        "Activations, gradients and weights cross the network in plaintext and anyone who can "
        "reach a worker can call it. Use this only on loopback for tests.[/]"
    )


def cmd_certs(args: argparse.Namespace) -> int:
    from .transport.security import generate_credentials

    plan = _load(args.federation)
    if plan is None:
        return 1
    out = generate_credentials([*plan.orgs, "coordinator"], args.out, hosts=args.hosts)
    console.print(
        f"wrote a CA, a certificate, key and token per organisation and the coordinator, and verifiers.yaml to {out}"
    )
    console.print(
        "give each organisation ca.pem, verifiers.yaml and its own NAME.pem/NAME.key/NAME.token; keep ca.key offline"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .federation.verify import VerifyError, verify

    plan = _load(args.federation)
    if plan is None:
        return 1
    optimizer = None
    if args.optimizer:
        optimizer = OptimizerConfig(**{**plan.training.optimizer.model_dump(), "name": args.optimizer, "momentum": 0.0})
    if args.insecure:
        warn_insecure()
    try:
        result = verify(
            plan, args.steps, device=args.device, optimizer=optimizer, transport=args.transport, insecure=args.insecure
        )
    except VerifyError as e:
        err_console.print(f"[red]cannot verify:[/] {e}")
        return 2
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
        console.print(f"max rel parameter difference: {result.max_rel_diff:.3e}")
        console.print("[green]exact within tolerance[/]" if ok else f"[red]differs by more than {args.tolerance:g}[/]")
    return 0 if ok else 1


def _training_overrides(plan: Plan, args: argparse.Namespace) -> None:
    update = {k: v for k, v in (("rounds", args.rounds), ("steps_per_round", args.steps)) if v is not None}
    if update:
        plan.training = plan.training.model_copy(update=update)


def print_rounds(run_dir: Path) -> None:
    """Per round: train loss, held-out loss and perplexity of the model after the round, tokens, time."""
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    evals = {r["round"]: r for r in records if r["event"] == "eval"}
    table = Table(title=f"rounds of {run_dir.name}")
    for col in ("round", "train loss", "held-out loss", "perplexity", "tokens", "seconds", "organisations"):
        table.add_column(col, justify="right")
    if 0 in evals:
        table.add_row("0", "", f"{evals[0]['loss']:.4f}", f"{evals[0]['ppl']:.2f}", "", "", "")
    for r in records:
        ev = evals.get(r["round"], {})
        held_out = (f"{ev['loss']:.4f}", f"{ev['ppl']:.2f}") if ev else ("", "")
        if r["event"] == "round":
            table.add_row(
                str(r["round"]),
                f"{r['loss']:.4f}",
                *held_out,
                f"{int(r['tokens']):,}",
                f"{r['seconds']:.1f}",
                str(len(r["alive"])),
            )
        elif r["event"] == "round-failed":
            table.add_row(str(r["round"]), "[red]failed[/]", "", "", "", "", "gone: " + ", ".join(r["gone"]))
    console.print(table)


def cmd_simulate(args: argparse.Namespace) -> int:
    from .federation.simulate import SimulationFailed, SimulationOptions, simulate

    plan = _load(args.federation)
    if plan is None:
        return 1
    _training_overrides(plan, args)
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
    return _run_rounds(plan, options, simulate, SimulationFailed, "simulation", args.sample)


def _run_rounds(plan: Plan, options, run, failure: type[Exception], what: str, sample: str | None = None) -> int:
    """``run(plan, options)`` with a progress bar over its run directory, then the end-of-run summary."""
    run_dir = options.directory(plan)
    try:
        with watch_rounds(run_dir, plan.training.rounds, console):
            run(plan, options)
    except failure as e:
        err_console.print(f"[red]{what} failed:[/] {e}", highlight=False, soft_wrap=True)
        return 1
    finish_run(run_dir, sample)
    return 0


def finish_run(run_dir: Path, prompt: str | None) -> None:
    """What a user wants to see at the end of a run: the rounds, the plots and where the model is,
    and (with a prompt) a sample of what it learned."""
    from .report import ReportError, write_report
    from .sampling import generate_text, load_model

    print_rounds(run_dir)
    try:
        report = write_report(run_dir)
        console.print(
            f"report: {report.summary} ({', '.join(p.name for p in report.plots)})", highlight=False, soft_wrap=True
        )
    except ReportError as e:
        err_console.print(f"[yellow]no report:[/] {e}", highlight=False, soft_wrap=True)
    console.print(
        f"run directory: {run_dir} (metrics.jsonl, checkpoints/, plan.json, logs/)", highlight=False, soft_wrap=True
    )
    if prompt:
        text = generate_text(load_model(run_dir), prompt, 200, temperature=0.8, top_k=20, seed=0)
        console.print("[bold]sample[/] (200 tokens, temperature 0.8, top-k 20):", highlight=False)
        print(text)


def _credentials(args: argparse.Namespace) -> Path | None:
    if args.insecure:
        warn_insecure()
        return None
    return Path(args.credentials)


def cmd_baseline(args: argparse.Namespace) -> int:
    from .federation.baseline import run_baseline
    from .federation.progress import progress_bar

    plan = _load(args.federation)
    if plan is None:
        return 1
    _training_overrides(plan, args)
    t = plan.training
    with progress_bar(console, "centralised baseline") as bar:
        task = bar.add_task("steps", total=t.rounds * t.steps_per_round, status="")
        run_dir = run_baseline(
            plan,
            Path(args.runs_dir),
            args.device or "cpu",
            on_step=lambda done, total, m: bar.update(task, completed=done, status=f"loss {m['loss']:.4f}"),
        )
    finish_run(run_dir, None)
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    from .federation.deploy import CoordinatorOptions, DeploymentError, run_coordinator

    plan = _load(args.federation)
    if plan is None:
        return 1
    _training_overrides(plan, args)
    options = CoordinatorOptions(
        runs_root=Path(args.runs_dir),
        resume=Path(args.resume) if args.resume else None,
        superlink=args.superlink,
        listen=args.listen,
        credentials=_credentials(args),
        insecure=args.insecure,
        node_timeout_s=args.node_timeout,
    )
    return _run_rounds(plan, options, run_coordinator, DeploymentError, "coordinator")


def cmd_client(args: argparse.Namespace) -> int:
    from .federation.deploy import ClientOptions, DeploymentError, run_client

    plan = _load(args.plan)
    if plan is None:
        return 1
    options = ClientOptions(
        org=args.org,
        superlink=args.superlink,
        data_plane_address=args.data_plane_address,
        bind=args.bind,
        credentials=_credentials(args),
        insecure=args.insecure,
        device=args.device,
        state_dir=Path(args.state_dir),
        supernode_port=args.supernode_port,
    )
    try:
        return run_client(plan, options)
    except DeploymentError as e:
        err_console.print(f"[red]client failed:[/] {e}", highlight=False, soft_wrap=True)
        return 1


def cmd_import(args: argparse.Namespace) -> int:
    from .interop import CheckpointError, open_checkpoint, save_fedsplit

    try:
        ckpt = open_checkpoint(args.hf_dir)
        if ckpt.format != "hf":
            raise CheckpointError(
                "is a fedsplit model directory already: a plan can use it as its model", file=args.hf_dir
            )
        out = save_fedsplit(ckpt.config, ckpt.reader.read_all(), args.out)
    except CheckpointError as e:
        err_console.print(f"[red]cannot import:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    cfg = ckpt.config
    console.print(
        f"imported {ckpt.architecture} ({cfg.num_layers} layers, {cfg.num_experts} experts, top-{cfg.top_k}) to {out}; "
        f"name it as a plan's model: (or name {args.hf_dir} itself)",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    from .interop import CheckpointError, open_checkpoint, save_fedsplit
    from .interop.upcycle import check_dense, check_upcycle, upcycle

    try:
        dense = open_checkpoint(args.dense)
        check_dense(dense.config)
        weights = dense.reader.read_all()
        cfg, moe = upcycle(
            dense.config,
            weights,
            args.experts,
            args.method,
            top_k=args.top_k,
            shared_neurons=args.shared_neurons,
            seed=args.seed,
        )
    except (CheckpointError, ValueError) as e:
        err_console.print(f"[red]cannot upcycle:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    report = check_upcycle(dense.config, weights, cfg, moe, seed=args.seed)
    out = save_fedsplit(cfg, moe, args.out)
    (out / "upcycle.json").write_text(
        json.dumps(
            {
                "source": str(args.dense),
                "method": args.method,
                "experts": args.experts,
                "top_k": args.top_k,
                "seed": args.seed,
                **report.as_dict(),
            },
            indent=2,
        )
    )
    shared = f" + a shared expert of {cfg.shared_expert_ffn_size}" if cfg.num_shared_experts else ""
    console.print(
        f"{dense.config.expert_ffn_size} neurons per FFN -> {args.experts} experts of {cfg.expert_ffn_size}{shared} "
        f"({args.method}), top-{cfg.top_k}; wrote {out}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"every expert active, unit gates: max |FFN - dense FFN| = {report.all_experts_max_abs_diff:.2e}",
        highlight=False,
    )
    console.print(
        f"top-{cfg.top_k} with the initial router: FFN relative error {report.top_k_ffn_rel_error:.3f} (worst layer), "
        f"logits max abs diff {report.top_k_logits_max_abs_diff:.3e}, relative {report.top_k_logits_rel_error:.3f}",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def _export_config(source: Path, args: argparse.Namespace) -> ModelConfig:
    """The model config of a run's checkpoint: ``--model`` (a model YAML or directory), else the
    run's plan.json beside or above the checkpoint."""
    from .interop import CheckpointError, open_checkpoint

    if args.model:
        model = Path(args.model)
        return open_checkpoint(model).config if model.is_dir() else ModelConfig.from_yaml(model)
    plans = [d / "plan.json" for d in (source, *source.parents[:3]) if (d / "plan.json").exists()]
    if not plans:
        raise CheckpointError(
            "no plan.json beside or above it to take the model config from: give --model MODEL_YAML", file=source
        )
    return ModelConfig.model_validate(json.loads(plans[0].read_text())["model"])


def _export_hf(weights: dict, source: Path, args: argparse.Namespace, cfg: ModelConfig | None = None) -> int:
    """Write ``weights`` as a HF directory, for ``cfg`` or the config :func:`_export_config` finds."""
    from .interop import CheckpointError, save_hf

    try:
        out = save_hf(cfg or _export_config(source, args), weights, args.out)
    except (CheckpointError, ValueError, OSError) as e:
        err_console.print(f"[red]cannot export:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    console.print(
        f"wrote a Hugging Face checkpoint to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r})",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from .federation.checkpoint import find_checkpoint
    from .interop import is_model_directory, open_checkpoint

    source = Path(args.checkpoint)
    if args.format == "hf" and is_model_directory(source):
        model = open_checkpoint(source)
        return _export_hf(model.reader.read_all(), source, args, model.config)
    ckpt = find_checkpoint(source)
    if ckpt is None:
        err_console.print(
            f"[red]no complete checkpoint in {source}[/] (give a run directory or a checkpoints/round-NNNN directory)"
        )
        return 1
    if args.format == "hf":
        return _export_hf(ckpt.weights, ckpt.path, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in ckpt.weights.items()}, out, metadata={"format": "pt", "round": str(ckpt.round)}
    )
    console.print(f"wrote the full model of round {ckpt.round} ({len(ckpt.weights)} tensors) to {out}", highlight=False)
    return 0


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """What every command that makes a run directory takes."""
    parser.add_argument("--rounds", type=int, help="override training.rounds")
    parser.add_argument("--steps", type=int, help="override training.steps_per_round")
    parser.add_argument("--runs-dir", default="runs", help="where run directories go (default runs/)")


def _security_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--credentials", metavar="DIR", help=f"`fedsplit certs` output: {what}")
    group.add_argument(
        "--insecure", action="store_true", help="no TLS and no tokens on either plane (trusted networks only)"
    )


def cmd_plan_show(args: argparse.Namespace) -> int:
    from .plan.partition_map import draw_partition_map, partition_map

    plan = _load(args.federation)
    if plan is None:
        return 1
    if args.png:
        console.print(
            f"wrote the partition map of plan '{plan.name}' to {draw_partition_map(plan, args.png)}", highlight=False
        )
        return 0
    table = Table(title=f"partition map of plan '{plan.name}', layer by layer", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("row", "pieces", "held by"):
        table.add_column(col)
    for row in partition_map(plan)[1]:
        for i, (holders, units) in enumerate(row.pieces()):
            mark = " [dim](replicated)[/]" if len(holders) > 1 else ""
            table.add_row(row.label if i == 0 else "", describe(units, plan.model), ", ".join(holders) + mark)
    console.print(table)
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import glob

    from .data import DataError, read_documents, train_bpe

    paths = [Path(m) for pattern in args.files for m in (sorted(glob.glob(pattern)) or [pattern])]
    try:
        tokenizer = train_bpe(read_documents(paths, role="tokenizer training"), args.vocab_size, args.min_frequency)
    except (DataError, ValueError) as e:
        err_console.print(f"[red]cannot train:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    console.print(
        f"wrote {out}: byte-level BPE of {tokenizer.vocab_size:,} tokens from {len(paths)} file(s); name it in a "
        "federation file as `tokenizer: <path relative to it>` (the model's vocab_size must be >= "
        f"{tokenizer.vocab_size})",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from .data import TokenizerError, load_tokenizer
    from .data.corpus_split import SplitError, split_corpora
    from .plan.templates import data_owner_names

    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        split = split_corpora(
            data_owner_names(args.orgs),
            args.by,
            alpha=args.alpha,
            seed=args.seed,
            heldout=args.heldout,
            corpora=[Path(p) for p in args.corpora] if args.corpora else None,
        )
    except (SplitError, TokenizerError) as e:
        err_console.print(f"[red]cannot split:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    out = split.write(args.out)
    print_split(split, tokenizer)
    console.print(
        f"wrote {out}/<org>/train.jsonl and eval.jsonl for {len(split.train)} organisations, and {out}/split.json; "
        f"point each organisation's data: {{train: ..., eval: ...}} at its own",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .sampling import GenerateError, generate_text, load_model

    try:
        loaded = load_model(args.checkpoint, plan_file=args.plan, tokenizer_file=args.tokenizer, device=args.device)
        text = generate_text(
            loaded, args.prompt, args.max_tokens, temperature=args.temperature, top_k=args.top_k or None, seed=args.seed
        )
    except (GenerateError, ValueError) as e:
        err_console.print(f"[red]cannot generate:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    err_console.print(
        f"[dim]{loaded.description}, {loaded.tokenizer.vocab_size}-token vocabulary[/]", highlight=False, soft_wrap=True
    )
    print(text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import ReportError, write_report

    try:
        report = write_report(args.run_dir, baseline=args.baseline, out=args.out)
    except ReportError as e:
        err_console.print(f"[red]cannot report:[/] {e}", highlight=False, soft_wrap=True)
        return 1
    console.print(f"wrote {report.summary}", highlight=False, soft_wrap=True)
    for path in report.plots:
        console.print(f"  {path}", highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"  [yellow]skipped:[/] {note}", highlight=False, soft_wrap=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsplit", description="Federated split training of partitioned MoE transformers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="check and show partition plans")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    check = plan_sub.add_parser("check", help="validate a plan and print what goes where")
    check.add_argument("federation", help="the federation YAML file")
    check.set_defaults(func=cmd_plan_check)
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
    generate.set_defaults(func=cmd_plan_generate)
    show = plan_sub.add_parser(
        "show", help="the partition map: layers x (head groups, experts, other pieces) by organisation"
    )
    show.add_argument("federation", help="the federation YAML file")
    show.add_argument("--png", metavar="FILE", help="draw it into a PNG (default: print it as text)")
    show.set_defaults(func=cmd_plan_show)

    tokenizer = sub.add_parser("tokenizer", help="train a BPE tokenizer locally")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    train = tokenizer_sub.add_parser("train", help="learn a byte-level BPE from text or .jsonl files (globs allowed)")
    train.add_argument("files", nargs="+")
    train.add_argument("--vocab-size", type=int, required=True, help="at most this many tokens (>= 256)")
    train.add_argument(
        "--min-frequency", type=int, default=2, help="fewest occurrences of a pair to merge it (default 2)"
    )
    train.add_argument("--out", required=True, help="the tokenizer JSON file to write")
    train.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="prepare organisations' data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    split = data_sub.add_parser(
        "split", help="cut corpora into per-organisation train and held-out files (IID or non-IID)"
    )
    split.add_argument("--orgs", type=int, required=True, help="number of organisations (named data-00, data-01, ...)")
    split.add_argument(
        "--by",
        choices=["iid", "domain", "dirichlet"],
        default="iid",
        help="iid: shuffled equal shares; domain: whole domains per organisation; dirichlet: Dirichlet(alpha) mixtures",
    )
    split.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller: more skewed; default 0.5)"
    )
    split.add_argument("--seed", type=int, default=0)
    split.add_argument(
        "--heldout", type=float, default=0.1, help="fraction of each organisation's chunks held out (default 0.1)"
    )
    split.add_argument(
        "--corpora", nargs="+", metavar="FILE", help="text files, one domain each (default: the shipped data/*.txt)"
    )
    split.add_argument("--tokenizer", metavar="FILE", help="count tokens with this tokenizer (default: UTF-8 bytes)")
    split.add_argument("--out", required=True, help="directory for <org>/train.jsonl, <org>/eval.jsonl and split.json")
    split.set_defaults(func=cmd_data_split)

    verify = sub.add_parser("verify", help="train split and monolithic side by side and compare the parameters")
    verify.add_argument("federation")
    verify.add_argument("--steps", type=int, default=10)
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.add_argument("--device", default="cpu", help="device for every organisation and the reference (default cpu)")
    verify.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], help="override the plan's optimizer")
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
    verify.set_defaults(func=cmd_verify)
    certs = sub.add_parser("certs", help="make a self-signed CA, per-organisation certificates and tokens for a plan")
    certs.add_argument("federation")
    certs.add_argument("--out", required=True, help="directory to write them to")
    certs.add_argument(
        "--hosts",
        nargs="+",
        default=["localhost", "127.0.0.1"],
        help="host names and IP addresses the certificates are valid for",
    )
    certs.set_defaults(func=cmd_certs)
    sim = sub.add_parser("simulate", help="run the whole federation on this host through Flower's simulation engine")
    sim.add_argument("federation")
    _run_arguments(sim)
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
    sim.set_defaults(func=cmd_simulate)

    base = sub.add_parser(
        "baseline", help="train the monolithic model centrally on every data owner's data, same budget, same metrics"
    )
    base.add_argument("federation")
    _run_arguments(base)
    base.add_argument("--device", help="default cpu")
    base.set_defaults(func=cmd_baseline)

    coord = sub.add_parser(
        "coordinator", help="run a federation's rounds through a SuperLink that the organisations' clients join"
    )
    coord.add_argument("federation")
    _run_arguments(coord)
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
    _security_arguments(
        coord,
        "the coordinator's certificate (coordinator.pem) and verifiers.yaml (every organisation's token verifier)",
    )
    coord.set_defaults(func=cmd_coordinator)

    client = sub.add_parser("client", help="serve one organisation: its worker (data plane) and its SuperNode (Flower)")
    client.add_argument("--org", required=True, help="this organisation's name in the plan")
    client.add_argument("--plan", required=True, help="the federation YAML file (the same plan as the coordinator's)")
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
    _security_arguments(client, "ca.pem, verifiers.yaml and this organisation's NAME.pem/NAME.key/NAME.token")
    client.set_defaults(func=cmd_client)

    export = sub.add_parser(
        "export", help="write the full model of a checkpoint as one safetensors file, or as a Hugging Face directory"
    )
    export.add_argument(
        "checkpoint",
        help="a run directory (its last complete round) or a checkpoints/round-NNNN directory "
        "(with --format hf also a fedsplit model directory)",
    )
    export.add_argument("out", help="the .safetensors file to write (--format hf: the directory)")
    export.add_argument(
        "--format",
        choices=["safetensors", "hf"],
        default="safetensors",
        help="hf: config.json and safetensors that transformers loads (Mixtral, or Qwen2-MoE with shared experts)",
    )
    export.add_argument("--model", help="with --format hf: the model YAML or directory (default: the run's plan.json)")
    export.set_defaults(func=cmd_export)
    imp = sub.add_parser(
        "import", help="convert a Hugging Face Mixtral, Qwen2-MoE or Llama directory to a fedsplit model directory"
    )
    imp.add_argument("hf_dir", help="a directory with config.json and model.safetensors (or shards and their index)")
    imp.add_argument("out", help="the fedsplit model directory to write (model.yaml, model.safetensors)")
    imp.set_defaults(func=cmd_import)
    up = sub.add_parser("upcycle", help="turn a dense model's FFNs into experts by splitting their neurons (LLaMA-MoE)")
    up.add_argument(
        "dense", help="a fedsplit model directory with one expert, or a Hugging Face LlamaForCausalLM directory"
    )
    up.add_argument("--experts", type=int, required=True, help="routed experts per layer")
    up.add_argument(
        "--method",
        choices=["random", "cluster", "shared"],
        required=True,
        help="random split; balanced k-means of the neurons; or the most important neurons as a shared expert, "
        "the rest split",
    )
    up.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    up.add_argument(
        "--shared-neurons",
        type=int,
        help="with --method shared: neurons of the shared expert (default: one expert's width plus the remainder)",
    )
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--out", required=True, help="the fedsplit model directory to write")
    up.set_defaults(func=cmd_upcycle)
    gen = sub.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument(
        "checkpoint",
        help="a run directory (its last complete round), a checkpoints/round-NNNN directory or a model.safetensors",
    )
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default 50; 0: all)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--plan", metavar="PLAN_JSON", help="the run's plan.json (default: found beside or above the checkpoint)"
    )
    gen.add_argument(
        "--tokenizer", metavar="FILE", help="tokenizer file (default: the run's tokenizer.json, else UTF-8 bytes)"
    )
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(func=cmd_generate)

    report = sub.add_parser("report", help="plots (PNG) and a Markdown summary of a run's metrics")
    report.add_argument("run_dir")
    report.add_argument(
        "--baseline", metavar="RUN_DIR", help="a `fedsplit baseline` run to compare with, round by round"
    )
    report.add_argument("--out", metavar="DIR", help="where to write them (default RUN_DIR/report)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
