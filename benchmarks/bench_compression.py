#!/usr/bin/env python
"""Wire compression on the 2-stage layer plan: bytes, speed and how far the maths drifts.

    .venv/bin/python benchmarks/bench_compression.py [--quick] [--steps 30] [--codecs none bf16 int8]

For each codec (applied to activations and gradients alike; ``ACT/GRAD``, e.g. ``bf16/none``,
sets them apart) this runs ``fedsplit.federation.verify.verify(plan, steps, transport="grpc")``
on ``benchmarks/plans/layers-2stage`` with ``plan.transport.compression`` overridden in memory:
one worker process per organisation over the gRPC data plane with mutual TLS and tokens, and the
*uncompressed* monolithic model in this process, from the same initial weights on the same
synthetic batches. ``verify`` reports both loss curves and the max abs / rel parameter
difference after the last step.

To time the steps without re-implementing ``verify``, its ``ProcessFederation`` and
``MonolithicTrainer`` are swapped (for the duration of the call) for subclasses that time each
``train_step`` and read ``traffic()`` before closing. ``verify`` alternates mono and split
steps, so the two never run at the same time; both compute with 1 intra-op thread (``verify``
sets the reference to ``WORKER_THREADS``). Tokens/s = tokens per step / step wall time, median
(min-max) over the steps after ``--warmup``; ``x mono`` is the per-step ratio split/mono
(mono step i vs split step i, run back to back), summarised the same way.

The batches are uniform random token ids (``synthetic_batches``), so no model can go below
ln(256) = 5.545 nats: loss values show that a codec does not derail training, not that it learns.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


from report import fmt_int_stats, fmt_stats, loadavg, provenance, short_path, table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PLANS = Path(__file__).resolve().parent / "plans"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CODECS = ("none", "bf16", "fp16", "int8")


@dataclass
class Timing:
    split_s: list[float] = field(default_factory=list)
    mono_s: list[float] = field(default_factory=list)
    traffic: dict[str, int] = field(default_factory=dict)
    start_s: float = 0.0
    split_final: dict = field(default_factory=dict)  # reassembled split weights after the last step
    mono_final: object = None  # verify's monolithic trainer, for its final weights
    update_error: float = float("nan")


@contextlib.contextmanager
def timed_verify_components(rec: Timing):
    """Swap verify's ProcessFederation and MonolithicTrainer for timing subclasses."""
    import fedsplit.federation.verify as vmod

    base_fed, base_mono = vmod.ProcessFederation, vmod.MonolithicTrainer

    class TimedFederation(base_fed):
        def __init__(self, *a, **kw):
            t0 = time.perf_counter()
            super().__init__(*a, **kw)
            rec.start_s = time.perf_counter() - t0

        def train_step(self, step, batches):
            t0 = time.perf_counter()
            out = super().train_step(step, batches)
            rec.split_s.append(time.perf_counter() - t0)
            return out

        def close(self):
            with contextlib.suppress(Exception):
                rec.traffic = self.traffic()
                rec.split_final = self.reassembled()
            super().close()

    class TimedMono(base_mono):
        def train_step(self, step, batches):
            t0 = time.perf_counter()
            out = super().train_step(step, batches)
            rec.mono_s.append(time.perf_counter() - t0)
            rec.mono_final = self  # read after verify returns
            return out

    vmod.ProcessFederation, vmod.MonolithicTrainer = TimedFederation, TimedMono
    try:
        yield
    finally:
        vmod.ProcessFederation, vmod.MonolithicTrainer = base_fed, base_mono


def update_error(init: dict, split: dict, mono: dict) -> float:
    """||(split - init) - (mono - init)|| / ||mono - init|| over all parameters (L2): the share of
    the training update that the codec changed. Unlike the max abs diff it is not dominated by a
    few near-zero-gradient weights that AdamW moves by ~lr either way."""
    num = sum(float(((split[k].float() - mono[k].float()) ** 2).sum()) for k in mono)
    den = sum(float(((mono[k].float() - init[k].float()) ** 2).sum()) for k in mono)
    return math.sqrt(num / den) if den else float("nan")


