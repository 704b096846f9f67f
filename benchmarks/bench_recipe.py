#!/usr/bin/env python
"""The training recipe's costs, measured side by side in one run.

    .venv/bin/python benchmarks/bench_recipe.py [--quick] [--only simulation precision memory]

1. **simulation**: the ``small`` model on the benchmark plans (``benchmarks/plans/``: two layer
   stages; experts on two hosts; head groups on two hosts), tokens/s of three ways to train
   the same steps: the monolithic model in this process; every organisation in *one* worker
   process calling each other in memory (what ``fedsplit simulate`` runs); one worker process
   per organisation over the gRPC data plane on loopback. Every process computes with one
   intra-op thread. Trials are interleaved (mono, in memory, gRPC for each plan, in an order
   rotated per trial); ratios are per trial, then median (min-max).
2. **precision**: the monolithic ``small`` model, fp32 vs bf16-mixed tokens/s (1 thread and this
   process's default threads), interleaved the same way.
3. **memory**: the ``base`` model (~150M parameters, 32k vocabulary), a data owner holding both
   ends and layer 0, a compute organisation layers 1-7, batch 8 x 512 in one micro-batch, one
   step in fp32, bf16-mixed and bf16-mixed with activation checkpointing, one worker process per
   organisation. Per organisation: what its peak RSS grew by during the step (VmHWM after the
   step less VmRSS once it held its weights), the training state that growth holds for sure
   (fp32 gradients and AdamW moments), and the rest: activations and working memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # keep gRPC's informational lines off the tables

import torch  # noqa: E402
from report import REPO, fmt_stats, loadavg, provenance, table  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PLANS = REPO / "benchmarks" / "plans"
SIMULATED = ["layers-2stage", "experts", "heads"]


def tokens(plan) -> int:
    t = plan.training
    return t.batch_size * t.seq_len * len(plan.data_owners)


def timed(step, steps: int, first: int) -> float:
    start = time.perf_counter()
    for s in range(first, first + steps):
        step(s)
    return time.perf_counter() - start


def simulation(args) -> list[str]:
    from fedsplit.hosting.processes import ProcessFederation
    from fedsplit.plan import load_plan
    from fedsplit.runtime import MonolithicTrainer, initial_weights, synthetic_batches

    torch.set_num_threads(1)
    runs, feds = {}, []
    for name in SIMULATED:
        plan = load_plan(PLANS / name / "federation.yaml")
        w = initial_weights(plan)
        together = ProcessFederation(plan, w, insecure=True, groups=[list(plan.orgs)])
        apart = ProcessFederation(plan, w, insecure=True)
        feds += [together, apart]
        mono = MonolithicTrainer(plan, w)
        runs[name] = {
            "mono": lambda s, m=mono, p=plan: m.train_step(s, synthetic_batches(p, s)),
            "in memory": lambda s, f=together, p=plan: f.train_step(s, synthetic_batches(p, s)),
            "gRPC": lambda s, f=apart, p=plan: f.train_step(s, synthetic_batches(p, s)),
        }
    try:
        step = 0
        for kinds in runs.values():
            for run in kinds.values():
                timed(run, args.warmup, step)
        step += args.warmup
        seconds = {(n, k): [] for n in runs for k in runs[n]}
        for trial in range(args.trials):
            order = SIMULATED[trial % len(SIMULATED) :] + SIMULATED[: trial % len(SIMULATED)]
            for name in order:
                for kind, run in runs[name].items():
                    seconds[(name, kind)].append(timed(run, args.steps, step))
            step += args.steps
    finally:
        for f in feds:
            f.close()
    rows = []
    for name in SIMULATED:
        plan = load_plan(PLANS / name / "federation.yaml")
        per = tokens(plan) * args.steps
        mono = seconds[(name, "mono")]
        rows.append(
            [
                name,
                fmt_stats([per / s for s in mono], 0),
                fmt_stats([per / s for s in seconds[(name, "in memory")]], 0),
                fmt_stats([m / s for m, s in zip(mono, seconds[(name, "in memory")])]),
                fmt_stats([per / s for s in seconds[(name, "gRPC")]], 0),
                fmt_stats([m / s for m, s in zip(mono, seconds[(name, "gRPC")])]),
            ]
        )
    cols = ["plan", "mono tok/s", "in memory tok/s", "in memory / mono", "gRPC tok/s", "gRPC / mono"]
    return [f"## Simulation ({args.trials} trials of {args.steps} steps, 1 thread per process)", *table(cols, rows)]


def precision(args) -> list[str]:
    from fedsplit.plan import load_plan
    from fedsplit.runtime import MonolithicTrainer, initial_weights, synthetic_batches

    default_threads = torch.get_num_threads()
    plan = load_plan(PLANS / "layers-2stage" / "federation.yaml")
    w = initial_weights(plan)
    trainers = {p: MonolithicTrainer(plan.with_training(precision=p), w) for p in ("fp32", "bf16-mixed")}
    seconds = {(p, n): [] for p in trainers for n in (1, default_threads)}
    step = 0
    for trial in range(args.trials + 1):
        for threads in (1, default_threads):
            torch.set_num_threads(threads)
            for p in sorted(trainers, reverse=bool(trial % 2)):
                took = timed(lambda s, p=p: trainers[p].train_step(s, synthetic_batches(plan, s)), args.steps, step)
                if trial:  # the first is warm-up
                    seconds[(p, threads)].append(took)
        step += args.steps
    torch.set_num_threads(default_threads)
    per = tokens(plan) * args.steps
    rows = [
        [
            f"{n} thread(s)",
            fmt_stats([per / s for s in seconds[("fp32", n)]], 0),
            fmt_stats([per / s for s in seconds[("bf16-mixed", n)]], 0),
            fmt_stats([f / b for f, b in zip(seconds[("fp32", n)], seconds[("bf16-mixed", n)])]),
        ]
        for n in sorted({1, default_threads})
    ]
    cols = ["monolith, small model", "fp32 tok/s", "bf16-mixed tok/s", "bf16 / fp32"]
    return [f"## Precision ({args.trials} trials of {args.steps} steps)", *table(cols, rows)]


MEMORY_PLAN = """name: bench-memory
model: {model}
training: {{rounds: 1, steps_per_round: 1, batch_size: 8, seq_len: {seq}, micro_batches: 1, eval_tokens: 0,
           optimizer: {{name: adamw, lr: 3.0e-4}}, seed: 0}}
