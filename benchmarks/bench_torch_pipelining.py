#!/usr/bin/env python
"""fedsplit's gRPC pipeline vs PyTorch's own ``torch.distributed.pipelining``, same 2-stage split.

    .venv/bin/python benchmarks/bench_torch_pipelining.py [--quick] [--trials 5] [--steps 5]

Model: ``configs/models/small.yaml`` (4 MoE layers). Training: batch 8, seq_len 128, 4
micro-batches, AdamW (fedsplit's ``make_optimizer``: lr 3e-4, betas 0.9/0.95, foreach=False),
synthetic batches (``fedsplit.runtime.synthetic_batches``), the same initial weights
(``torch.manual_seed(seed); MoETransformer(cfg)``, i.e. ``initial_weights(plan)``), one
intra-op thread per process everywhere.

torch-pp (the baseline): two ranks on loopback (``torch.multiprocessing`` spawn, world size 2,
gloo, MASTER_ADDR 127.0.0.1), one ``PipelineStage`` each, ``Schedule1F1B`` or ``ScheduleGPipe``
with 4 micro-batches. Stage 0 = embed + layers 0-1; stage 1 = layers 2-3 + final_norm + lm_head
and the loss. Stage modules are thin wrappers over the pieces of one fedsplit ``MoETransformer``
(the same ``Block`` code). The MoE load-balancing loss is kept: stage 0 sends ``(h, aux)``,
stage 1 returns ``(logits, aux)`` and the loss is ``training_loss`` = cross-entropy +
aux_loss_coef * aux, exactly fedsplit's objective (grads scaled 1/4 per micro-batch both sides).

fedsplit rows: ``ProcessFederation`` (one worker process per organisation, gRPC on loopback,
shared memory off), plans in ``benchmarks/plans/torchpp-2stage/``:

* ``match``:  the same placement as torch-pp: data-owner = embed + layers 0-1, compute-b =
  layers 2-3 + final_norm + lm_head (compute-b receives the labels; fedsplit warns). This is
  the headline, with TLS + tokens (``insecure=False``); ``-insecure`` = plaintext.
* ``ushape``: fedsplit's usual U-shape with the same layer split: data-owner also keeps
  final_norm + lm_head, so the path is A -> B -> A (twice the activation hops of torch-pp).

torch.distributed.pipelining cannot express a U-shape (stage 1 handing back to rank 0 would
need a looped/"V" schedule with 3 stages on 2 ranks), so the matching plan is the like-for-like
comparison and the U-shape row shows what fedsplit's default placement costs on top.

Schedules are not identical implementations: fedsplit's ``1f1b`` keeps at most (path length)
micro-batches in flight (2 for match, 3 for ushape) and runs backwards one at a time in
micro-batch order, driven by the data owner over threads; torch's ``Schedule1F1B`` is the
classic per-rank static order. ``gpipe`` is fill-drain in both.

Measurement: every configuration stays alive for the whole schedule block; after warm-up steps,
trials are interleaved (the order rotates each trial) so machine noise hits all rows alike. A
trial is ``--steps`` timed optimizer steps; tokens/s = steps * batch * seq_len / wall time
(torch-pp: between two barriers on rank 0; fedsplit: around ``train_step``, which returns after
every organisation has stepped its optimizer). Ratios fedsplit / torch-pp are paired per trial.
CPU-s/step = user+system CPU of the two compute processes (ranks / workers; the fedsplit
coordinator, which only sends the batch and step commands, is not counted).
"""

from __future__ import annotations

import argparse
import datetime
import os
import queue
import signal
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

# One intra-op thread in every process (set before torch is imported; spawned ranks inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # no INFO lines (e.g. GOAWAY when a federation closes)

