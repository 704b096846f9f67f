#!/usr/bin/env python
"""The router kinds side by side: what each costs in a split run, and what it learns.

    .venv/bin/python benchmarks/bench_routers.py [--quick] [--trials 5] [--steps 3] [--quality-steps 150]

Each kind is the ``small`` model (8 experts, shared expert) with its router replaced: ``topk``
(top-2, today's default), ``topk`` with ``capacity_factor: 1.0``, ``soft`` (every expert),
``hard`` (one expert, Gumbel-softmax at temperature 1) and ``hierarchical`` (4 groups of 2, top-2
groups, top-1 inside: also 2 experts per token).

1. **speed**: the expert plan of ``benchmarks/plans/experts`` (the data owner runs every layer,
   experts 0-3 and 4-7 on two other organisations), every organisation in this process calling
   each other in memory (what ``fedsplit simulate`` runs), against the monolithic model in the
   same process and thread count. Trials interleave the kinds (mono then split for each, in an
   order rotated per trial); tokens/s and split/mono ratios per trial, then median (min-max).
   Bytes per step: the data-plane bytes the organisations' calls to each other carry (what
   would cross the network between them), read before and after a trial.
2. **quality**: the monolithic model of each kind (split training computes the same, see
   ``tests/unit/test_router_kinds.py``) trained the same steps on the same batches of the data
   owner's shipped corpus (tinyshakespeare, AdamW lr 1e-3, 20 warmup steps then cosine), then
   its held-out perplexity (32,768 tokens of held-out text, routed as in evaluation:
   the hard router's argmax, capacity still applied).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from report import REPO, fmt_int_stats, fmt_stats, loadavg, provenance, table

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedsplit.federation.baseline import held_out_loss  # noqa: E402
from fedsplit.plan import Plan, load_plan  # noqa: E402
from fedsplit.runtime import InProcessFederation, MonolithicTrainer, initial_weights, synthetic_batches  # noqa: E402
from fedsplit.runtime.batches import batches_for, eval_batches_for  # noqa: E402

PLAN = REPO / "benchmarks" / "plans" / "experts"
EVAL_TOKENS = 32_768  # held-out tokens per evaluation
KINDS = {
    "topk (top-2)": {},
    "topk, capacity 1.0": {"router": {"kind": "topk", "capacity_factor": 1.0}},
    "soft": {"top_k": 8, "router": {"kind": "soft"}},
    "hard": {"top_k": 1, "router": {"kind": "hard"}},
    "hierarchical (2 of 4 groups, top-1)": {
        "top_k": 1,
        "router": {"kind": "hierarchical", "groups": 4, "group_top_k": 2},
    },
}


def plan_of(kind: str, directory: Path, training: dict | None = None) -> Plan:
    """The benchmark's expert plan with the ``small`` model's router replaced by ``kind``'s."""
    out = directory / kind.split()[0].strip(",")
    out.mkdir(exist_ok=True)
    model = yaml.safe_load((REPO / "configs" / "models" / "small.yaml").read_text()) | KINDS[kind]
    (out / "model.yaml").write_text(yaml.safe_dump(model))
    fed = yaml.safe_load((PLAN / "federation.yaml").read_text())
    fed.update(model=str(out / "model.yaml"), orgs=[str(PLAN / "orgs" / "*.yaml")])
    fed["training"].update(training or {})
    (out / "federation.yaml").write_text(yaml.safe_dump(fed))
    return load_plan(out / "federation.yaml")


def bytes_moved(fed: InProcessFederation) -> int:
    return sum(t.sent + t.received for t in (w.traffic() for w in fed.workers.values()))


