"""The monolithic reference: the whole model in one place, trained on the same batches with the
same step semantics as the split runtime.

A step's objective is the token-weighted mean over data owners of each owner's loss, and an
owner's loss is the mean over its micro-batches of ``cross-entropy + aux_loss_coef * aux``.
The load-balancing statistic is per micro-batch, as in Megatron-Core, so the reference
accumulates gradients over the same micro-batches.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..model import MoETransformer, cross_entropy, training_loss
from ..plan import Plan
from .calls import CallKey
from .microbatches import MicroBatchLoss, run_micro_batches
from .optim import make_optimizer


class MonolithicTrainer:
    def __init__(self, plan: Plan, weights: Mapping[str, Tensor], device: str = "cpu"):
        self.plan = plan
        self.device = torch.device(device)
        self.model = MoETransformer(plan.model).to(self.device)
        self.model.load_state_dict(weights, strict=True)
        self.model.train()
        self.optimizer = make_optimizer(self.model.parameters(), plan.training.optimizer)

    def train_step(self, step: int, batches: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, float]:
        """One optimizer step on every data owner's batch; the objective and each owner's mean
        cross-entropy (``ce/<owner>``)."""
        owners, t = self.plan.data_owners, self.plan.training
        total, ce = 0.0, {}
        for index, d in enumerate(owners):

            def forward(mb: int, tok: Tensor, lab: Tensor, owner: str = d, index: int = index) -> MicroBatchLoss:
                logits, aux = self.model(tok.to(self.device), CallKey(owner, step, mb).noise_seed(t.seed, index))
                loss = training_loss(self.plan.model, logits, lab.to(self.device), aux) / t.micro_batches
                if len(owners) > 1:
                    loss = loss / len(owners)
                return MicroBatchLoss(loss, cross_entropy(logits.detach(), lab.to(self.device)).item(), aux.item())

            metrics = run_micro_batches(
                *batches[d], t.micro_batches, forward, lambda mb, objective: objective.backward()
            )
            total += metrics["objective"]
            ce[d] = metrics["loss"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": total, **{f"ce/{d}": v for d, v in ce.items()}}

    def evaluate(self, tokens: Tensor, labels: Tensor) -> float:
        """Mean cross-entropy of a held-out batch, micro-batch by micro-batch as the split
        model evaluates it (no gradients, no router noise)."""
        micro = self.plan.training.micro_batches
        self.model.eval()
        try:
            with torch.no_grad():
                return (
                    sum(
                        cross_entropy(self.model(tok.to(self.device))[0], lab.to(self.device)).item()
                        for tok, lab in zip(tokens.chunk(micro), labels.chunk(micro))
                    )
                    / micro
                )
        finally:
            self.model.train()

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
