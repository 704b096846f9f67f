"""Optimizers, learning-rate schedules and gradient clipping, the same for a partition and for the
monolithic reference.

Single-tensor (``foreach=False``) implementations: the update of a parameter element then
depends only on that element's gradient and state, so a slice of a parameter on one
organisation steps exactly like the same elements of the whole parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..plan.schema import OptimizerConfig, TrainingConfig


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=False)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)


def learning_rate(training: TrainingConfig, step: int) -> float:
    """The learning rate of global step ``step`` (counted from 0) under the plan's schedule."""
    opt = training.optimizer
    schedule = opt.schedule
    if schedule is None:
        return opt.lr
    if step < schedule.warmup_steps:
        return opt.lr * (step + 1) / schedule.warmup_steps
    if schedule.decay == "constant":
        return opt.lr
    span = schedule.decay_steps or max(training.total_steps - schedule.warmup_steps, 1)
    progress = min((step - schedule.warmup_steps) / span, 1.0)
    left = 1.0 - progress if schedule.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return opt.lr * (schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * left)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def squared_norm(grads: Iterable[torch.Tensor | None], weights: Iterable[float] | None = None) -> float:
    """The sum of the squares of every gradient element, accumulated in float64 (so that the sum
    of several organisations' sums is the whole model's to float64 rounding), each tensor's sum
    scaled by its weight (a replica's share) when given."""
    grads = list(grads)
    weights = [1.0] * len(grads) if weights is None else list(weights)
    return sum(w * float(g.detach().double().square().sum()) for g, w in zip(grads, weights) if g is not None and w)


def scale_grads(params: Iterable[torch.nn.Parameter], factor: float) -> None:
    """Multiply every gradient by ``factor`` (a clip factor), in place."""
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


def clip_factor(max_norm: float | None, total_squared: float) -> float:
    """What every gradient is multiplied by: ``max_norm / (norm + 1e-6)``, at most 1 (the formula of
    ``torch.nn.utils.clip_grad_norm_``); 1 without a max norm."""
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (math.sqrt(total_squared) + 1e-6))


def optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat tensors ``"<parameter name>::<field>"``
    (``names`` in the optimizer's parameter order), for a safetensors file."""
    state = optimizer.state_dict()["state"]
    return {
        f"{names[i]}::{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        for i, fields in state.items()
        for k, v in fields.items()
    }


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: list[str], flat: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`optimizer_state`; hyper-parameters stay those of ``optimizer``."""
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, _, field = key.rpartition("::")
        if name not in index:
            raise KeyError(f"optimizer state for '{name}', which this optimizer does not hold")
        state.setdefault(index[name], {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


class OptimizerStates:
    """One organisation's optimizer state at the end of each complete round, in ``directory``
    (the last two rounds are kept), so that a restarted worker resumes exactly."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def file(self, round: int) -> Path:
        return self.directory / f"optimizer-round-{round:04d}.safetensors"

    def save(self, optimizer: torch.optim.Optimizer, names: list[str], round: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.file(round).with_suffix(".tmp")
        save_file(optimizer_state(optimizer, names), tmp)
        tmp.replace(self.file(round))
        for old in self.directory.glob("optimizer-round-*.safetensors"):
            if old.name < self.file(round - 1).name:
                old.unlink()

    def load(self, optimizer: torch.optim.Optimizer, names: list[str], round: int, org: str) -> None:
        path = self.file(round)
        if not path.exists():
            raise RuntimeError(f"{org}: cannot resume after round {round}: its optimizer state {path} is missing")
        load_optimizer_state(optimizer, names, load_file(path))
