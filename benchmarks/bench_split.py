#!/usr/bin/env python
"""Split training over gRPC vs the monolithic model: tokens per second, side by side.

    .venv/bin/python benchmarks/bench_split.py [--quick] [--trials 7] [--steps 4] [--warmup 2]
                                               [--variants layers-2stage heads ...]

Every *variant* (a plan in ``benchmarks/plans/`` plus in-memory overrides, e.g. another
schedule) is a :class:`Variant` in ``VARIANTS``. For each one this process starts a
:class:`~fedsplit.hosting.processes.ProcessFederation`: one worker process per organisation on
loopback, mutual TLS and bearer tokens on (fresh throw-away credentials), every activation and
gradient over the gRPC data plane. All federations are started first and stay up for the whole
run; the idle ones only wait on their sockets.

Next to each federation runs a :class:`~fedsplit.runtime.MonolithicTrainer` in this process,
from the same initial weights, trained on the same synthetic batches with the same step
numbers, so both compute the same thing (the table shows the largest loss difference seen).

* Worker processes compute with 1 intra-op thread (``WORKER_THREADS``), so the monolithic
  reference that each split trial is paired with runs with ``torch.set_num_threads(1)`` too.
* A second reference, the monolithic model with the default thread count of this process
  (``torch.get_num_threads()`` at start: normally one per core), runs once per trial, so that
  readers also see what one process using every core does. On a machine that other work keeps
  busy this reference collapses (its OpenMP threads wait for each other at every operator; on
  the 2-core project machine at load 4-6 it measured 10-20x slower than 1 thread), so the
  output flags it when it is far slower or burns far more CPU than the 1-thread reference, and
  ``--no-default-threads`` leaves it out. So that such a collapse cannot stretch the run without
  bound, a trial of this reference stops after the step that passes 3x the time the 1-thread
  reference took for a trial's steps during warm-up (at least one step; tokens/s counts the
  steps it ran), and after two trials in a row below 1/3 of the 1-thread speed it is no longer
  measured (the table says how many trials it has; ratios pair the trials it has).

Trials are interleaved: in each trial the mono (default threads) reference runs once, then for
every variant (in an order rotated from trial to trial) its mono (1 thread) trial and directly
after it its split trial. A trial of either is ``--steps`` training steps on fresh batches, after
``--warmup`` steps per variant that are not timed. Tokens/s = tokens per step (batch_size x
seq_len x data owners) x steps / wall time of the steps; reported as median (min-max) over
trials, and split/mono ratios are computed per trial pair, then summarised the same way.

Bytes: ``ProcessFederation.traffic()`` (data-plane frames sent and received by the callers
between organisations: tensor payload plus fedsplit's frame headers; control calls from this
process, HTTP/2 framing and TLS records are not counted) read before and after each split
trial, outside the timed region. ``wire/tensor`` = those bytes / the bytes of the tensors they
carry (target <= 1.02 uncompressed).

CPU: user+system CPU seconds per step of every process involved (workers from /proc/PID/stat,
this process from ``time.process_time``), next to the monolithic (1 thread) process's. Less
sensitive to a busy machine than wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # keep gRPC's informational lines off the table

import torch  # noqa: E402
from report import fmt_int_stats, fmt_stats, loadavg, proc_cpu, provenance, table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PLANS = Path(__file__).resolve().parent / "plans"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_THREADS = torch.get_num_threads()  # before anything sets it

# --------------------------------------------------------------------------------------------
# Registry of variants
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    plan: str  # directory under benchmarks/plans/
    training: dict = field(default_factory=dict)  # TrainingConfig overrides
    transport: dict = field(default_factory=dict)  # TransportConfig overrides
    insecure: bool = False
    description: str = ""


VARIANTS: dict[str, Variant] = {}


def register(v: Variant) -> Variant:
    VARIANTS[v.name] = v
    return v


register(
    Variant(
        "layers-2stage",
        "layers-2stage",
        {"schedule": "1f1b"},
        description="data owner: embed, layers 0-1, head; compute-b: layers 2-3 (1f1b)",
    )
)
register(
    Variant(
        "layers-4stage",
        "layers-4stage",
        {"schedule": "1f1b"},
        description="data owner: embed, layer 0, head; compute-b/c/d: layers 1, 2, 3 (1f1b)",
    )
)
register(
    Variant(
        "experts",
        "experts",
        {"schedule": "1f1b"},
        description="data owner: all but routed experts; experts 0-3 and 4-7 of every layer on two orgs",
    )
)
register(
    Variant(
        "heads",
        "heads",
        {"schedule": "1f1b"},
        description="data owner: all but attention heads; heads 0-3 and 4-7 of every layer on two orgs",
    )
)
register(
    Variant(
        "layers-2stage/sequential",
        "layers-2stage",
        {"schedule": "sequential"},
        description="layers-2stage, micro-batches one after another",
    )
)
register(
    Variant(
        "layers-2stage/gpipe",
        "layers-2stage",
        {"schedule": "gpipe"},
        description="layers-2stage, every forward in flight, then the backwards",
    )
)
# Not in the default set (run them with e.g. --variants layers-2stage layers-2stage/plaintext):
register(
    Variant(
        "layers-2stage/plaintext",
        "layers-2stage",
        {"schedule": "1f1b"},
        insecure=True,
        description="layers-2stage without TLS and tokens (shows the cost of TLS)",
    )
)
register(
    Variant(
        "layers-2stage/shm",
        "layers-2stage",
        {"schedule": "1f1b"},
        {"shared_memory": True},
        description="layers-2stage, tensors through /dev/shm segments (same host)",
    )
)
register(
    Variant(
        "layers-2stage/bf16",
        "layers-2stage",
        {"schedule": "1f1b"},
        {"compression": {"activations": "bf16", "gradients": "bf16"}},
        description="layers-2stage, bf16 activations and gradients on the wire (lossy)",
    )
)
DEFAULT_VARIANTS = [
    "layers-2stage",
    "layers-4stage",
    "experts",
    "heads",
    "layers-2stage/sequential",
    "layers-2stage/gpipe",
]
SCHEDULES = {"sequential": "layers-2stage/sequential", "gpipe": "layers-2stage/gpipe", "1f1b": "layers-2stage"}


def load_variant_plan(v: Variant):
    from fedsplit.plan import load_plan
    from fedsplit.plan.schema import TransportConfig

    plan = load_plan(PLANS / v.plan / "federation.yaml")
    if v.training:
        plan = plan.with_settings(training=plan.training.model_copy(update=v.training))
    if v.transport:  # validate nested dicts (compression) into their models
        plan = plan.with_settings(
            transport=TransportConfig.model_validate({**plan.transport.model_dump(), **v.transport})
        )
    return plan


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _load1() -> float:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


LOAD_SAMPLES: list[float] = []  # 1-minute load average, sampled at the start and after every trial


def _objective(plan, metrics: dict[str, dict[str, float]]) -> float:
    """The split run's step objective, comparable with MonolithicTrainer's ``loss``."""
    coef = plan.model.aux_loss_coef
    return sum(m["loss"] + coef * m["aux_loss"] for m in metrics.values()) / len(metrics)


class Mono:
    """A monolithic trainer with its own step counter, timed with a given thread count."""

    def __init__(self, plan, weights, threads: int):
        from fedsplit.runtime import MonolithicTrainer

        self.plan, self.threads = plan, threads
        self.trainer = MonolithicTrainer(plan, weights)
        self.step = 0

    def run(
        self, steps: int, batches: list | None = None, budget_s: float | None = None
    ) -> tuple[float, float, list[float]]:
        """Train ``steps`` steps, or fewer (at least one) once ``budget_s`` wall seconds have
        passed; (wall seconds, CPU seconds of this process, losses: one per step run)."""
        from fedsplit.runtime import synthetic_batches

        if batches is None:
            batches = [synthetic_batches(self.plan, self.step + i) for i in range(steps)]
        torch.set_num_threads(self.threads)
        try:
            losses = []
            cpu0, t0 = time.process_time(), time.perf_counter()
            for i in range(steps):
                losses.append(self.trainer.train_step(self.step + i, batches[i])["loss"])
                if budget_s is not None and time.perf_counter() - t0 > budget_s:
                    break
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            torch.set_num_threads(1)
        self.step += len(losses)
        return wall, cpu, losses


@dataclass
class Run:
    """One variant: its federation, its paired mono (1 thread) trainer, and what was measured."""

    variant: Variant
    plan: Any
    fed: Any
    mono: Mono
    tokens_per_step: int
    step: int = 0
    split_tps: list[float] = field(default_factory=list)
    mono_tps: list[float] = field(default_factory=list)
    split_cpu: list[float] = field(default_factory=list)  # CPU-s per step, all processes
    mono_cpu: list[float] = field(default_factory=list)
    wire_bytes: int = 0
    tensor_bytes: int = 0
    measured_steps: int = 0
    max_loss_diff: float = 0.0
    start_s: float = 0.0
    warm_mono_step_s: float = float("nan")  # mono (1 thread) wall seconds per step during warm-up

    def pids(self) -> list[int]:
        return [p.pid for p in self.fed.hosts.procs.values()]

    def trial(self, steps: int, timed: bool = True) -> None:
        """``steps`` mono (1 thread) steps, then the same steps split; records both if ``timed``."""
        from fedsplit.runtime import synthetic_batches

        batches = [synthetic_batches(self.plan, self.step + i) for i in range(steps)]
        assert self.mono.step == self.step
        m_wall, m_cpu, m_losses = self.mono.run(steps, batches)
        if not timed:
            self.warm_mono_step_s = m_wall / steps

        before = self.fed.traffic()
        pids = self.pids()
        w0 = [proc_cpu(p) for p in pids]
        cpu0, t0 = time.process_time(), time.perf_counter()
        s_losses = []
        for i in range(steps):
            s_losses.append(_objective(self.plan, self.fed.train_step(self.step + i, batches[i])))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0 + sum(proc_cpu(p) - c for p, c in zip(pids, w0))
        after = self.fed.traffic()
        self.step += steps

        diff = max(abs(a - b) for a, b in zip(s_losses, m_losses))
        if not all(math.isfinite(x) for x in s_losses):
            raise RuntimeError(f"{self.variant.name}: non-finite split loss {s_losses}")
        self.max_loss_diff = max(self.max_loss_diff, diff)
        if timed:
            self.split_tps.append(self.tokens_per_step * steps / wall)
            self.mono_tps.append(self.tokens_per_step * steps / m_wall)
            self.split_cpu.append(cpu / steps)
            self.mono_cpu.append(m_cpu / steps)
            self.wire_bytes += after["wire_bytes"] - before["wire_bytes"]
            self.tensor_bytes += after["tensor_bytes"] - before["tensor_bytes"]
            self.measured_steps += steps


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def header_lines(args) -> list[str]:
    return [
        *provenance("fedsplit"),
        f"threads: worker processes 1 (WORKER_THREADS); mono reference paired with each split trial 1 "
        f"(torch.set_num_threads(1)); second mono reference {DEFAULT_THREADS} (this process's default)",
        f"trials {args.trials}  steps/trial {args.steps}  warm-up steps {args.warmup}  TLS on (mutual TLS + tokens)"
        f"  variants {args.variants}",
        f"load average at start: {loadavg()}"
        + (
            f"; busy (load >= {os.cpu_count()} cpus): expect noisy wall-clock numbers"
            if _load1() >= (os.cpu_count() or 1)
            else ""
        ),
    ]


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="3 trials of 2 steps, 1 warm-up step (about 2 minutes on 2 cores)"
    )
    ap.add_argument("--trials", type=int, default=None, help="interleaved trials (default 7; --quick 3)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per trial (default 4; --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default 2; --quick 1)")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        choices=list(VARIANTS),
        help=f"default: {' '.join(DEFAULT_VARIANTS)}",
    )
    ap.add_argument(
        "--no-default-threads",
        action="store_true",
        help="leave out the mono reference with this process's default thread count",
    )
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default malloc settings in this process instead of the ones fedsplit's workers use",
    )
    args = ap.parse_args(argv)

    if not args.default_malloc and "GLIBC_TUNABLES" not in os.environ:
        # The mono reference runs with the malloc settings fedsplit's worker processes get.
        from fedsplit.hosting.processes import _worker_env

        os.execve(sys.executable, [sys.executable, *sys.argv], _worker_env())

    args.trials = args.trials or (3 if args.quick else 7)
    args.steps = args.steps or (2 if args.quick else 4)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    torch.set_num_threads(1)

    LOAD_SAMPLES.append(_load1())
    for line in header_lines(args):
        print(line)
    for name in args.variants:
        print(f"  {name}: {VARIANTS[name].description}")
    sys.stdout.flush()

    from fedsplit.hosting.host import WORKER_THREADS
    from fedsplit.hosting.processes import ProcessFederation
    from fedsplit.runtime import initial_weights

    assert WORKER_THREADS == 1, "this benchmark pairs workers with a 1-thread mono reference"
    t_start = time.perf_counter()
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        for name in args.variants:
            v = VARIANTS[name]
            plan = load_variant_plan(v)
            weights = initial_weights(plan)
            t0 = time.perf_counter()
            fed = stack.enter_context(ProcessFederation(plan, weights, insecure=v.insecure))
            t = plan.training
            run = Run(
                v,
                plan,
                fed,
                Mono(plan, weights, 1),
                t.batch_size * t.seq_len * len(plan.data_owners),
                start_s=time.perf_counter() - t0,
            )
            runs.append(run)
            print(f"  started {name}: {len(plan.orgs)} worker processes in {run.start_s:.1f} s, load {loadavg()}")
            sys.stdout.flush()
        ref_plan = runs[0].plan
        mono_default = None if args.no_default_threads else Mono(ref_plan, initial_weights(ref_plan), DEFAULT_THREADS)
        default_tps: list[float] = []
        default_cpu: list[float] = []
        default_steps: list[int] = []
        default_dropped = 0  # trial after which the default-threads reference was given up (0: never)

        t_warm = time.perf_counter()
        for run in runs:
            run.trial(args.warmup, timed=False)
        if mono_default:
            mono_default.run(1)  # one step: on a busy machine a step of it can take half a minute
        budget = 3 * args.steps * statistics.median(r.warm_mono_step_s for r in runs)
        print(
            f"  warm-up done in {time.perf_counter() - t_warm:.1f} s, load {loadavg()}"
            + (f"; mono {DEFAULT_THREADS} threads: at most {budget:.1f} s a trial" if mono_default else "")
        )
        sys.stdout.flush()

        tokens_per_step = runs[0].tokens_per_step
        for trial in range(args.trials):
            if mono_default and not default_dropped:
                wall, cpu, done = mono_default.run(args.steps, budget_s=budget)
                default_tps.append(tokens_per_step * len(done) / wall)
                default_cpu.append(cpu / len(done))
                default_steps.append(len(done))
                one_thread = [x for r in runs for x in r.mono_tps] or [
                    tokens_per_step / statistics.median(r.warm_mono_step_s for r in runs)
                ]
                if len(default_tps) >= 2 and max(default_tps[-2:]) < statistics.median(one_thread) / 3:
                    default_dropped = trial + 1
                    print(
                        f"  mono {DEFAULT_THREADS} threads below 1/3 of 1 thread in two trials in a row: "
                        f"not measured after trial {default_dropped}"
                    )
            k = trial % len(runs)
            for run in runs[k:] + runs[:k]:
                run.trial(args.steps)
            LOAD_SAMPLES.append(_load1())
            print(
                f"  trial {trial + 1}/{args.trials} done at {time.perf_counter() - t_start:.1f} s, load {loadavg()}"
                + (
                    f"; mono {DEFAULT_THREADS} threads {default_tps[-1]:,.0f} tokens/s over {default_steps[-1]} steps"
                    if default_tps and len(default_tps) == trial + 1
                    else ""
                )
            )
            sys.stdout.flush()
    elapsed = time.perf_counter() - t_start
    report(args, runs, default_tps, default_cpu, default_steps, elapsed)
    return 0


def report(
    args, runs: list[Run], default_tps: list[float], default_cpu: list[float], default_steps: list[int], elapsed: float
) -> None:
    by_name = {r.variant.name: r for r in runs}
    all_mono = [x for r in runs for x in r.mono_tps]
    all_mono_cpu = [x for r in runs for x in r.mono_cpu]
    plan0 = runs[0].plan
    t0 = plan0.training
    print()
    print(
        f"model {plan0.model_source.name}: batch {t0.batch_size} x seq "
        f"{t0.seq_len} = {runs[0].tokens_per_step} tokens/step, {t0.micro_batches} micro-batches, "
        f"{t0.optimizer.name} lr {t0.optimizer.lr:g}, fp32, CPU"
    )
    print()
    print("References (the monolithic model in this process):")
    refs = [
        [
            "mono, paired with each split trial (pooled)",
            "1",
            fmt_int_stats(all_mono),
            f"{statistics.median(all_mono_cpu):.2f}",
            str(len(all_mono)),
        ]
    ]
    if default_tps:
        cut = sum(1 for n in default_steps if n < args.steps)
        refs.append(
            [
                "mono, default threads",
                str(DEFAULT_THREADS),
                fmt_int_stats(default_tps),
                f"{statistics.median(default_cpu):.2f}",
                f"{len(default_tps)} of {args.trials}" + (f" ({cut} cut short by the time cap)" if cut else ""),
            ]
        )
    print(*table(["reference", "threads", "tokens/s median (min-max)", "CPU-s/step", "trials"], refs), sep="\n")
    # Collapsed: slower than 1 thread by a third, or more CPU per step than its threads x the 1-thread CPU.
    oversubscribed = bool(default_tps) and (
        statistics.median(default_tps) < 0.67 * statistics.median(all_mono)
        or statistics.median(default_cpu) > 1.5 * DEFAULT_THREADS * statistics.median(all_mono_cpu)
    )
    if oversubscribed:
        print(
            f"WARNING: mono with {DEFAULT_THREADS} threads: {statistics.median(default_cpu):.2f} CPU-s/step "
            f"(1 thread: {statistics.median(all_mono_cpu):.2f}) at {statistics.median(default_tps):,.0f} "
            "tokens/s: its threads"
        )
        print("wait for each other because other work holds the cores (see the load averages). Ratios against it say")
        print("more about the machine than about fedsplit.")
    print()
    print("Split over gRPC (TLS on), every organisation in its own process (1 thread each):")
    cols = [
        "variant",
        "procs",
        "split tokens/s",
        "mono 1t tokens/s",
        "split / mono 1t (paired)",
        f"split / mono {DEFAULT_THREADS}t",
        "CPU-s/step split / mono 1t",
        "MB/step on wire",
        "wire/tensor",
        "max |dloss|",
    ]
    rows = []
    for r in runs:
        ratio1 = [s / m for s, m in zip(r.split_tps, r.mono_tps)]
        ratiod = [s / m for s, m in zip(r.split_tps, default_tps)]  # empty without the reference
        cpu_ratio = [s / m for s, m in zip(r.split_cpu, r.mono_cpu)]
        wb = r.wire_bytes / r.measured_steps / 1e6 if r.measured_steps else float("nan")
        wt = r.wire_bytes / r.tensor_bytes if r.tensor_bytes else float("nan")
        rows.append(
            [
                r.variant.name,
                str(len(r.plan.orgs)),
                fmt_int_stats(r.split_tps),
                fmt_int_stats(r.mono_tps),
                fmt_stats(ratio1),
                fmt_stats(ratiod),
                (
                    f"{statistics.median(r.split_cpu):.2f} / {statistics.median(r.mono_cpu):.2f} = "
                    f"{statistics.median(cpu_ratio):.2f}x"
                ),
                f"{wb:.2f}",
                f"{wt:.4f}",
                f"{r.max_loss_diff:.1e}",
            ]
        )
    print(*table(cols, rows), sep="\n")

    sched = {s: by_name[v] for s, v in SCHEDULES.items() if v in by_name}
    if len(sched) > 1:
        print()
        print("Schedules, layers-2stage (4 micro-batches; the 1f1b row is the layers-2stage row above):")
        srows = []
        base = sched.get("sequential")
        for s, r in sched.items():
            vs_seq = (
                "1" if r is base else (fmt_stats([a / b for a, b in zip(r.split_tps, base.split_tps)]) if base else "-")
            )
            srows.append(
                [
                    s,
                    fmt_int_stats(r.split_tps),
                    fmt_stats([a / b for a, b in zip(r.split_tps, r.mono_tps)]),
                    fmt_stats([a / b for a, b in zip(r.split_tps, default_tps)]),
                    vs_seq,
                ]
            )
        print(
            *table(
                ["schedule", "split tokens/s", "x mono 1t (paired)", f"x mono {DEFAULT_THREADS}t", "x sequential"],
                srows,
            ),
            sep="\n",
        )

    uncompressed = [
        r
        for r in runs
        if r.plan.transport.compression.activations == "none"
        and r.plan.transport.compression.gradients == "none"
        and r.tensor_bytes
    ]
    worst = max((r.wire_bytes / r.tensor_bytes for r in uncompressed), default=float("nan"))
    print()
    print(
        f"wire/tensor, uncompressed variants: worst {worst:.4f} (target <= 1.02): "
        f"{'OK' if worst <= 1.02 else 'ABOVE TARGET'}"
    )
    print("Tokens/s: median (min-max) over interleaved trials; ratios per trial pair (split trial / the mono 1-thread")
    print(
        f"trial run just before it on the same batches; / the mono {DEFAULT_THREADS}-thread trial of the same round)."
    )
    print("MB/step = 1e6 B of data-plane frames (sent + received by callers, between organisations) per training")
    print("step; HTTP/2 and TLS framing not included. CPU-s/step: all worker processes + this one, user+system.")
    print("max |dloss|: largest difference between the split and the mono step objective seen (same batches).")
    print(
        f"total {elapsed:.1f} s; 1-minute load average over the run {fmt_stats(LOAD_SAMPLES)}, at end: {loadavg()} "
        f"({os.cpu_count()} cpus)"
    )

    print()
    print("---- summary (paste into README) ----")
    print(
        f"`{shlex.join(['benchmarks/bench_split.py', *sys.argv[1:]])}`, small model (~6M), batch {t0.batch_size}x"
        f"{t0.seq_len}, {t0.micro_batches} micro-batches, fp32 on {os.cpu_count()} CPU cores, gRPC + mutual "
        "TLS on loopback;"
    )
    print(
        f"workers 1 thread each. mono 1 thread: {fmt_int_stats(all_mono)} tokens/s"
        + (f"; mono {DEFAULT_THREADS} threads: {fmt_int_stats(default_tps)} tokens/s" if default_tps else "")
        + (" (collapsed: cores busy with other work)." if oversubscribed else ".")
    )
    print()
    srow = []
    for r in runs:
        wt = r.wire_bytes / r.tensor_bytes if r.tensor_bytes else float("nan")
        srow.append(
            [
                f"`{r.variant.name}`",
                str(len(r.plan.orgs)),
                fmt_int_stats(r.split_tps),
                fmt_stats([s / m for s, m in zip(r.split_tps, r.mono_tps)]),
                fmt_stats([s / m for s, m in zip(r.split_tps, default_tps)]),
                f"{r.wire_bytes / max(r.measured_steps, 1) / 1e6:.1f}",
                f"{wt:.3f}",
            ]
        )
    print(
        *table(
            [
                "plan",
                "processes",
                "tokens/s",
                "x mono 1 thread",
                f"x mono {DEFAULT_THREADS} threads",
                "MB/step",
                "wire/tensor",
            ],
            srow,
        ),
        sep="\n",
    )
    print(
        f"({args.trials} interleaved trials of {args.steps} steps; median (min-max); 1-minute load average "
        "over the run "
        f"{fmt_stats(LOAD_SAMPLES)} on {os.cpu_count()} cpus)"
    )


if __name__ == "__main__":
    sys.exit(main())