def parse_codec(spec: str) -> tuple[str, str]:
    act, _, grad = spec.partition("/")
    grad = grad or act
    for c in (act, grad):
        if c not in CODECS:
            raise argparse.ArgumentTypeError(f"unknown codec {c!r} in {spec!r}; choose from {', '.join(CODECS)}")
    return act, grad


def header_lines(args) -> list[str]:
    return [
        *provenance("fedsplit"),
        f"plan {short_path(str(args.plan))}  steps {args.steps}  warm-up steps excluded from tokens/s {args.warmup}  "
        f"codecs {args.codecs}  TLS on; workers and mono reference 1 intra-op thread each",
        f"load average at start: {loadavg()}",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 steps (1-2 minutes on 2 cores)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per codec (default 30; --quick 10)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s (default 2)")
    ap.add_argument(
        "--codecs",
        nargs="+",
        default=["none", "bf16", "int8"],
        help=f"codec for both roles, or ACT/GRAD (from {', '.join(CODECS)}); default: none bf16 int8",
    )
    ap.add_argument("--plan", type=Path, default=PLANS / "layers-2stage" / "federation.yaml")
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default malloc settings in this process instead of the ones fedsplit's workers use",
    )
    args = ap.parse_args(argv)
    codecs = [parse_codec(c) for c in args.codecs]

    if not args.default_malloc and "GLIBC_TUNABLES" not in os.environ:
        from fedsplit.hosting.processes import _worker_env

        os.execve(sys.executable, [sys.executable, *sys.argv], _worker_env())

    args.steps = args.steps or (10 if args.quick else 30)
    if args.steps <= args.warmup:
        ap.error("--steps must be larger than --warmup")
    for line in header_lines(args):
        print(line)
    sys.stdout.flush()

    from fedsplit.federation.verify import verify
    from fedsplit.plan import load_plan
    from fedsplit.plan.schema import CompressionConfig
    from fedsplit.runtime import initial_weights

    t_start = time.perf_counter()
    results = []
    for act, grad in codecs:
        plan = load_plan(args.plan)
        plan = plan.with_settings(
            transport=plan.transport.model_copy(
                update={"compression": CompressionConfig(activations=act, gradients=grad)}
            )
        )
        rec = Timing()
        with timed_verify_components(rec):
            res = verify(plan, args.steps, transport="grpc")
        # verify must hand back both loss curves, one value per step.
        if len(res.loss_split) != args.steps or len(res.loss_mono) != args.steps:
            raise RuntimeError(
                f"verify returned {len(res.loss_split)} split / {len(res.loss_mono)} mono losses for {args.steps} steps"
            )
        if len(rec.split_s) != args.steps or len(rec.mono_s) != args.steps or not rec.traffic or not rec.split_final:
            raise RuntimeError("timing hooks did not see every step (did verify change?)")
        rec.update_error = update_error(initial_weights(plan), rec.split_final, rec.mono_final.state_dict())
        rec.split_final = rec.mono_final = None  # free the weights
        t = plan.training
        tokens = t.batch_size * t.seq_len * len(plan.data_owners)
        results.append((f"{act}" if act == grad else f"{act}/{grad}", plan, res, rec, tokens))
        print(
            f"  {results[-1][0]}: {args.steps} steps (workers started in {rec.start_s:.1f} s), max abs diff "
            f"{res.max_abs_diff:.3g}, at {time.perf_counter() - t_start:.1f} s, load {loadavg()}"
        )
        sys.stdout.flush()
    elapsed = time.perf_counter() - t_start

    mono_curves = [r[2].loss_mono for r in results]
    mono_same = all(c == mono_curves[0] for c in mono_curves)
    w = args.warmup
    cols = [
        "codec (act/grad)",
        "MB/step on wire",
        "wire/tensor",
        "split tokens/s",
        "mono tokens/s",
        "split / mono (per step)",
        "final loss split",
        "final loss mono",
        "max |dloss| over steps",
        "max abs param diff",
        "worst parameter",
        "update rel. error",
    ]
    rows = []
    for name, _plan, res, rec, tokens in results:
        split_tps = [tokens / s for s in rec.split_s[w:]]
        mono_tps = [tokens / s for s in rec.mono_s[w:]]
        ratios = [m / s for s, m in zip(rec.split_s[w:], rec.mono_s[w:])]
        wire, tensor = rec.traffic["wire_bytes"], rec.traffic["tensor_bytes"]
        dloss = max(abs(a - b) for a, b in zip(res.loss_split, res.loss_mono))
        rows.append(
            [
                name,
                f"{wire / args.steps / 1e6:.3f}",
                f"{wire / tensor:.4f}",
                fmt_int_stats(split_tps),
                fmt_int_stats(mono_tps),
                fmt_stats(ratios),
                f"{res.loss_split[-1]:.5f}",
                f"{res.loss_mono[-1]:.5f}",
                f"{dloss:.2e}",
                f"{res.max_abs_diff:.2e}",
                res.worst_parameter or "-",
                f"{rec.update_error:.2e}",
            ]
        )
    print()
    print(*table(cols, rows), sep="\n")
    print()
    print(
        "Loss curves (split; mono is the same uncompressed run for every codec"
        + ("" if mono_same else ": WARNING, the mono curves differ between codec runs")
        + "):"
    )
    every = max(1, args.steps // 10)
    idx = sorted(set(range(0, args.steps, every)) | {args.steps - 1})
    print("  step      " + " ".join(f"{i:>8d}" for i in idx))
    print("  mono      " + " ".join(f"{results[0][2].loss_mono[i]:8.4f}" for i in idx))
    for name, _, res, _, _ in results:
        print(f"  {name:<9s} " + " ".join(f"{res.loss_split[i]:8.4f}" for i in idx))
    print()
    print("MB/step = 1e6 B of data-plane frames (sent + received by callers between organisations, over all steps)")
    print("per step; HTTP/2 and TLS framing not included. wire/tensor = those bytes / the fp32 tensors they carry.")
    print(f"tokens/s: median (min-max) over steps {w + 1}..{args.steps} of one run per codec (runs one after another,")
    print(
        "not interleaved: compare the per-step split/mono ratio rather than tokens/s across codecs on a busy machine)."
    )
    print(
        f"max abs param diff: verify()'s max |split - mono| over every parameter after step {args.steps}; "
        "mono is uncompressed."
    )
    print(
        f"(AdamW moves a weight by at most ~lr = {plan.training.optimizer.lr:g} per step, so {args.steps} "
        "steps bound it by "
        f"~{plan.training.optimizer.lr * args.steps:.1e}.)"
    )
    print("update rel. error: ||(split - init) - (mono - init)|| / ||mono - init||, L2 over all parameters.")
    print(f"ln(256) = {math.log(256):.3f}: the floor for these uniform random tokens.")
    print(f"total {elapsed:.1f} s; load average at end: {loadavg()} ({os.cpu_count()} cpus)")

    print()
    print("---- summary (paste into README) ----")
    print(
        f"`{shlex.join(['benchmarks/bench_compression.py', *sys.argv[1:]])}`: `layers-2stage` (small model, batch "
        f"{plan.training.batch_size}x{plan.training.seq_len}, {plan.training.micro_batches} micro-batches, AdamW), "
        f"{args.steps} steps over gRPC + mutual TLS on {os.cpu_count()} CPU cores, vs the uncompressed monolithic run:"
    )
    print()
    srows = []
    for name, _plan, res, rec, _tokens in results:
        wire, tensor = rec.traffic["wire_bytes"], rec.traffic["tensor_bytes"]
        ratios = [m / s for s, m in zip(rec.split_s[w:], rec.mono_s[w:])]
        srows.append(
            [
                f"`{name}`",
                f"{wire / args.steps / 1e6:.2f}",
                f"{wire / tensor:.3f}",
                fmt_stats(ratios),
                f"{res.loss_split[-1]:.4f} (mono {res.loss_mono[-1]:.4f})",
                f"{res.max_abs_diff:.1e}",
                f"{rec.update_error:.1e}",
            ]
        )
    print(
        *table(
            [
                "compression",
                "MB/step",
                "wire/tensor",
                "tokens/s x mono",
                f"loss after {args.steps} steps",
                "max abs param diff",
                "update rel. error",
            ],
            srows,
        ),
        sep="\n",
    )
    print(f"(load average at end {loadavg()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
