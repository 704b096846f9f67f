#!/usr/bin/env python
"""Does split-federated training learn as well as centralised training on the same token budget?

    .venv/bin/python benchmarks/bench_quality.py [--quick] [--splits iid domain dirichlet] [--alpha 0.5]
                                                 [--orgs 6] [--data-owners 3] [--rounds 4] [--steps 30]
                                                 [--modes fedavg diloco step owned]
    .venv/bin/python benchmarks/bench_quality.py --plan configs/plans/demo/federation.yaml

For each data split of the shipped corpora (Shakespeare, Python source, arithmetic) over the data
owners (`fedsplit data split`: IID, one domain per owner, or Dirichlet(alpha) over domains), a
U-shaped plan (`fedsplit plan generate --split ...`: data owners hold both ends, replicated and
averaged by FedAvg each round; the other organisations hold middle layers, experts and head groups)
is trained through Flower's simulation engine, and the monolithic model is trained centrally
(`fedsplit baseline`) on the union of the same batches: same initial weights, rounds, steps,
optimizer and tokens. Both evaluate the same held-out files of every data owner after each round.
``--plan`` trains a given plan on its own data and settings instead (the demo plan: two data
owners with IID Shakespeare). Each is trained three ways by default (``--modes``): ``fedavg``, the
replicated ends trained apart and averaged after each round (``replica_sync: round``);
``diloco``, the same but the coordinator takes an outer Nesterov step along each replica group's
averaged update (``strategy: diloco``, ``--outer-lr``, ``--outer-momentum``); ``step``, replicas
kept in step by adding up their gradients every step (``replica_sync: step``, which equals
centralised training up to rounding); ``owned``, FedAvg with each data owner owning one routed
expert of every layer (``owns``: trained on its batches only, never averaged), after which each
owner's held-out perplexity is measured on the reassembled model with every expert, with the
shared part only, and without each owner's experts in turn (``fedsplit export --without``).
Printed: held-out perplexity per round (overall, token-weighted over the data owners), the gap
of the last round, federated / centralised - 1, and what a round moves: data-plane bytes (every
call's request and reply, gradient exchanges of replicas kept in step included, measured) and
control-plane bytes (each organisation's trained weights to it and back through Flower, from
their sizes). Modes set the strategy: ``--plan`` keeps the rest of its aggregation settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from report import loadavg, provenance, table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fedsplit.data.corpus_split import split_corpora  # noqa: E402
from fedsplit.federation.baseline import run_baseline  # noqa: E402
from fedsplit.federation.checkpoint import latest_checkpoint  # noqa: E402
from fedsplit.federation.rundir import MetricsLog  # noqa: E402
from fedsplit.federation.simulate import SimulationOptions, simulate  # noqa: E402
from fedsplit.interop.withdraw import without_experts  # noqa: E402
from fedsplit.model import ModelConfig, MoETransformer, cross_entropy  # noqa: E402
from fedsplit.plan import Plan, load_plan, select  # noqa: E402
from fedsplit.plan.schema import AggregationConfig, OptimizerConfig  # noqa: E402
from fedsplit.plan.templates import data_owner_names, generate_plan  # noqa: E402
from fedsplit.runtime import initial_weights  # noqa: E402
from fedsplit.runtime.batches import eval_batches_for  # noqa: E402


def held_out_ppl(run_dir: Path) -> dict[int, float]:
    return {r["round"]: r["ppl"] for r in MetricsLog(run_dir / "metrics.jsonl").read() if r["event"] == "eval"}


def data_plane_mb_per_round(run_dir: Path) -> float:
    """Every call's request and reply, each counted once: at the organisation that made it."""
    rounds = [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if r["event"] == "round"]
    moved = [
        sum(float(m.get("bytes_sent", 0)) + float(m.get("bytes_received", 0)) for m in r["orgs"].values())
        for r in rounds
    ]
    return sum(moved) / len(moved) / 1e6


def control_plane_mb_per_round(plan: Plan) -> float:
    """Each organisation's trained weights, sent to it and returned, once a round: computed from
    their sizes, not measured (Flower's own framing is not counted)."""
    weights = initial_weights(plan)
    held = (select(weights, plan.slices_of(org, trained_only=True)) for org in plan.orgs)
    return 2 * sum(t.numel() * t.element_size() for state in held for t in state.values()) / 1e6


