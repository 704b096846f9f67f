"""Routed experts out of a model: an organisation's owned experts withdrawn (``export --without``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import Tensor

from ..model import ModelConfig
from .errors import CheckpointError

_EXPERT = re.compile(r"^layers\.(\d+)\.moe\.experts\.(\d+)\.(.+)$")


def without_experts(
    cfg: ModelConfig, state: Mapping[str, Tensor], removed: Iterable[tuple[int, int]]
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The model with the routed experts ``removed`` ((layer, expert) pairs) taken out: their
    weights (and adapters) dropped, the others renumbered in order, and the router's rows for them
    deleted, so that its softmax renormalises over the experts that remain. Every layer must keep
    the same number of experts, at least ``top_k``, since a model has one ``num_experts``; a
    hierarchical router's groups would not stay equal, so its experts are not withdrawn."""
    if cfg.router.kind == "hierarchical":
        raise CheckpointError(
            "withdrawing experts from a hierarchical router would leave groups of different sizes; "
            "withdraw from a top-k, soft or hard router's model",
            field="router.kind",
        )
    gone: dict[int, set[int]] = {}
    for layer, index in removed:
        gone.setdefault(layer, set()).add(index)
    left = {layer: cfg.num_experts - len(gone.get(layer, ())) for layer in range(cfg.num_layers)}
    if len(set(left.values())) > 1:
        counts = ", ".join(f"layer {layer}: {n}" for layer, n in left.items())
        raise CheckpointError(
            f"withdrawing these experts leaves layers with different numbers of experts ({counts}), and a model "
            "has one num_experts: own experts in every layer, or withdraw the same number from each"
        )
    remaining = next(iter(left.values()))
    if remaining < (1 if cfg.router.kind == "soft" else cfg.top_k):
        raise CheckpointError(
            f"withdrawing these experts leaves {remaining} per layer, fewer than top_k ({cfg.top_k})", field="top_k"
        )
    kept = {
        layer: [e for e in range(cfg.num_experts) if e not in gone.get(layer, ())] for layer in range(cfg.num_layers)
    }
    renumber = {(layer, e): new for layer, experts in kept.items() for new, e in enumerate(experts)}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        match = _EXPERT.match(name)
        if match:
            layer, index, rest = int(match[1]), int(match[2]), match[3]
            if (layer, index) in renumber:
                out[f"layers.{layer}.moe.experts.{renumber[layer, index]}.{rest}"] = tensor
        elif name.endswith(".moe.router.weight"):
            layer = int(name.split(".")[1])
            out[name] = tensor[kept[layer]].clone()
        else:
            out[name] = tensor
    top_k = remaining if cfg.router.kind == "soft" else cfg.top_k  # a soft router weights every expert left
    return ModelConfig.model_validate({**cfg.model_dump(), "num_experts": remaining, "top_k": top_k}), out
