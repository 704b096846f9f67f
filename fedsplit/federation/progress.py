"""A progress bar over a run's ``metrics.jsonl``: rounds done, the last loss and held-out
perplexity, tokens per second. It reads the file the coordinator writes, so it works the same
for a simulation (coordinator in this process) and a deployment (coordinator under Flower)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .rundir import MetricsLog


def progress_bar(console: Console, what: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )


def status_of(records: list[dict]) -> tuple[int, str]:
    """(rounds done, a line with the last loss, tokens per second, learning rate, gradient norm and
    held-out perplexity)."""
    rounds = [r for r in records if r.get("event") == "round"]
    evals = [r for r in records if r.get("event") == "eval"]
    joined = [r for r in records if r.get("event") == "joined"]
    if not rounds and joined:
        last = joined[-1]
        running = "; round 1 running" if last["joined"] == last["expected"] else ""
        return 0, f"{last['joined']} of {last['expected']} organisations joined{running}"
    parts = []
    if rounds:
        last = rounds[-1]
        parts.append(f"loss {last['loss']:.4f}")
        if last.get("seconds"):
            parts.append(f"{last['tokens'] / last['seconds']:,.0f} tok/s")
        if last.get("lr"):
            parts.append(f"lr {last['lr'][-1]:.2e}")
        if last.get("grad_norm"):
            parts.append(f"grad norm {last['grad_norm'][-1]:.3f}")
    if evals:  # the model after round r is evaluated after the round's record: say which it is
        last = evals[-1]
        held_out = [f"held-out ppl {last['ppl']:.2f}"] if "ppl" in last else []
        held_out += [f"{name} accuracy {t['accuracy']:.1%}" for name, t in last.get("tasks", {}).items()]
        parts.append(f"{', '.join(held_out)} (model of round {last['round']})")
    return len({r["round"] for r in rounds}), "  ".join(parts)


@contextmanager
def watch_rounds(run_dir: Path, total_rounds: int, console: Console, every_s: float = 1.0) -> Iterator[None]:
    """Show the rounds of ``run_dir`` as they complete while the block runs. Where the console
    is not a terminal (a log file), each new status is also a line of its own: a progress bar
    there shows nothing until it ends."""
    log = MetricsLog(Path(run_dir) / "metrics.jsonl")
    stop = threading.Event()
    with progress_bar(console, "rounds") as bar:
        shown: list[tuple[int, str]] = []

        def show(done: int, status: str) -> None:
            if not console.is_terminal and (not shown or shown[-1] != (done, status)):
                shown.append((done, status))
                console.print(f"rounds {done}/{total_rounds}: {status}", highlight=False, soft_wrap=True)

        first = "waiting for the organisations"
        task = bar.add_task("rounds", total=total_rounds, status=first)
        show(0, first)

        def poll() -> None:
            while not stop.wait(every_s):
                done, status = status_of(log.read())
                if status:
                    bar.update(task, completed=done, status=status)
                    show(done, status)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            done, status = status_of(log.read())
            bar.update(task, completed=done, status=status)