def speed(trials: int, steps: int, warmup: int, work: Path) -> list[str]:
    plans = {kind: plan_of(kind, work) for kind in KINDS}
    runs = {}
    for kind, plan in plans.items():
        weights = initial_weights(plan)
        runs[kind] = (plan, MonolithicTrainer(plan, weights), InProcessFederation(plan, weights))
    tokens_per_step = {k: p.training.batch_size * p.training.seq_len * len(p.data_owners) for k, p in plans.items()}
    mono_tps, split_tps, ratios, moved = ({k: [] for k in KINDS} for _ in range(4))
    step = 0
    for plan, mono, split in runs.values():
        for _ in range(warmup):
            batches = synthetic_batches(plan, step)
            mono.train_step(step, batches)
            split.train_step(step, batches)
            step += 1
    order = list(KINDS)
    for trial in range(trials):
        for kind in order[trial % len(order) :] + order[: trial % len(order)]:
            plan, mono, split = runs[kind]
            batches = [synthetic_batches(plan, step + s) for s in range(steps)]
            start = time.perf_counter()
            for s, b in enumerate(batches):
                mono.train_step(step + s, b)
            mono_tps[kind].append(steps * tokens_per_step[kind] / (time.perf_counter() - start))
            before = bytes_moved(split)
            start = time.perf_counter()
            for s, b in enumerate(batches):
                split.train_step(step + s, b)
            split_tps[kind].append(steps * tokens_per_step[kind] / (time.perf_counter() - start))
            moved[kind].append((bytes_moved(split) - before) / steps)
            ratios[kind].append(split_tps[kind][-1] / mono_tps[kind][-1])
            step += steps
    for _, _, split in runs.values():
        split.close()
    rows = [
        [
            kind,
            fmt_int_stats(mono_tps[kind]),
            fmt_int_stats(split_tps[kind]),
            fmt_stats(ratios[kind]),
            f"{sum(moved[kind]) / len(moved[kind]) / 2**20:,.2f}",
            f"{sum(moved[kind]) / len(moved[kind]) / sum(moved['topk (top-2)']) * len(moved['topk (top-2)']):.2f}x",
        ]
        for kind in KINDS
    ]
    return [
        f"## Speed: expert plan, small model, batch 8 x 128, 4 micro-batches, in one process "
        f"({torch.get_num_threads()} threads), {trials} trials x {steps} steps",
        *table(["router", "monolith tok/s", "split tok/s", "split / monolith", "MiB per step", "bytes vs top-k"], rows),
    ]


def quality(steps: int, work: Path) -> list[str]:
    schedule = {"warmup_steps": min(20, steps // 4), "decay": "cosine", "min_lr_ratio": 0.1}
    training = {
        "optimizer": {"name": "adamw", "lr": 1.0e-3, "schedule": schedule},
        "steps_per_round": steps,
        "eval_tokens": EVAL_TOKENS,
    }
    rows = []
    for kind in KINDS:
        plan = plan_of(kind, work, training)
        owner = plan.data_owners[0]
        torch.manual_seed(0)
        trainer = MonolithicTrainer(plan, initial_weights(plan))
        train = batches_for(plan, owner)
        start = time.perf_counter()
        for step in range(steps):
            trainer.train_step(step, {owner: train(step)})
        seconds = time.perf_counter() - start
        loss, tokens = held_out_loss(trainer, eval_batches_for(plan, owner), owner)
        rows.append([kind, f"{math.exp(loss):.2f}", f"{tokens:,.0f}", f"{seconds:.0f}"])
    return [
        f"## Held-out perplexity after {steps} steps (monolith, tinyshakespeare, batch 8 x 128, same batches)",
        *table(["router", "held-out ppl", "held-out tokens", "training seconds"], rows),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials and steps (a few minutes)")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per trial")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quality-steps", type=int)
    parser.add_argument("--only", nargs="+", choices=["speed", "quality"], default=["speed", "quality"])
    args = parser.parse_args()
    trials = args.trials or (2 if args.quick else 5)
    quality_steps = args.quality_steps or (30 if args.quick else 150)
    print("\n".join(provenance()))
    print(f"load before: {loadavg()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        if "speed" in args.only:
            print("\n".join(speed(trials, args.steps, args.warmup, Path(tmp))) + "\n", flush=True)
        if "quality" in args.only:
            print("\n".join(quality(quality_steps, Path(tmp))) + "\n", flush=True)
    print(f"load after: {loadavg()}")


if __name__ == "__main__":
    main()
