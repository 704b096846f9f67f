#!/usr/bin/env python
"""What LoRA fine-tuning learns, split across organisations vs in one process, and vs full
fine-tuning: held-out perplexity on a new corpus after adapting a model fedsplit pre-trained on
another.

1. Pre-train the ``small`` model (monolithic) on tinyshakespeare.
2. From that checkpoint, fine-tune on Python's standard library source for the same number of
   steps, three ways: LoRA r=8 on every target split across three organisations (a data owner
   with both ends, half the query heads of the middle layers on a second, half the experts on a
   third; in one process), the same LoRA monolithically, and full fine-tuning monolithically.
3. Held-out perplexity on both corpora (the new one: what was learnt; the old one: what was
   forgotten), and the trainable parameter count of each.

    .venv/bin/python benchmarks/bench_lora_quality.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import REPO, loadavg, provenance, table  # noqa: E402

from fedsplit.interop import save_fedsplit  # noqa: E402
from fedsplit.plan import load_plan  # noqa: E402
from fedsplit.runtime import InProcessFederation, MonolithicTrainer, initial_weights  # noqa: E402
from fedsplit.runtime.batches import batches_for, eval_batches_for  # noqa: E402

SHAKESPEARE, PYTHON = REPO / "data" / "tinyshakespeare.txt", REPO / "data" / "python-stdlib.txt"
LORA = {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "experts", "shared_experts"]}


def plan_file(work: Path, name: str, model: str, data: Path, steps: int, lr: float, finetune=None) -> Path:
    orgs = [
        {"org": "owner", "data": {"train": str(data)}, "holds": ["embed", "layers.0-3", "final_norm", "lm_head"]},
        {"org": "heads", "holds": ["layers.1-2.attention.heads.4-7"]},
        {"org": "experts", "holds": ["layers.0-3.experts.4-7"]},
    ]
    document = {
        "name": name,
        "model": model,
        "training": {
            "rounds": 1,
            "steps_per_round": steps,
            "batch_size": 8,
            "seq_len": 128,
            "micro_batches": 2,
            "eval_tokens": 16384,
            "optimizer": {"name": "adamw", "lr": lr},
            "seed": 0,
        },
        "orgs": orgs,
        **({"finetune": finetune} if finetune else {}),
    }
    path = work / f"{name}.json"
    path.write_text(json.dumps(document))
    return path


def perplexity(plan, weights, corpus_plan) -> float:
    """Held-out perplexity of ``weights`` (``plan``'s model) on ``corpus_plan``'s data owner's text."""
    trainer = MonolithicTrainer(plan, weights)
    batches = eval_batches_for(corpus_plan, corpus_plan.data_owners[0])
    tokens = [float(t.numel()) for t, _ in batches]
    loss = sum(trainer.evaluate(t, y).loss * n for (t, y), n in zip(batches, tokens)) / sum(tokens)
    return math.exp(loss)


def train(trainer, plan, steps: int) -> float:
    source = batches_for(plan, plan.data_owners[0])
    started = time.monotonic()
    for step in range(steps):
        trainer.train_step(step, {plan.data_owners[0]: source(step)})
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a few minutes)")
    args = parser.parse_args()
    pretrain_steps, finetune_steps = (60, 30) if args.quick else (400, 150)
    lines = ["# bench_lora_quality", *provenance(), f"load average at start: {loadavg()}"]
    started = time.monotonic()
    small = str(REPO / "configs" / "models" / "small.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pre = load_plan(plan_file(work, "pretrain", small, SHAKESPEARE, pretrain_steps, 1e-3))
        trainer = MonolithicTrainer(pre, initial_weights(pre))
        seconds = train(trainer, pre, pretrain_steps)
        save_fedsplit(pre.model, trainer.state_dict(), work / "pretrained")
        model = str(work / "pretrained")
        old = load_plan(plan_file(work, "old", model, SHAKESPEARE, 1, 1e-3))
        new = load_plan(plan_file(work, "new", model, PYTHON, finetune_steps, 3e-4))
        lora = load_plan(plan_file(work, "lora", model, PYTHON, finetune_steps, 2e-3, LORA))
        start = initial_weights(new)
        rows = [
            [
                "pre-trained (no fine-tuning)",
                "-",
                "-",
                f"{perplexity(new, start, new):.2f}",
                f"{perplexity(new, start, old):.2f}",
                "-",
            ]
        ]
        results = {}
        for label, plan, run in (
            ("LoRA r=8, split over 3 organisations", lora, lambda p: InProcessFederation(p, initial_weights(p))),
            ("LoRA r=8, monolithic", lora, lambda p: MonolithicTrainer(p, initial_weights(p))),
            ("full fine-tuning, monolithic", new, lambda p: MonolithicTrainer(p, initial_weights(p))),
        ):
            t = run(plan)
            took = train(t, plan, finetune_steps)
            weights = t.reassembled() if isinstance(t, InProcessFederation) else t.state_dict()
            results[label] = weights
            trained = sum(plan.trained_parameter_count(org) for org in plan.orgs)
            rows.append(
                [
                    label,
                    f"{trained:,}",
                    f"{plan.training.optimizer.lr:g}",
                    f"{perplexity(plan, weights, plan):.2f}",
                    f"{perplexity(plan, weights, old):.2f}",
                    f"{took:.0f}",
                ]
            )
        split, mono = results["LoRA r=8, split over 3 organisations"], results["LoRA r=8, monolithic"]
        diff = max(float((split[k] - mono[k]).abs().max()) for k in mono)
    lines += [
        "",
        f"## Held-out perplexity (small model; pre-trained {pretrain_steps} steps on tinyshakespeare in "
        f"{seconds:.0f} s, then {finetune_steps} steps on python-stdlib; batch 8 x 128)",
        *table(["fine-tuning", "trained parameters", "lr", "python-stdlib ppl", "tinyshakespeare ppl", "s"], rows),
        f"max |split - monolithic| LoRA parameter after {finetune_steps} steps: {diff:.2e}",
        f"\nload average at end: {loadavg()}; {time.monotonic() - started:.0f} s in all",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
