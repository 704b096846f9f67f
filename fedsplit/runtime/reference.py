"""The monolithic reference: the whole model in one place, trained on the same batches with the
same step as the split runtime.

A step's objective is the mean over data owners of each owner's weighted loss (weight 1, or its
task's weight), and an owner's loss is the mean over its micro-batches of ``cross-entropy +
aux_loss_coef * aux`` (the cross-entropy of the LM head, or of its task's head; the load-balancing
statistic is per micro-batch, as in Megatron-Core), so the reference accumulates gradients over
the same micro-batches, in the same precision (bf16-mixed: bf16 compute copies, fp32 master
gradients accumulated per micro-batch), then clips the global norm and steps at the scheduled
learning rate, as every organisation does.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..model import MoETransformer, correct_labels, cross_entropy
from ..plan import Plan
from .calls import CallKey
from .driver import HeldOut
from .microbatches import MicroBatchLoss, owner_objective, run_micro_batches
from .optim import clip_factor, learning_rate, make_optimizer, scale_grads, set_learning_rate, squared_norm
from .policy import EVAL_STEP
from .precision import MasterWeights
from .privacy import fresh_noise_keys, releaser


class MonolithicTrainer:
    def __init__(
        self,
        plan: Plan,
        weights: Mapping[str, Tensor],
        device: str = "cpu",
        noise_keys: Mapping[str, int] | None = None,
    ):
        """``noise_keys``: each data owner's secret noise key, to draw the noise of
        privacy.activations as the split run does (default: fresh keys, other draws)."""
        self.plan = plan
        self.noise_keys = dict(noise_keys) if noise_keys is not None else fresh_noise_keys(plan)
        self.device = torch.device(device)
        self.model = MoETransformer(plan.model).to(self.device)
        self.model.load_state_dict(weights, strict=True)
        self.model.activation_checkpointing = plan.training.activation_checkpointing
        self.model.train()
        self.weights = MasterWeights(dict(self.model.named_parameters()), plan.training.precision, plan.trains)
        self.frozen = {k: v for k, v in weights.items() if not plan.trains(k)}  # as they began (and stay)
        self.optimizer = make_optimizer(self.weights.master.values(), plan.training.optimizer)

    def train_step(self, step: int, batches: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, float]:
        """One optimizer step on every data owner's batch; the objective, each owner's mean
        cross-entropy (``ce/<owner>``), the gradient norm, clip factor and learning rate."""
        owners, t = self.plan.data_owners, self.plan.training
        names = list(self.weights.compute)
        compute = [self.weights.compute[n] for n in names]
        master = [self.weights.master[n] for n in names]
        total, ce = 0.0, {}
        for index, d in enumerate(owners):

            def forward(mb: int, tok: Tensor, lab: Tensor, owner: str = d, index: int = index) -> MicroBatchLoss:
                seed = CallKey(owner, step, mb).noise_seed(t.seed, index)
                blocked = self.plan.blocked_experts(owner)
                # The gradients an owner returns are noised as its own objective's, not the average's.
                release = releaser(
                    self.plan, CallKey(owner, step, mb), self.noise_keys.get(owner), gradient_scale=len(owners)
                )
                task = self.plan.orgs[owner].task
                mean_ce, aux = self.model.losses(tok.to(self.device), lab.to(self.device), seed, blocked, release, task)
                loss = owner_objective(self.plan, owner, mean_ce, aux)
                if len(owners) > 1:
                    loss = loss / len(owners)
                return MicroBatchLoss(loss, mean_ce.item(), aux.item())

            def backward(mb: int, objective: Tensor) -> None:
                for p, g in zip(master, torch.autograd.grad(objective, compute, allow_unused=True)):
                    if g is not None:
                        g = g.to(p.dtype)
                        p.grad = g if p.grad is None else p.grad.add_(g)

            metrics = run_micro_batches(*batches[d], t.micro_batches, forward, backward)
            total += metrics["objective"]
            ce[d] = metrics["loss"]
        squared = squared_norm(p.grad for p in master)
        factor = clip_factor(t.grad_clip, squared)
        if factor < 1.0:
            scale_grads(master, factor)
        lr = learning_rate(t, step)
        set_learning_rate(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.weights.refresh()
        stats = {"grad_norm": squared**0.5, "clip_factor": factor, "lr": lr}
        return {"loss": total, **{f"ce/{d}": v for d, v in ce.items()}, **stats}

    def evaluate(self, tokens: Tensor, labels: Tensor, data_owner: str | None = None, round: int = 0) -> HeldOut:
        """Mean cross-entropy of a held-out batch (and for a task's data owner, the examples its
        head classifies right), micro-batch by micro-batch as the split model evaluates it (no
        gradients, no router noise); routed as ``data_owner``'s batches are (none of the other
        owners' experts) and noised where its hidden states leave it, or to every expert and
        without noise when it is None."""
        micro = self.plan.training.micro_batches
        blocked = self.plan.blocked_experts(data_owner) if data_owner is not None else None
        task = None if data_owner is None else self.plan.orgs[data_owner].task
        losses, correct = [], 0
        self.model.eval()
        try:
            with torch.no_grad():
                for mb, (tok, lab) in enumerate(zip(tokens.chunk(micro), labels.chunk(micro))):
                    release = None
                    if data_owner is not None:
                        key = CallKey(data_owner, EVAL_STEP, mb)
                        release = releaser(self.plan, key, self.noise_keys.get(data_owner), round)
                    tok, lab = tok.to(self.device), lab.to(self.device)
                    if task is None:
                        losses.append(self.model.losses(tok, lab, blocked=blocked, release=release)[0].item())
                        continue
                    logits = self.model.loss_head(task)(self.model.hidden(tok, blocked=blocked, release=release)[0])
                    losses.append(cross_entropy(logits, lab).item())
                    correct += int(correct_labels(logits, lab))
        finally:
            self.model.train()
        return HeldOut(sum(losses) / micro, None if task is None else correct)

    def state_dict(self) -> dict[str, Tensor]:
        """The model's (master) weights, by name, tied ones under each of their names; frozen
        ones as they began (in bf16-mixed the model computes with their bf16 copies)."""
        by_param = {id(p): self.weights.master[n] for n, p in self.weights.compute.items()}
        return {
            k: by_param[id(v)].detach().cpu().clone() if id(v) in by_param else self.frozen.get(k, v).detach().cpu()
            for k, v in self.model.state_dict(keep_vars=True).items()
        }
