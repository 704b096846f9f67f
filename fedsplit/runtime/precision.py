"""Training precision: the fp32 weights an optimizer steps, and the weights a model computes with.

``fp32``: one set of weights. ``bf16-mixed``: the model's parameters are bf16 compute copies of
fp32 master weights, so forward and backward run in bf16 (and activations and their gradients
cross organisations in bf16, two bytes an element, cast once) while the optimizer steps the
fp32 masters with fp32 state. The model keeps its norms, softmaxes, router probabilities and
loss in fp32 whatever the weights' dtype. Each backward's bf16 gradients are added to the
masters' fp32 gradients, so accumulation over micro-batches and data owners is fp32; after each
step the compute copies are refreshed from the masters.

Compute copies rather than ``torch.autocast``: autocast keeps the residual stream in fp32 (a
bf16 matmul output added to fp32 is fp32), so activations would cross in fp32 or be cast a
second time, and it re-casts every weight on every micro-batch. fedsplit casts once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16}


def compute_dtype(precision: str) -> torch.dtype:
    return DTYPES[precision]


def store_frozen_in(params: Mapping[str, nn.Parameter], dtype: torch.dtype, trains: Callable[[str], bool]) -> None:
    """Give the frozen ``params`` (by name) their storage dtype before any weight is loaded into
    them, so that a bf16 base never passes through fp32 storage of its own (a model's fresh,
    unwritten fp32 storage costs no memory). :class:`MasterWeights` then finds them cast."""
    for p in {id(p): p for k, p in params.items() if not trains(k)}.values():
        if p.dtype != dtype:
            p.data = torch.empty(p.shape, dtype=dtype, device=p.device)


class MasterWeights:
    """The master weights of a model's parameters ``compute`` (by name) that train (``trains``):
    the parameters themselves in fp32; in bf16-mixed, fp32 copies, with the parameters cast to
    bf16 in place. Frozen parameters have no master and no gradient; in bf16-mixed they are kept
    in bf16 only (two bytes a parameter)."""

    def __init__(self, compute: Mapping[str, nn.Parameter], precision: str, trains: Callable[[str], bool]):
        self.dtype = compute_dtype(precision)
        for k, p in compute.items():
            if not trains(k):
                p.requires_grad_(False)
        self.compute = {k: p for k, p in compute.items() if trains(k)}
        if self.dtype == torch.float32:
            self.master = self.compute
            return
        self.master = {k: nn.Parameter(p.detach().float().clone()) for k, p in self.compute.items()}
        for p in {id(p): p for p in compute.values()}.values():  # a tied parameter once
            p.data = p.data.to(self.dtype)

    @property
    def separate(self) -> bool:
        return self.master is not self.compute

    @torch.no_grad()
    def refresh(self) -> None:
        """The compute copies become the masters again (after a step, or new weights)."""
        if self.separate:
            for k, p in self.compute.items():
                p.copy_(self.master[k])