def with_owned_experts(federation: Path) -> Path:
    """A copy of a generated plan in which data owner ``i`` owns expert ``E-1-i`` of every layer
    (held by itself where the layer is replicated among the owners, else by the layer's expert
    host), beside the original so that its relative paths still hold."""
    import yaml

    out = federation.parent.with_name(federation.parent.name + "-owned")
    shutil.copytree(federation.parent, out, dirs_exist_ok=True)
    plan = load_plan(federation)
    last_layer, last_expert = plan.model.num_layers - 1, plan.model.num_experts - 1
    for i, d in enumerate(plan.data_owners):
        path = out / "orgs" / plan.orgs[d].file.name
        spec = yaml.safe_load(path.read_text())
        e = last_expert - i
        mine = [s for s in spec["holds"] if s.startswith("layers.")]  # the layers it shares with the others
        spec["holds"] += [f"{s}.experts.{e}" for s in mine]
        spec["owns"] = [f"layers.0-{last_layer}.experts.{e}"]
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out / federation.name


def inference_ppl(cfg: ModelConfig, weights: dict, batches: list) -> float:
    """Held-out perplexity of a reassembled model (every expert it has, no owner's routing)."""
    model = MoETransformer(cfg)
    model.load_state_dict(weights, strict=True)
    model.eval()
    with torch.no_grad():
        losses = [(cross_entropy(model(tok)[0], lab).item(), tok.numel()) for tok, lab in batches]
    return math.exp(sum(loss * n for loss, n in losses) / sum(n for _, n in losses))


def owned_expert_rows(label: str, owned: Plan, owned_run: Path, shared_run: Path | None) -> list[list[str]]:
    """Per data owner, on its own held-out text: the all-shared FedAvg model, the model with every
    owner's experts, with its own and the shared ones (the others withdrawn: how it trained), the
    shared part alone (every owner's experts withdrawn), and without each owner's experts in turn."""
    weights = latest_checkpoint(owned_run / "checkpoints").weights
    by_owner = {d: sorted((u.layer, u.index) for u in owned.orgs[d].owned_experts) for d in owned.data_owners}
    every = [x for experts in by_owner.values() for x in experts]
    shared = latest_checkpoint(shared_run / "checkpoints").weights if shared_run else None
    rows = []
    for d in owned.data_owners:
        batches = eval_batches_for(owned, d)
        row = [label, d, f"{inference_ppl(owned.model, shared, batches):.2f}" if shared else "-"]
        others = [x for o, experts in by_owner.items() if o != d for x in experts]
        for removed in ([], others, every):
            row.append(f"{inference_ppl(*without_experts(owned.model, weights, removed), batches):.2f}")
        row += [f"{inference_ppl(*without_experts(owned.model, weights, by_owner[x]), batches):.2f}" for x in by_owner]
        rows.append(row)
    return rows


def aggregation_for(mode: str, base: AggregationConfig, args: argparse.Namespace) -> AggregationConfig:
    """The plan's aggregation settings with the replicas synchronised as ``mode`` says."""
    update: dict = {"strategy": "fedavg", "replica_sync": "step" if mode == "step" else "round"}  # owned: FedAvg
    if mode == "diloco":
        update.update(strategy="diloco", outer_lr=args.outer_lr, outer_momentum=args.outer_momentum)
    return AggregationConfig.model_validate({**base.model_dump(), **update})


MODE_LABELS = {
    "fedavg": "FedAvg after each round",
    "diloco": "DiLoCo after each round",
    "step": "kept in step",
    "owned": "FedAvg, an owned expert per owner",
}


def plans_to_train(args: argparse.Namespace, work: Path) -> Iterator[tuple[str, Plan, Plan | None]]:
    """(label, plan, the plan with owned experts): the plan given with ``--plan`` as it is, else one
    generated plan per split (and its owned-experts variant, with ``--modes owned``)."""
    if args.plan:
        plan = load_plan(args.plan)
        if all(plan.orgs[d].task is not None for d in plan.data_owners):
            raise SystemExit(
                f"bench_quality: plan {plan.name!r} has no data owner that trains next-token prediction, "
                "so there is no perplexity to compare; give it a plan with at least one text data owner"
            )
        yield f"plan {plan.name}", plan, None
        return
    for by in args.splits:
        split = split_corpora(data_owner_names(args.data_owners), by, alpha=args.alpha, seed=args.seed)
        federation = generate_plan(
            args.orgs,
            work / by,
            data_owners=args.data_owners,
            split=split,
            rounds=args.rounds,
            steps_per_round=args.steps,
            batch_size=8,
            seq_len=64,
            seed=args.seed,
        )
        files = [federation, with_owned_experts(federation) if "owned" in args.modes else None]
        plan, owned = (None if f is None else bench_settings(load_plan(f), args) for f in files)
        yield (f"dirichlet(alpha={args.alpha:g})" if by == "dirichlet" else by), plan, owned


