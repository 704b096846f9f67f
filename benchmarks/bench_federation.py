#!/usr/bin/env python
"""The federation's own costs: control-plane overhead per round, and memory per organisation.

    .venv/bin/python benchmarks/bench_federation.py [--quick] [--orgs 4 16 64] [--rounds 3] [--steps 2]
                                                    [--deploy 4] [--memory-model configs/models/small.yaml]

**Overhead.** For each organisation count a U-shaped plan is generated (`fedsplit plan generate`:
a quarter of the organisations own data and hold both ends, the others hold middle layers,
experts and head groups) and run for ``--rounds`` rounds of ``--steps`` steps through Flower's
simulation engine (data plane on loopback, no TLS, evaluation off). A round's time is what the
coordinator measures from sending ``train.begin`` to having every reply; its training time is the
slowest data owner's time inside its steps (``step_s x steps``, measured by the worker); the
overhead is the difference: Flower message waves, weights in and out, barrier hand-offs,
aggregation. Of it, the slowest organisation's message took "to ClientApp" from the coordinator to
its ClientApp handler (SuperLink, SuperNode polling, a ClientApp process started and importing),
and its reply "back" from the handler to the coordinator. The overhead does not grow with the
length of training, so its share of a round of 60 s of training is ``overhead / (60 + overhead)``,
printed per organisation count. ``--deploy N`` does the same with ``fedsplit coordinator`` and N
``fedsplit client`` processes on loopback (SuperLink and SuperNodes, TLS off).

**Memory.** One worker host process per organisation (``--process-per-org``) on the
``--memory-model`` plan of 4 organisations, AdamW, one round. Each process's peak resident set
(VmHWM) less the fixed cost of a process that imports the same code (measured here, reported) is
compared with the bytes of the organisation's parameters, gradients and AdamW state
(16 bytes per parameter in fp32). Target: <= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from report import fmt_stats, loadavg, provenance, table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedsplit.federation.deploy import free_port  # noqa: E402
from fedsplit.federation.rundir import MetricsLog  # noqa: E402
from fedsplit.federation.simulate import SimulationOptions, simulate  # noqa: E402
from fedsplit.plan import load_plan  # noqa: E402
from fedsplit.plan.templates import generate_plan  # noqa: E402

ROUND_OF_TRAINING_S = 60.0


def make_plan(orgs: int, out: Path, rounds: int, steps: int, model: str | None = None):
    options = {"rounds": rounds, "steps_per_round": steps, **({"model": model} if model else {})}
    plan = load_plan(generate_plan(orgs, out, **options))
    plan = plan.with_settings(training=plan.training.model_copy(update={"eval_tokens": 0}))
    return plan


@dataclass(frozen=True)
class RoundTimes:
    """One round as the coordinator saw it: its seconds, the slowest data owner's seconds inside
    its steps, and the slowest Flower hops (message to ClientApp handler; reply to coordinator)."""

    seconds: float
    training: float
    to_client: float
    back: float


def overheads(run_dir: Path) -> list[RoundTimes]:
    out = []
    for r in MetricsLog(run_dir / "metrics.jsonl").read():
        if r["event"] == "round":
            orgs = r["orgs"].values()
            training = max(m["step_s"] * r["steps"] for m in orgs if m.get("tokens", 0) > 0)
            to_client = max(m["flower_in_s"] for m in orgs)
            out.append(RoundTimes(r["seconds"], training, to_client, max(m["flower_back_s"] for m in orgs)))
    return out


def import_seconds(module: str, repeats: int = 3) -> float:
    """Median wall time of a fresh Python process that imports ``module`` (what a ClientApp
    process pays before its handler runs)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=REPO)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def simulated(orgs: int, work: Path, rounds: int, steps: int) -> list[RoundTimes]:
    plan = make_plan(orgs, work / f"plan-{orgs}", rounds, steps)
    return overheads(simulate(plan, SimulationOptions(runs_root=work / "runs", insecure=True)))


