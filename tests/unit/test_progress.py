"""The coordinator's progress, read from the run's metrics.jsonl: who joined before round 1, the
rounds after, and a line per change where output is a log file rather than a terminal."""

from __future__ import annotations

import io
import json
import time

from rich.console import Console

from fedsplit.federation.progress import status_of, watch_rounds


def test_before_round_one_the_status_counts_the_organisations_that_joined():
    joined = [{"event": "joined", "joined": 1, "expected": 3}]
    assert status_of(joined) == (0, "1 of 3 organisations joined")
    assert status_of([*joined, {"event": "joined", "joined": 3, "expected": 3}]) == (
        0,
        "3 of 3 organisations joined; round 1 running",
    )
    done, line = status_of([*joined, {"event": "round", "round": 1, "loss": 2.5, "tokens": 100, "seconds": 2.0}])
    assert done == 1 and line.startswith("loss 2.5000  50 tok/s")


def test_the_held_out_perplexity_says_which_rounds_model_it_measured():
    records = [{"event": "eval", "round": 0, "ppl": 260.7}, {"event": "round", "round": 1, "loss": 2.5, "tokens": 1}]
    assert status_of(records)[1].endswith("held-out ppl 260.70 (model of round 0)")  # round 1's is not in yet
    records.append({"event": "eval", "round": 1, "ppl": 229.4})
    assert status_of(records)[1].endswith("held-out ppl 229.40 (model of round 1)")


def test_a_log_file_gets_a_line_for_each_new_status(tmp_path):
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    metrics = tmp_path / "metrics.jsonl"

    def shown(text: str) -> None:  # the watcher polls every 10 ms; a minute means it never will
        deadline = time.monotonic() + 60
        while text not in out.getvalue():
            assert time.monotonic() < deadline, out.getvalue()
            time.sleep(0.01)

    def write(record: dict) -> None:
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    with watch_rounds(tmp_path, 2, console, every_s=0.01):
        write({"event": "joined", "joined": 2, "expected": 2})
        shown("2 of 2 organisations joined")
        write({"event": "round", "round": 1, "loss": 3.0, "tokens": 10, "seconds": 1.0})
        shown("rounds 1/2")
    lines = [line for line in out.getvalue().splitlines() if line.startswith("rounds ") and ":" in line]
    assert lines[:3] == [
        "rounds 0/2: waiting for the organisations",
        "rounds 0/2: 2 of 2 organisations joined; round 1 running",
        "rounds 1/2: loss 3.0000  10 tok/s",
    ]
