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
   step in fp32, bf16-mixed and bf16-mixed with activation checkpointing, and LoRA (r=8 on every
   attention projection and expert, frozen bf16 base) with and without checkpointing, one worker
   process per organisation. Per organisation: its RSS once it held its weights, what its peak RSS
   grew by during the step (VmHWM, reset through clear_refs once the weights were in, after the
   step), the training state that growth holds for sure (fp32 gradients and AdamW moments of what
   trains), and the rest: activations and working memory. Then the bytes the coordinator's Flower
   messages carry per round, full training vs LoRA.
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
transport: {{timeout_s: 1800, step_timeout_s: 1800}}
{finetune}
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
    from fedsplit.model import parameter_shapes
    from fedsplit.plan import load_plan
    from fedsplit.runtime import initial_weights, synthetic_batches

    seq = 128 if args.quick else 512
    fields = {"model": REPO / "configs/models/base.yaml", "seq": seq, "data": REPO / "data/tinyshakespeare.txt"}
    (work / "memory.yaml").write_text(MEMORY_PLAN.format(**fields, finetune=""))
    (work / "lora.yaml").write_text(MEMORY_PLAN.format(**fields, finetune=LORA))
    base, lora = load_plan(work / "memory.yaml"), load_plan(work / "lora.yaml")
    weights = initial_weights(lora)  # the base's, plus the adapters' (which the full plans ignore)
    variants = {
        "fp32": base,
        "bf16-mixed": base.with_training(precision="bf16-mixed"),
        "bf16-mixed + checkpointing": base.with_training(precision="bf16-mixed", activation_checkpointing=True),
        "LoRA r=8, bf16-mixed": lora.with_training(precision="bf16-mixed"),
        "LoRA r=8, bf16-mixed + checkpointing": lora.with_training(
            precision="bf16-mixed", activation_checkpointing=True
        ),
    }
    rows, rest, per_param = [], {}, []
    fixed = idle_worker_rss()
    for label, plan in variants.items():
        mine = {k: v for k, v in weights.items() if k in parameter_shapes(plan.model)}
        with ProcessFederation(plan, mine, insecure=True, timeout=3600) as fed:
            pids = {org: fed.hosts.procs[fed.hosts.group_of[org]].pid for org in plan.orgs}
            ready = {org: _status(pid, "VmRSS") for org, pid in pids.items()}
            for pid in pids.values():  # the peak from here on, not the weights' loading
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            fed.train_step(0, synthetic_batches(plan, 0))
            peak = {org: _status(pid, "VmHWM") for org, pid in pids.items()}
        for org in plan.orgs:
            params, trained = plan.parameter_count(org), plan.trained_parameter_count(org)
            state = trained * 12  # fp32 gradients and AdamW's two moments (bf16-mixed: of the fp32 masters)
            grown = peak[org] - ready[org]
            rest[(label, org)] = grown - state
            if plan.frozen:
                # What a LoRA organisation's peak costs per frozen base parameter it holds, once the
                # fixed cost of a worker process and the adapters' own state are taken off: the
                # base in bf16 is 2 bytes; the rest is activations.
                adapters = trained * (4 + 2 + 12)  # fp32 master, bf16 compute copy, grads + AdamW
                per_param.append(
                    [
                        label,
                        org,
                        f"{params - trained:,}",
                        f"{(ready[org] + grown - fixed - adapters) / (params - trained):.2f}",
                    ]
                )
            rows.append(
                [
                    label,
                    org,
                    f"{params:,}",
                    f"{trained:,}",
                    f"{ready[org] / 2**20:,.0f}",
                    f"{grown / 2**20:,.0f}",
                    f"{state / 2**20:,.0f}",
                    f"{(grown - state) / 2**20:,.0f}",
                ]
            )
    cols = [
        "variant",
        "organisation",
        "parameters",
        "trained",
        "RSS holding its weights MiB",
        "peak growth in the step MiB",
        "grads + AdamW MiB",
        "activations and rest MiB",
    ]
    cut = rest[("bf16-mixed", "data-owner")] / max(rest[("bf16-mixed + checkpointing", "data-owner")], 1)
    flower = {label: control_plane_bytes(plan, weights) for label, plan in (("full", base), ("LoRA r=8", lora))}
    return [
        f"## Memory (base model, batch 8 x {seq}, one step, one process per organisation)",
        *table(cols, rows),
        f"data owner's activations and rest, bf16-mixed / bf16-mixed + checkpointing: {cut:.1f}x",
        "",
        f"## LoRA: peak bytes per held base parameter (peak RSS less an idle worker's {fixed / 2**20:,.0f} MiB "
        "and the adapters' state)",
        *table(["variant", "organisation", "frozen parameters", "bytes / parameter"], per_param),
        "",
        "## Flower bytes per round (weights out to every organisation and back, fp32)",
        *table(
            ["training", "bytes per round", "full / this"],
            [[k, f"{v:,}", f"{flower['full'] / v:.1f}x"] for k, v in flower.items()],
        ),
    ]


LORA = "finetune: {rank: 8, alpha: 16, targets: [q_proj, k_proj, v_proj, o_proj, experts, shared_experts]}"


def idle_worker_rss() -> int:
    """RSS of a process that has imported what a worker imports and holds no weights: the fixed
    cost of an organisation's worker process."""
    import subprocess

    probe = "import torch, fedsplit.hosting.host; print(open('/proc/self/status').read())"
    status = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) << 10


def control_plane_bytes(plan, weights) -> int:
    """What the coordinator sends each organisation at a round's start and gets back at its end:
    the tensors of its partitions that train (``ServerApp._weights_of``), twice."""
    from fedsplit.plan import select

    sent = [select(weights, plan.slices_of(org, trained_only=True)) for org in plan.orgs]
    return 2 * sum(t.numel() * t.element_size() for state in sent for t in state.values())


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