import torch  # noqa: E402
from report import loadavg, proc_cpu, provenance  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PLANS = REPO / "benchmarks" / "plans" / "torchpp-2stage"
SPLIT = 2  # layers [0, SPLIT) on stage 0 / data-owner, [SPLIT, num_layers) on stage 1 / compute-b
SCHEDULES = ("1f1b", "gpipe")
# name -> (plan file, insecure)
FEDSPLIT_VARIANTS = {
    "fedsplit-match-tls": ("match.yaml", False),
    "fedsplit-match-insecure": ("match.yaml", True),
    "fedsplit-ushape-tls": ("ushape.yaml", False),
    "fedsplit-ushape-insecure": ("ushape.yaml", True),
}
HEADLINE = "fedsplit-match-tls"
BASELINE = "torch-pp"
TRAINING = {"batch_size": 8, "seq_len": 128, "micro_batches": 4}
REPLY_TIMEOUT = 600.0  # seconds the controller waits for a rank's answer


def load_plan_for(file: str, schedule: str):
    from fedsplit.plan import load_plan

    plan = load_plan(PLANS / file)
    plan = plan.with_settings(
        training=plan.training.model_copy(update={**TRAINING, "schedule": schedule, "max_in_flight": 0})
    )
    return plan


# --------------------------------------------------------------------------------------------
# torch.distributed.pipelining side
# --------------------------------------------------------------------------------------------


class FirstStage(nn.Module):
    """Stage 0: embed + layers [0, SPLIT) of a fedsplit MoETransformer. Returns (h, summed aux)."""

    def __init__(self, full: nn.Module):
        super().__init__()
        self.cfg = full.cfg
        self.embed = full.embed
        self.layers = nn.ModuleList(full.layers[:SPLIT])

    def forward(self, tokens: torch.Tensor):
        from fedsplit.model import rope_tables

        rope = rope_tables(self.cfg, tokens.shape[1], tokens.device)
        h = self.embed(tokens)
        aux = h.new_zeros(())
        for layer in self.layers:
            h, a = layer(h, rope)
            aux = aux + a
        return h, aux


class LastStage(nn.Module):
    """Stage 1: layers [SPLIT, L) + final_norm + lm_head. Returns (logits, aux of all layers)."""

    def __init__(self, full: nn.Module):
        super().__init__()
        self.cfg = full.cfg
        self.layers = nn.ModuleList(full.layers[SPLIT:])
        self.final_norm = full.final_norm
        self.lm_head = full.lm_head

    def forward(self, h: torch.Tensor, aux: torch.Tensor):
        from fedsplit.model import rope_tables

        rope = rope_tables(self.cfg, h.shape[1], h.device)
        for layer in self.layers:
            h, a = layer(h, rope)
            aux = aux + a
        return self.lm_head(self.final_norm(h)), aux


