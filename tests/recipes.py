"""The training recipe the exactness tests use: clipping that clips, a schedule, checkpointing."""

from __future__ import annotations

from fedsplit.plan import load_plan

from .conftest import PLANS

WARMUP_COSINE = {"warmup_steps": 3, "decay": "cosine", "min_lr_ratio": 0.1}


def recipe(name: str, **training):
    """A shipped plan with clipping that clips (the tiny model's norm is 0.8-0.9 in its first
    steps), a warmup + cosine schedule and activation checkpointing, plus ``training``."""
    plan = load_plan(PLANS / name / "federation.yaml")
    optimizer = {**plan.training.optimizer.model_dump(), "schedule": WARMUP_COSINE}
    return plan.with_training(grad_clip=0.5, activation_checkpointing=True, optimizer=optimizer, **training)