orgs:
  - {{org: data-owner, data: {{train: {data}}}, holds: [embed, layers.0, final_norm, lm_head]}}
  - {{org: compute, holds: [layers.1-7]}}
"""


def _status(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) << 10
    raise KeyError(field)


def memory(args, work: Path) -> list[str]:
    from fedsplit.hosting.processes import ProcessFederation
    from fedsplit.plan import load_plan
    from fedsplit.runtime import initial_weights, synthetic_batches

    seq = 128 if args.quick else 512
    (work / "memory.yaml").write_text(
        MEMORY_PLAN.format(model=REPO / "configs/models/base.yaml", seq=seq, data=REPO / "data/tinyshakespeare.txt")
    )
    base = load_plan(work / "memory.yaml")
    weights = initial_weights(base)
    variants = {
        "fp32": {},
        "bf16-mixed": {"precision": "bf16-mixed"},
        "bf16-mixed + checkpointing": {"precision": "bf16-mixed", "activation_checkpointing": True},
    }
    rows, rest = [], {}
    for label, change in variants.items():
        plan = base.with_training(**change)
        with ProcessFederation(plan, weights, insecure=True, timeout=3600) as fed:
            pids = {org: fed.hosts.procs[fed.hosts.group_of[org]].pid for org in plan.orgs}
            ready = {org: _status(pid, "VmRSS") for org, pid in pids.items()}
            fed.train_step(0, synthetic_batches(plan, 0))
            peak = {org: _status(pid, "VmHWM") for org, pid in pids.items()}
        for org in plan.orgs:
            params = plan.parameter_count(org)
            state = params * 12  # fp32 gradients and AdamW's two moments (bf16-mixed: of the fp32 masters)
            grown = peak[org] - ready[org]
            rest[(label, org)] = grown - state
            rows.append(
                [
                    label,
                    org,
                    f"{params:,}",
                    f"{grown / 2**20:,.0f}",
                    f"{state / 2**20:,.0f}",
                    f"{(grown - state) / 2**20:,.0f}",
                ]
            )
    cols = ["variant", "organisation", "parameters", "peak growth MiB", "grads + AdamW MiB", "activations and rest MiB"]
    cut = rest[("bf16-mixed", "data-owner")] / max(rest[("bf16-mixed + checkpointing", "data-owner")], 1)
    return [
        f"## Memory (base model, batch 8 x {seq}, one step, one process per organisation)",
        *table(cols, rows),
        f"data owner's activations and rest, bf16-mixed / bf16-mixed + checkpointing: {cut:.1f}x",
    ]


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials, shorter sequences (a few minutes)")
    parser.add_argument("--only", nargs="+", choices=["simulation", "precision", "memory"])
    parser.add_argument("--trials", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    args.trials = args.trials or (2 if args.quick else 5)
    args.steps = args.steps or (2 if args.quick else 4)
    lines = ["# bench_recipe", *provenance(), f"load average at start: {loadavg()}"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        for name in args.only or ["simulation", "precision", "memory"]:
            section = {"simulation": simulation, "precision": precision}.get(name)
            lines += ["", *(section(args) if section else memory(args, Path(work)))]
            print("\n".join(lines), flush=True)
            lines = []
    print(f"\nload average at end: {loadavg()}; {time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    main()