def bench_settings(plan: Plan, args: argparse.Namespace) -> Plan:
    return plan.with_settings(
        training=plan.training.model_copy(
            update={"micro_batches": 2, "eval_tokens": 4096, "optimizer": OptimizerConfig(name="adamw", lr=args.lr)}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="IID only, 2 rounds of 10 steps")
    parser.add_argument("--splits", nargs="+", default=["iid", "domain", "dirichlet"])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--orgs", type=int, default=6)
    parser.add_argument("--data-owners", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", choices=list(MODE_LABELS), default=list(MODE_LABELS))
    parser.add_argument("--outer-lr", type=float, default=AggregationConfig().outer_lr, help="diloco's outer rate")
    parser.add_argument(
        "--outer-momentum", type=float, default=AggregationConfig().outer_momentum, help="diloco's outer momentum"
    )
    parser.add_argument("--plan", type=Path, help="a federation file to train as it is, instead of generated splits")
    args = parser.parse_args()
    if args.quick:
        args.splits, args.rounds, args.steps = ["iid"], 2, 10
    print("\n".join(provenance()))
    print(f"load before: {loadavg()}")
    rows, owner_rows, curves = [], [], {}
    with tempfile.TemporaryDirectory(prefix="fedsplit-bench-quality-") as tmp:
        work = Path(tmp)
        for label, plan, owned in plans_to_train(args, work):
            started = time.monotonic()
            central = held_out_ppl(run_baseline(plan, work / "runs"))
            base_s = time.monotonic() - started
            curves[label] = {"centralised": central}
            control_mb = control_plane_mb_per_round(plan)
            runs: dict[str, Path] = {}
            for mode in args.modes:
                base = owned if mode == "owned" else plan
                if base is None:
                    continue  # --plan: no generated owners to give experts to
                trained = base.with_settings(aggregation=aggregation_for(mode, base.aggregation, args))
                started = time.monotonic()
                run_dir = runs[mode] = simulate(trained, SimulationOptions(runs_root=work / "runs", insecure=True))
                fed_s = time.monotonic() - started
                federated = held_out_ppl(run_dir)
                last = max(federated)
                curves[label][f"federated, {mode}"] = federated
                rows.append(
                    [
                        label,
                        MODE_LABELS[mode],
                        f"{federated[0]:.2f}",
                        f"{federated[last]:.2f}",
                        f"{central[last]:.2f}",
                        f"{100 * (federated[last] / central[last] - 1):+.1f}%",
                        f"{data_plane_mb_per_round(run_dir):.1f}",
                        f"{control_mb:.1f}",
                        f"{fed_s:.0f}",
                        f"{base_s:.0f}",
                    ]
                )
                print(f"  {label}, {mode}: federated {fed_s:.0f} s, centralised {base_s:.0f} s", flush=True)
            if "owned" in runs:
                owner_rows += owned_expert_rows(label, owned, runs["owned"], runs.get("fedavg"))
    t = plan.training
    setting = (
        f"{len(plan.orgs)} organisations, {len(plan.data_owners)} data owners, AdamW lr {t.optimizer.lr:g}, "
        f"{t.rounds} rounds x {t.steps_per_round} steps; DiLoCo outer lr {args.outer_lr:g}, momentum "
        f"{args.outer_momentum:g}, Nesterov"
    )
    print(f"\n## Held-out perplexity, split-federated vs centralised ({setting})\n")
    print(
        "\n".join(
            table(
                [
                    "split",
                    "replicas",
                    "initial",
                    "federated",
                    "centralised",
                    "gap",
                    "data plane MB/round",
                    "Flower MB/round",
                    "federated s",
                    "centralised s",
                ],
                rows,
            )
        )
    )
    if owner_rows:
        owners = plan.data_owners
        print(
            "\n## Owned experts: each data owner's held-out perplexity on its own text, reassembled model "
            "(every expert it keeps, no owner's routing)\n"
        )
        header = ["split", "data owner", "FedAvg, all shared", "owned: every expert", "owned: its own + shared"]
        header.append("owned: shared only")
        print("\n".join(table(header + [f"owned: without {x}" for x in owners], owner_rows)))
    for label, c in curves.items():
        print(f"\n{label}, held-out perplexity by round:")
        for name, ppl in c.items():
            print(f"  {name:>22}: " + "  ".join(f"{r}: {ppl[r]:.2f}" for r in sorted(ppl)))
    print(f"\nload after: {loadavg()}")
    print(json.dumps({"rows": rows, "owned_experts": owner_rows}))


if __name__ == "__main__":
    main()
