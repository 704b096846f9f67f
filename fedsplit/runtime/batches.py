"""Deterministic synthetic batches: random token ids per data owner and step, for checking the
maths of a plan without any data."""

from __future__ import annotations

import torch
from torch import Tensor

from ..plan import Plan


def synthetic_batches(plan: Plan, step: int) -> dict[str, tuple[Tensor, Tensor]]:
    t = plan.training
    out = {}
    for index, d in enumerate(plan.data_owners):
        gen = torch.Generator().manual_seed((t.seed * 7919 + step) * 104_729 + index)
        seq = torch.randint(0, plan.model.vocab_size, (t.batch_size, t.seq_len + 1), generator=gen)
        out[d] = (seq[:, :-1].contiguous(), seq[:, 1:].contiguous())
    return out
