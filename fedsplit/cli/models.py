"""The commands on models and their checkpoints: ``import``, ``export``, ``upcycle``, ``generate``,
``report``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import FAILED, USAGE, CliError, err_console, say


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export", help="write the full model of a checkpoint as one safetensors file, or as a Hugging Face directory"
    )
    export.add_argument(
        "checkpoint",
        help="a run directory (its last complete round) or a checkpoints/round-NNNN directory "
        "(with --format hf also a fedsplit model directory)",
    )
    export.add_argument("out", help="the .safetensors file to write (--format hf or peft: the directory)")
    export.add_argument(
        "--format",
        choices=["safetensors", "hf", "peft"],
        default="safetensors",
        help="hf: config.json and safetensors that transformers loads (Mixtral; Granite-MoE-Shared for ungated shared "
        "experts; Qwen2-MoE for gated ones); peft: a LoRA fine-tune's adapter_config.json and "
        "adapter_model.safetensors for the base (the run's Hugging Face base, or one written to OUT/base)",
    )
    export.add_argument(
        "--model", help="with --format hf or --merge: the model YAML or directory (default: the run's plan.json)"
    )
    export.add_argument(
        "--merge", action="store_true", help="fold a LoRA fine-tune's adapters into the base weights (W + alpha/r B A)"
    )
    export.add_argument(
        "--without",
        metavar="ORG",
        action="append",
        default=[],
        help="leave out the experts ORG owns (its plan's 'owns'), the router renormalised over the rest; repeatable",
    )
    export.add_argument(
        "--task",
        metavar="NAME",
        help="with --format hf: the trunk with task NAME's head, as AutoModelForSequenceClassification loads it "
        "(default: the causal LM, with every task head beside it in task_heads.safetensors)",
    )
    export.set_defaults(func=export_model)

    imp = sub.add_parser(
        "import",
        help="convert a Hugging Face Mixtral, Qwen2-MoE, Granite-MoE-Shared or Llama directory to a fedsplit "
        "model directory",
    )
    imp.add_argument("hf_dir", help="a directory with config.json and model.safetensors (or shards and their index)")
    imp.add_argument("out", help="the fedsplit model directory to write (model.yaml, model.safetensors)")
    imp.set_defaults(func=import_model)

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
    up.add_argument("--seed", type=int, default=0, help="seed of the split and the calibration batch (default 0)")
    up.add_argument("--out", required=True, help="the fedsplit model directory to write")
    up.set_defaults(func=upcycle_model)

    gen = sub.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument(
        "checkpoint",
        help="a run directory (its last complete round), a checkpoints/round-NNNN directory or a model.safetensors",
    )
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-tokens", type=int, default=200, help="tokens to sample (default 200)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default 50; 0: all)")
    gen.add_argument(
        "--top-p", type=float, default=1.0, help="then among the most likely tokens adding up to p (default 1: all)"
    )
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument(
        "--plan", metavar="PLAN_JSON", help="the run's plan.json (default: found beside or above the checkpoint)"
    )
    gen.add_argument(
        "--tokenizer", metavar="FILE", help="tokenizer file (default: the run's tokenizer.json, else UTF-8 bytes)"
    )
    gen.add_argument("--device", default="cpu", help="default cpu")
    gen.add_argument(
        "--without",
        metavar="ORG",
        action="append",
        default=[],
        help="leave out the experts ORG owns, as export --without does; repeatable",
    )
    gen.set_defaults(func=generate)

    report = sub.add_parser("report", help="plots (PNG) and a Markdown summary of a run's metrics")
    report.add_argument("run_dir", help="a run directory")
    report.add_argument(
        "--baseline", metavar="RUN_DIR", help="a `fedsplit baseline` run to compare with, round by round"
    )
    report.add_argument("--out", metavar="DIR", help="where to write them (default RUN_DIR/report)")
    report.set_defaults(func=report_run)


def export_model(args: argparse.Namespace) -> None:
    from ..federation.export import export
    from ..interop import CheckpointError

    try:
        model = Path(args.model) if args.model else None
        say(
            export(
                Path(args.checkpoint),
                Path(args.out),
                args.format,
                model,
                merge=args.merge,
                without=args.without,
                task=args.task,
            )
        )
    except (CheckpointError, ValueError, OSError) as e:
        raise CliError(f"cannot export: {e}", USAGE) from None


def import_model(args: argparse.Namespace) -> None:
    from ..interop import CheckpointError, open_checkpoint, save_fedsplit

    try:
        ckpt = open_checkpoint(args.hf_dir)
        if ckpt.format != "hf":
            raise CheckpointError(
                "is a fedsplit model directory already: a plan can use it as its model", file=args.hf_dir
            )
        out = save_fedsplit(ckpt.config, ckpt.reader.read_all(), args.out)
    except CheckpointError as e:
        raise CliError(f"cannot import: {e}", USAGE) from None
    cfg = ckpt.config
    say(
        f"imported {ckpt.architecture} ({cfg.num_layers} layers, {cfg.num_experts} experts, top-{cfg.top_k}) to {out}; "
        f"name it as a plan's model: (or name {args.hf_dir} itself)"
    )


def upcycle_model(args: argparse.Namespace) -> None:
    from ..interop import CheckpointError, open_checkpoint
    from ..interop.upcycle import check_dense, check_upcycle, save_upcycled, upcycle

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
        raise CliError(f"cannot upcycle: {e}", USAGE) from None
    report = check_upcycle(dense.config, weights, cfg, moe, seed=args.seed)
    how = {"method": args.method, "experts": args.experts, "top_k": args.top_k, "seed": args.seed}
    out = save_upcycled(Path(args.dense), Path(args.out), cfg, moe, report, **how)
    shared = f" + a shared expert of {cfg.shared_expert_ffn_size}" if cfg.num_shared_experts else ""
    say(
        f"{dense.config.expert_ffn_size} neurons per FFN -> {args.experts} experts of {cfg.expert_ffn_size}{shared} "
        f"({args.method}), top-{cfg.top_k}; wrote {out}"
    )
    say(f"every expert active, unit gates: max |FFN - dense FFN| = {report.all_experts_max_abs_diff:.2e}")
    say(
        f"top-{cfg.top_k} with the initial router: FFN relative error {report.top_k_ffn_rel_error:.3f} (worst layer), "
        f"logits max abs diff {report.top_k_logits_max_abs_diff:.3e}, relative {report.top_k_logits_rel_error:.3f}"
    )


def generate(args: argparse.Namespace) -> None:
    from ..sampling import GenerateError, generate_text, load_model

    try:
        loaded = load_model(
            args.checkpoint,
            plan_file=args.plan,
            tokenizer_file=args.tokenizer,
            device=args.device,
            without=args.without,
        )
        text = generate_text(
            loaded,
            args.prompt,
            args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            seed=args.seed,
        )
    except (GenerateError, ValueError) as e:
        raise CliError(f"cannot generate: {e}", USAGE) from None
    err_console.print(f"[dim]{loaded.description}, {loaded.tokenizer.vocab_size}-token vocabulary[/]", highlight=False)
    print(text)
    replaced = text.count("\ufffd") - args.prompt.count("\ufffd")
    if replaced > 0:
        err_console.print(
            f"[dim]{replaced} sampled byte sequence{'s are' if replaced > 1 else ' is'} not UTF-8, shown as \ufffd[/]",
            highlight=False,
        )


def report_run(args: argparse.Namespace) -> None:
    from ..report import ReportError, write_report

    try:
        written = write_report(args.run_dir, baseline=args.baseline, out=args.out)
    except ReportError as e:
        raise CliError(f"cannot report: {e}", FAILED) from None
    say(f"wrote {written.summary}")
    for path in written.plots:
        say(f"  {path}")
    for note in written.notes:
        say(f"  [yellow]skipped:[/] {note}")
