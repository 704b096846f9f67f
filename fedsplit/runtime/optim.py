"""Optimizers built the same way for a partition and for the monolithic reference.

Single-tensor (``foreach=False``) implementations: the update of a parameter element then
depends only on that element's gradient and state, so a slice of a parameter on one
organisation steps exactly like the same elements of the whole parameter.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..plan.schema import OptimizerConfig


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=False)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)
