"""Plans the exactness tests use: the training recipe (clipping that clips, a schedule, checkpointing),
and fine-tuning with LoRA."""

from __future__ import annotations

import json
from pathlib import Path

from fedsplit.plan import load_plan
from fedsplit.plan.loading import resolved

from .conftest import MODELS, PLANS, ROOT

WARMUP_COSINE = {"warmup_steps": 3, "decay": "cosine", "min_lr_ratio": 0.1}

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "experts", "shared_experts"]
DATA = str(ROOT / "data" / "tinyshakespeare.txt")

# Layer 3's attention whole on another organisation than the layer's owner (a carve-out), with
# experts carved out too: attention adapters travel with a HeadsOp.
CARVED = {
    "name": "carved",
    "model": str(MODELS / "tiny.yaml"),
    "training": {"rounds": 1, "steps_per_round": 10, "batch_size": 8, "seq_len": 64, "micro_batches": 2},
    "orgs": [
        {"org": "owner", "data": {"train": DATA}, "holds": ["embed", "layers.0-1", "final_norm", "lm_head"]},
        {"org": "middle", "holds": ["layers.2-3"]},
        {"org": "side", "holds": ["layers.2-3.experts.4-7", "layers.3.attention", "layers.2.shared_experts"]},
    ],
}


def recipe(name: str, **training):
    """A shipped plan with clipping that clips (the tiny model's norm is 0.8-0.9 in its first
    steps), a warmup + cosine schedule and activation checkpointing, plus ``training``."""
    plan = load_plan(PLANS / name / "federation.yaml")
    optimizer = {**plan.training.optimizer.model_dump(), "schedule": WARMUP_COSINE}
    return plan.with_training(grad_clip=0.5, activation_checkpointing=True, optimizer=optimizer, **training)


def with_sections(name: str | dict, directory: Path, **sections):
    """A shipped plan (or a plan document) with some top-level sections set: its resolved form,
    changed, written to ``directory`` and loaded like a file."""
    document = resolved(load_plan(PLANS / name / "federation.yaml")) if isinstance(name, str) else dict(name)
    document.update(sections)
    path = directory / f"{document['name']}-changed.json"
    path.write_text(json.dumps(document))
    return load_plan(path)


def finetuned(name: str | dict, directory: Path, freeze: list[str] | None = None, **finetune):
    """``name`` fine-tuned with LoRA (``finetune``: the section's fields) and ``freeze``."""
    return with_sections(name, directory, finetune=finetune, **({"freeze": freeze} if freeze else {}))
