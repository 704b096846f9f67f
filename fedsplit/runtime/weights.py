"""The weights a run starts from."""

from __future__ import annotations

import math

import torch

from ..model import MoETransformer, is_adapter, parameter_shapes
from ..plan import Plan, select


def initial_weights(plan: Plan) -> dict[str, torch.Tensor]:
    """The weights of the plan's model directory when it names one, else a seeded initialisation;
    with LoRA, plus the adapters' (the base is the same as without them)."""
    if plan.checkpoint is not None:
        base = plan.checkpoint.reader.read_all()
    else:
        torch.manual_seed(plan.training.seed)
        base = MoETransformer(plan.model.base).state_dict()
    return {**base, **adapter_weights(plan)}


def initial_weights_of(plan: Plan, org: str) -> dict[str, torch.Tensor]:
    """``org``'s share of :func:`initial_weights`, reading only its slices of a checkpoint."""
    if plan.checkpoint is None:
        return select(initial_weights(plan), plan.slices_of(org))
    adapters = adapter_weights(plan)
    held = [s for s in plan.slices_of(org) if is_adapter(s.name)]
    return {**plan.checkpoint_slices(org), **select(adapters, held)}


def adapter_weights(plan: Plan) -> dict[str, torch.Tensor]:
    """LoRA's initial factors, PEFT's way: ``A`` Kaiming-uniform (bound 1/sqrt(fan in)), ``B``
    zero, so that the adapted model starts as its base; drawn from the plan's seed in parameter
    order, so that every organisation and the reference draw the same."""
    generator = torch.Generator().manual_seed(plan.training.seed)
    out = {}
    for name, shape in parameter_shapes(plan.model).items():
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(shape[1])
            out[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        elif ".lora_B." in name:
            out[name] = torch.zeros(shape)
    return out
