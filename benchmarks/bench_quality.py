#!/usr/bin/env python
"""Does split-federated training learn as well as centralised training on the same token budget?

    .venv/bin/python benchmarks/bench_quality.py [--quick] [--splits iid domain dirichlet] [--alpha 0.5]
                                                 [--orgs 6] [--data-owners 3] [--rounds 4] [--steps 30]
                                                 [--modes fedavg diloco step]
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
centralised training up to rounding).
Printed: held-out perplexity per round (overall, token-weighted over the data owners), the gap
of the last round, federated / centralised - 1, and what a round moves: data-plane bytes (every
call's request and reply, gradient exchanges of replicas kept in step included, measured) and
control-plane bytes (each organisation's trained weights to it and back through Flower, from
their sizes). Modes set the strategy: ``--plan`` keeps the rest of its aggregation settings.
"""

from __future__ import annotations

import argparse
import json
import os
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

from fedsplit.data.corpus_split import split_corpora  # noqa: E402
from fedsplit.federation.baseline import run_baseline  # noqa: E402
from fedsplit.federation.rundir import MetricsLog  # noqa: E402
from fedsplit.federation.simulate import SimulationOptions, simulate  # noqa: E402
from fedsplit.plan import Plan, load_plan, select  # noqa: E402
from fedsplit.plan.schema import AggregationConfig, OptimizerConfig  # noqa: E402
from fedsplit.plan.templates import data_owner_names, generate_plan  # noqa: E402
from fedsplit.runtime import initial_weights  # noqa: E402


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


def aggregation_for(mode: str, base: AggregationConfig, args: argparse.Namespace) -> AggregationConfig:
    """The plan's aggregation settings with the replicas synchronised as ``mode`` says."""
    update: dict = {"strategy": "fedavg", "replica_sync": "step" if mode == "step" else "round"}
    if mode == "diloco":
        update.update(strategy="diloco", outer_lr=args.outer_lr, outer_momentum=args.outer_momentum)
    return AggregationConfig.model_validate({**base.model_dump(), **update})


MODE_LABELS = {"fedavg": "FedAvg after each round", "diloco": "DiLoCo after each round", "step": "kept in step"}


def plans_to_train(args: argparse.Namespace, work: Path) -> Iterator[tuple[str, Plan]]:
    """(label, plan): the plan given with ``--plan`` as it is, else one generated plan per split."""
    if args.plan:
        plan = load_plan(args.plan)
        yield f"plan {plan.name}", plan
        return
    for by in args.splits:
        split = split_corpora(data_owner_names(args.data_owners), by, alpha=args.alpha, seed=args.seed)
        plan = load_plan(
            generate_plan(
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
        )
        plan = plan.with_settings(
            training=plan.training.model_copy(
                update={"micro_batches": 2, "eval_tokens": 4096, "optimizer": OptimizerConfig(name="adamw", lr=args.lr)}
            )
        )
        yield (f"dirichlet(alpha={args.alpha:g})" if by == "dirichlet" else by), plan


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
    rows, curves = [], {}
    with tempfile.TemporaryDirectory(prefix="fedsplit-bench-quality-") as tmp:
        work = Path(tmp)
        for label, plan in plans_to_train(args, work):
            started = time.monotonic()
            central = held_out_ppl(run_baseline(plan, work / "runs"))
            base_s = time.monotonic() - started
            curves[label] = {"centralised": central}
            control_mb = control_plane_mb_per_round(plan)
            for mode in args.modes:
                trained = plan.with_settings(aggregation=aggregation_for(mode, plan.aggregation, args))
                started = time.monotonic()
                run_dir = simulate(trained, SimulationOptions(runs_root=work / "runs", insecure=True))
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
    for label, c in curves.items():
        print(f"\n{label}, held-out perplexity by round:")
        for name, ppl in c.items():
            print(f"  {name:>22}: " + "  ".join(f"{r}: {ppl[r]:.2f}" for r in sorted(ppl)))
    print(f"\nload after: {loadavg()}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