def deployed(orgs: int, work: Path, rounds: int, steps: int) -> list[RoundTimes]:
    fed = generate_plan(orgs, work / f"deploy-plan-{orgs}", rounds=rounds, steps_per_round=steps)
    spec = yaml.safe_load(fed.read_text())
    spec["training"]["eval_tokens"] = 0
    fed.write_text(yaml.safe_dump(spec))
    plan = load_plan(fed)
    superlink = f"127.0.0.1:{free_port()}"
    cli = [sys.executable, "-m", "fedsplit.cli"]
    logs = work / "deploy-logs"
    logs.mkdir(exist_ok=True)
    coordinator = subprocess.Popen(
        [*cli, "coordinator", str(fed), "--listen", superlink, "--insecure", "--runs-dir", str(work / "deploy-runs")],
        stdout=open(logs / "coordinator.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    clients = [
        subprocess.Popen(
            [
                *cli,
                "client",
                "--org",
                org,
                "--plan",
                str(fed),
                "--superlink",
                superlink,
                "--insecure",
                "--data-plane-address",
                f"127.0.0.1:{free_port()}",
                "--state-dir",
                str(work / "state" / org),
            ],
            stdout=open(logs / f"{org}.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for org in plan.orgs
    ]
    try:
        if coordinator.wait(3600):
            raise RuntimeError(f"the coordinator failed; see {logs / 'coordinator.log'}")
    finally:
        for proc in (coordinator, *clients):
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait()
    (run_dir,) = (work / "deploy-runs").iterdir()
    return overheads(run_dir)


def overhead_rows(label: str, orgs: int, per_round: list[RoundTimes]) -> list[str]:
    over = [r.seconds - r.training for r in per_round]
    share = [o / (ROUND_OF_TRAINING_S + o) for o in over]
    return [
        label,
        str(orgs),
        str(len(per_round)),
        fmt_stats([r.seconds for r in per_round], 1),
        fmt_stats([r.training for r in per_round], 1),
        fmt_stats(over, 1),
        fmt_stats([r.to_client for r in per_round], 1),
        fmt_stats([r.back for r in per_round], 1),
        f"{100 * statistics.median(share):.1f}%",
    ]


# -- memory ------------------------------------------------------------------------------------


def fixed_process_rss() -> float:
    """Resident bytes of a Python that imported what a worker host imports, and nothing else."""
    code = (
        "import torch, grpc, fedsplit.hosting.host, fedsplit.transport.service\nprint(open('/proc/self/status').read())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return _status_kib(out, "VmRSS") * 1024.0


def _status_kib(text: str, field: str) -> float:
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise ValueError(f"no {field} in /proc status")


def memory(work: Path, model: str) -> tuple[list[list[str]], float]:
    plan = make_plan(4, work / "memory-plan", rounds=1, steps=2, model=model)
    peaks: dict[str, float] = {}
    stop = threading.Event()

    def watch(hosts, run_dir) -> None:
        def sample() -> None:
            while not stop.wait(0.2):
                for org, i in hosts.group_of.items():
                    try:
                        status = open(f"/proc/{hosts.procs[i].pid}/status").read()
                    except OSError:
                        continue
                    peaks[org] = max(peaks.get(org, 0.0), _status_kib(status, "VmHWM") * 1024.0)

        threading.Thread(target=sample, daemon=True).start()

    simulate(
        plan, SimulationOptions(runs_root=work / "memory-runs", insecure=True, process_per_org=True), on_started=watch
    )
    stop.set()
    fixed = fixed_process_rss()
    rows = []
    for org in plan.orgs:
        params = plan.parameter_count(org)
        state = 16.0 * params  # fp32 weights, gradients, AdamW's two moments
        rows.append(
            [
                org,
                f"{params:,}",
                f"{state / 2**20:.1f}",
                f"{peaks[org] / 2**20:.1f}",
                f"{(peaks[org] - fixed) / 2**20:.1f}",
                f"{(peaks[org] - fixed) / state:.2f}x",
            ]
        )
    return rows, fixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 and 16 organisations, 2 rounds, no deployment")
    parser.add_argument(
        "--orgs", type=int, nargs="*", default=[4, 16, 64], help="organisation counts to simulate (none: skip)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--deploy", type=int, nargs="*", default=[4], help="organisation counts to run as separate processes"
    )
    parser.add_argument("--memory-model", default=str(REPO / "configs" / "models" / "small.yaml"))
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    args = parser.parse_args()
    if args.quick:
        args.orgs, args.rounds, args.deploy = [4, 16], 2, []
    print("\n".join(provenance()))
    print(f"load before: {loadavg()}")
    with tempfile.TemporaryDirectory(prefix="fedsplit-bench-federation-") as tmp:
        work = Path(tmp)
        rows = []
        for n in args.orgs:
            started = time.monotonic()
            rows.append(overhead_rows("simulation", n, simulated(n, work / f"sim-{n}", args.rounds, args.steps)))
            print(f"  simulation, {n} organisations: {time.monotonic() - started:.0f} s", flush=True)
        for n in args.deploy:
            rows.append(
                overhead_rows("deployment (loopback)", n, deployed(n, work / f"dep-{n}", args.rounds, args.steps))
            )
        if rows:
            print(
                f"\n## Control-plane overhead per round ({args.steps} steps per round; medians (min-max) over rounds)\n"
            )
            print(
                "\n".join(
                    table(
                        [
                            "runtime",
                            "orgs",
                            "rounds",
                            "round s",
                            "training s",
                            "overhead s",
                            "to ClientApp s",
                            "reply back s",
                            f"share of a {ROUND_OF_TRAINING_S:.0f} s round",
                        ],
                        rows,
                    )
                )
            )
        if args.deploy:
            imports = {
                m: import_seconds(m) for m in ("sys", "flwr.clientapp", "torch", "fedsplit.federation.client_app")
            }
            print(
                "\nA fresh Python process (medians of 3) importing: "
                + ", ".join(f"{m} {t:.2f} s" for m, t in imports.items())
                + " (a deployed ClientApp process imports the last, once per message)"
            )
        if args.no_memory:
            print(f"\nload after: {loadavg()}")
            print(json.dumps({"overhead": rows}))
            return
        mem_rows, fixed = memory(work, args.memory_model)
        print(
            f"\n## Memory per organisation ({Path(args.memory_model).name}, one worker process each, AdamW, "
            "one round)\n"
        )
        print(f"fixed cost of a worker process (python + torch + grpc + fedsplit imported): {fixed / 2**20:.0f} MiB\n")
        print(
            "\n".join(
                table(
                    [
                        "organisation",
                        "parameters",
                        "state MiB (16 B/param)",
                        "peak RSS MiB",
                        "peak - fixed MiB",
                        "x state",
                    ],
                    mem_rows,
                )
            )
        )
    print(f"\nload after: {loadavg()}")
    print(json.dumps({"overhead": rows, "memory": mem_rows, "fixed_mib": fixed / 2**20}))


if __name__ == "__main__":
    main()
