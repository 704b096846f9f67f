"""Optimizers built the same way for a partition and for the monolithic reference.

Single-tensor (``foreach=False``) implementations: the update of a parameter element then
depends only on that element's gradient and state, so a slice of a parameter on one
organisation steps exactly like the same elements of the whole parameter.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..plan.schema import OptimizerConfig


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=False)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)


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
