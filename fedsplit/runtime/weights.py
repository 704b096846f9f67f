"""The weights a run starts from."""

from __future__ import annotations

import torch

from ..model import MoETransformer
from ..plan import Plan


def initial_weights(plan: Plan) -> dict[str, torch.Tensor]:
    """The weights of the plan's model directory when it names one, else a seeded initialisation."""
    if plan.checkpoint is not None:
        return plan.checkpoint.reader.read_all()
    torch.manual_seed(plan.training.seed)
    return MoETransformer(plan.model).state_dict()