def _rank_main(rank: int, port: int, cmd_qs, res_q, parent: int) -> None:
    """One torch-pp rank: builds its stage, then runs the controller's commands until 'quit'."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from fedsplit.model import MoETransformer
    from fedsplit.model.moe import training_loss
    from fedsplit.runtime import synthetic_batches
    from fedsplit.runtime.optim import make_optimizer

    try:
        torch.set_num_threads(1)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=300))
        plan = load_plan_for("match.yaml", "1f1b")
        cfg = plan.model
        torch.manual_seed(plan.training.seed)  # == fedsplit.runtime.initial_weights(plan)
        full = MoETransformer(cfg)
        full.train()
        module = FirstStage(full) if rank == 0 else LastStage(full)
        del full
        initial = {k: v.clone() for k, v in module.state_dict().items()}
        optimizer = make_optimizer(module.parameters(), plan.training.optimizer)
        n_mb = plan.training.micro_batches

        def loss_fn(output, target):
            logits, aux = output
            return training_loss(cfg, logits, target, aux)

        schedules = {}

        def schedule(name: str):
            if name not in schedules:  # a stage per schedule: its buffers are set up by the first step
                stage = PipelineStage(module, rank, 2, torch.device("cpu"))
                cls = Schedule1F1B if name == "1f1b" else ScheduleGPipe
                schedules[name] = cls(stage, n_microbatches=n_mb, loss_fn=loss_fn, scale_grads=True)
            return schedules[name]

        res_q.put(("ready", rank, os.getpid()))
        while True:
            try:
                cmd = cmd_qs[rank].get(timeout=5)
            except queue.Empty:
                if os.getppid() != parent:  # the controller died: leave
                    return
                continue
            if cmd[0] == "quit":
                break
            if cmd[0] == "reset":  # back to the initial weights and a fresh optimizer (each schedule block)
                module.load_state_dict(initial)
                optimizer = make_optimizer(module.parameters(), plan.training.optimizer)
                res_q.put(("reset", rank))
                continue
            _, name, first_step, steps = cmd
            sched = schedule(name)
            losses_all: list[float] = []
            batches = [synthetic_batches(plan, s)["data-owner"] for s in range(first_step, first_step + steps)]
            dist.barrier()
            t0 = time.perf_counter()
            for tokens, labels in batches:
                if rank == 0:
                    sched.step(tokens)
                else:
                    losses: list = []
                    sched.step(target=labels, losses=losses, return_outputs=False)
                    losses_all.append(sum(float(x.detach()) for x in losses) / len(losses))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            dist.barrier()
            res_q.put(("done", rank, time.perf_counter() - t0, losses_all))
    except BaseException:
        res_q.put(("error", rank, traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchPipeline:
    """The two torch-pp ranks, started once and always stopped (quit, then terminate, then kill)."""

    def __init__(self):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.cmd_qs = [ctx.Queue(), ctx.Queue()]
        self.res_q = ctx.Queue()
        # torch.multiprocessing spawn, world size 2; every rank gets both command queues and reads its own.
        self.context = mp.start_processes(
            _rank_main,
            args=(_free_port(), self.cmd_qs, self.res_q, os.getpid()),
            nprocs=2,
            join=False,
            start_method="spawn",
        )
        self.procs = list(self.context.processes)
        self.pids = {}
        try:
            for _ in range(2):
                msg = self._get()
                self.pids[msg[1]] = msg[2]
        except BaseException:
            self.close()
            raise

    def _get(self):
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            try:
                msg = self.res_q.get(timeout=1)
            except queue.Empty as empty:
                dead = [p for p in self.procs if p.exitcode is not None]
                if dead:
                    raise RuntimeError(
                        f"torch-pp rank process(es) exited: {[(p.name, p.exitcode) for p in dead]}"
                    ) from empty
                if time.monotonic() > deadline:
                    raise TimeoutError("torch-pp ranks did not answer") from empty
                continue
            if msg[0] == "error":
                raise RuntimeError(f"torch-pp rank {msg[1]} failed:\n{msg[2]}")
            return msg

    def run(self, schedule: str, first_step: int, steps: int) -> tuple[float, list[float]]:
        for q in self.cmd_qs:
            q.put(("run", schedule, first_step, steps))
        out = {}
        for _ in range(2):
            msg = self._get()
            out[msg[1]] = msg
        return out[0][2], out[1][3]  # rank 0's wall time, rank 1's losses

    def reset(self) -> None:
        for q in self.cmd_qs:
            q.put(("reset",))
        for _ in range(2):
            self._get()

    def close(self) -> None:
        for q in self.cmd_qs:
            try:
                q.put(("quit",))
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for q in [*self.cmd_qs, self.res_q]:
            q.close()
            q.cancel_join_thread()


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    schedule: str
    pids: list[int]
    run_steps: object  # (first_step, steps) -> (seconds, [objective per step])
    next_step: int = 0
    tok_s: list[float] = field(default_factory=list)
    cpu_per_step: list[float] = field(default_factory=list)
    first_objective: float | None = None
    startup_s: float = 0.0

    def run(self, steps: int, record: bool) -> None:
        cpu0 = sum(proc_cpu(p) for p in self.pids)
        seconds, objectives = self.run_steps(self.next_step, steps)
        cpu1 = sum(proc_cpu(p) for p in self.pids)
        if self.next_step == 0 and objectives:
            self.first_objective = objectives[0]
        self.next_step += steps
        if record:
            self.tok_s.append(steps * TRAINING["batch_size"] * TRAINING["seq_len"] / seconds)
            self.cpu_per_step.append((cpu1 - cpu0) / steps)


def fedsplit_runner(fed, plan):
    from fedsplit.runtime import synthetic_batches

    coef = plan.model.aux_loss_coef

    def run(first_step: int, steps: int):
        objectives = []
        batches = [synthetic_batches(plan, s) for s in range(first_step, first_step + steps)]
        t0 = time.perf_counter()
        for i, s in enumerate(range(first_step, first_step + steps)):
            m = fed.train_step(s, batches[i])["data-owner"]
            objectives.append(m["loss"] + coef * m["aux_loss"])
        return time.perf_counter() - t0, objectives

    return run


def fmt(xs: list[float], digits: int = 0) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def header_lines(args) -> list[str]:
    return [
        *provenance("fedsplit"),
        f"model small.yaml, split after layer {SPLIT - 1}; batch {TRAINING['batch_size']}, seq_len "
        f"{TRAINING['seq_len']}, "
        f"micro-batches {TRAINING['micro_batches']}, AdamW; schedules {args.schedules}",
        f"rows: {BASELINE} + {' '.join(args.variants)}; warm-up {args.warmup} steps, {args.trials} trials x "
        f"{args.steps} steps",
        f"load average at start: {loadavg()}",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 warm-up steps, 3 trials x 3 steps, no ushape-insecure row (about 2-3 min on 2 cores)",
    )
    ap.add_argument("--trials", type=int, default=None, help="interleaved trials per schedule (default 5; quick 3)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per trial (default 5; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per row first (default 3; quick 2)")
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=list(FEDSPLIT_VARIANTS),
        default=None,
        help="fedsplit rows (default: all four; quick: all but fedsplit-ushape-insecure)",
    )
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default malloc settings instead of the ones fedsplit's workers use (for all processes)",
    )
    args = ap.parse_args(argv)
    if args.trials is None:
        args.trials = 3 if args.quick else 5
    if args.steps is None:
        args.steps = 3 if args.quick else 5
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    if args.variants is None:
        args.variants = [v for v in FEDSPLIT_VARIANTS if not (args.quick and v == "fedsplit-ushape-insecure")]

    if not args.default_malloc and "GLIBC_TUNABLES" not in os.environ:
        # fedsplit's worker processes get these malloc settings (ProcessFederation); give the torch-pp
        # ranks the same by re-executing with them (the spawned ranks inherit the environment).
        from fedsplit.hosting.processes import _worker_env

        os.execve(sys.executable, [sys.executable, *sys.argv], _worker_env())

    torch.set_num_threads(1)
    for line in header_lines(args):
        print(line)
    for name in args.variants:
        file, insecure = FEDSPLIT_VARIANTS[name]
        plan = load_plan_for(file, "1f1b")
        from fedsplit.runtime import segments

        path = " -> ".join(f"{org}[{','.join(map(str, seg.blocks))}]" for org, seg in segments(plan, "data-owner"))
        print(f"  {name}: {PLANS.relative_to(REPO) / file}, {'plaintext' if insecure else 'TLS + tokens'}; path {path}")
        for w in plan.warnings:
            print(f"    plan warning: {w.message}")
    print(
        f"  {BASELINE}: 2 ranks, gloo on 127.0.0.1, stage0 = embed + layers 0-{SPLIT - 1}, "
        f"stage1 = layers {SPLIT}-3 + final_norm + lm_head + loss (CE + aux_loss_coef * aux)"
    )
    sys.stdout.flush()

    # Stop cleanly (finally blocks run) on SIGTERM as on Ctrl-C.
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)

    from fedsplit.hosting.processes import ProcessFederation
    from fedsplit.runtime import initial_weights

    t_start = time.perf_counter()
    rows: list[Row] = []
    tpp = None
    try:
        t0 = time.perf_counter()
        tpp = TorchPipeline()
        print(f"torch-pp ranks up (pids {tpp.pids[0]}, {tpp.pids[1]}) in {time.perf_counter() - t0:.1f} s")
        for schedule in args.schedules:
            feds = []
            try:
                tpp.reset()  # every row of a block starts from the same weights and step 0
                block = [
                    Row(
                        BASELINE,
                        schedule,
                        [tpp.pids[0], tpp.pids[1]],
                        lambda first, n, s=schedule: tpp.run(s, first, n),
                    )
                ]
                for name in args.variants:
                    file, insecure = FEDSPLIT_VARIANTS[name]
                    plan = load_plan_for(file, schedule)
                    t0 = time.perf_counter()
                    fed = ProcessFederation(plan, initial_weights(plan), insecure=insecure)
                    feds.append(fed)
                    row = Row(name, schedule, [p.pid for p in fed.procs.values()], fedsplit_runner(fed, plan))
                    row.startup_s = time.perf_counter() - t0
                    block.append(row)
                print(
                    f"[{schedule}] fedsplit federations up: "
                    + ", ".join(f"{r.name} {r.startup_s:.1f} s" for r in block[1:])
                )
                sys.stdout.flush()
                for r in block:  # warm-up (step 0 onwards: same weights, same batch, for the loss check)
                    r.run(args.warmup, record=False)
                for trial in range(args.trials):
                    k = trial % len(block)
                    for r in block[k:] + block[:k]:
                        r.run(args.steps, record=True)
                    print(
                        f"  [{schedule}] trial {trial + 1}/{args.trials} at {time.perf_counter() - t_start:.0f} s, "
                        f"load {loadavg()}: " + ", ".join(f"{r.name} {r.tok_s[-1]:.0f}" for r in block) + " tok/s"
                    )
                    sys.stdout.flush()
                rows += block
            finally:
                for fed in feds:
                    fed.close()
    finally:
        if tpp is not None:
            tpp.close()
    elapsed = time.perf_counter() - t_start

    # ---- report ----------------------------------------------------------------------------
    print()
    cols = [
        "schedule",
        "row",
        "tokens/s median (min-max)",
        f"x {BASELINE} paired median (min-max)",
        "CPU-s/step",
        "step-0 objective",
    ]
    table = []
    base = {r.schedule: r for r in rows if r.name == BASELINE}
    for r in rows:
        b = base[r.schedule]
        ratio = "1" if r is b else fmt([a / c for a, c in zip(r.tok_s, b.tok_s)], 3)
        obj = f"{r.first_objective:.5f}" if r.first_objective is not None else "-"
        table.append([r.schedule, r.name, fmt(r.tok_s), ratio, f"{statistics.median(r.cpu_per_step):.2f}", obj])
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    line = lambda t: "| " + " | ".join(x.ljust(w) for x, w in zip(t, widths)) + " |"  # noqa: E731
    print(line(cols))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for t in table:
        print(line(t))

    print()
    print("summary (tokens/s ratio fedsplit / torch.distributed.pipelining, paired per trial, median (min-max)):")
    for schedule in args.schedules:
        b = base[schedule]
        for r in rows:
            if r.schedule == schedule and r is not b:
                mark = "  <- headline" if r.name == HEADLINE and schedule == args.schedules[0] else ""
                print(f"  {schedule:5s} {r.name:26s} {fmt([a / c for a, c in zip(r.tok_s, b.tok_s)], 3)}{mark}")
    print()
    print("notes:")
    print(
        f"  tokens/s = steps x {TRAINING['batch_size']} x {TRAINING['seq_len']} / wall time of {args.steps} "
        "optimizer steps; "
        f"{args.trials} interleaved trials (order rotates) after {args.warmup} warm-up steps per row."
    )
    print("  torch-pp cannot express fedsplit's U-shape; 'match' rows use the same placement as torch-pp")
    print("  (compute-b receives labels), 'ushape' rows add the B -> A hop of fedsplit's default placement.")
    print("  fedsplit '1f1b' = at most (path length) micro-batches in flight, backwards in order, threads on the")
    print("  data owner; torch Schedule1F1B = static per-rank 1F1B order. Both keep the MoE aux loss.")
    print("  step-0 objective: CE + aux_loss_coef*aux of the first step (same weights and batch); differs only by")
    print("  router-jitter noise (fedsplit seeds it per micro-batch, the torch-pp wrappers draw it unseeded).")
    print("  CPU-s/step: both compute processes together (fedsplit coordinator not counted).")
    print(f"total {elapsed:.1f} s; load average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; all benchmark processes stopped", file=sys.stderr)
        sys.exit(130)
