"""A data owner's side of training: its batches, micro-batch by micro-batch, forward through the
organisations on its path and backward in reverse."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..plan import Plan
from .calls import CallKey, calling, remote_call
from .microbatches import MicroBatchLoss, owner_objective, run_micro_batches
from .path import segments
from .policy import EVAL_STEP
from .privacy import releaser
from .protocols import Peer


class HeldOut(NamedTuple):
    """A held-out batch's mean cross-entropy, and for a task, the examples classified right."""

    loss: float
    correct: int | None = None


def held_out_metrics(results: Sequence[HeldOut], batches: Sequence[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """A data owner's held-out metrics from its batches' results (the split model's or the
    monolith's): ``eval_loss`` and ``eval_tokens`` (the mean over tokens), or for a task
    ``eval_loss``, ``eval_accuracy`` and ``eval_examples`` (means over examples)."""
    if results[0].correct is None:
        tokens = [float(tok.numel()) for tok, _ in batches]
        return {"eval_loss": sum(r.loss * n for r, n in zip(results, tokens)) / sum(tokens), "eval_tokens": sum(tokens)}
    examples = [float((lab != -100).sum()) for _, lab in batches]
    return {
        "eval_loss": sum(r.loss * n for r, n in zip(results, examples)) / sum(examples),
        "eval_accuracy": sum(r.correct for r in results) / sum(examples),
        "eval_examples": sum(examples),
    }


class DataOwner:
    """Drives organisation ``name``'s batches through the split model; ``peer(org)`` is how it
    reaches each organisation on its path (itself included)."""

    def __init__(self, plan: Plan, name: str, device: torch.device, peer: Callable[[str], Peer]):
        self.plan, self.name, self.device, self.peer = plan, name, device, peer
        self.path = segments(plan, name)
        self.noise_key: int | None = None  # its secret for privacy.activations (see runtime.privacy.noise_key)

    def train_batch(self, step: int, tokens: Tensor, labels: Tensor, schedule: str | None = None) -> dict[str, float]:
        """Forward and backward one batch through the whole split model. Gradients accumulate on
        every partition; the step is applied separately, once every data owner's batch is in."""
        t = self.plan.training

        def forward(mb: int, tok: Tensor, lab: Tensor) -> MicroBatchLoss:
            ce, aux, _ = self._through_path(CallKey(self.name, step, mb), tok, lab)
            return MicroBatchLoss(owner_objective(self.plan, self.name, ce, aux), ce.item(), aux.item())

        def backward(mb: int, objective: Tensor) -> None:
            with calling(CallKey(self.name, step, mb)):
                objective.backward()

        metrics = run_micro_batches(
            tokens,
            labels,
            t.micro_batches,
            forward,
            backward,
            schedule or t.schedule,
            t.max_in_flight or len(self.path),
        )
        del metrics["objective"]
        return metrics

    def evaluate_batch(self, tokens: Tensor, labels: Tensor, round: int = 0) -> HeldOut:
        """Mean cross-entropy of a held-out batch through the split model (and for a task, how
        many examples its head classifies right), with the weights as they are (no graph, no
        gradients, no router noise; with privacy.activations, noised where it leaves this
        organisation, fresh noise each ``round``). Micro-batches are shaped as in training, so
        every organisation checks them as it checks training calls."""
        micro = self.plan.training.micro_batches
        with torch.no_grad():
            results = [
                self._through_path(CallKey(self.name, EVAL_STEP, mb), tok, lab, round)
                for mb, (tok, lab) in enumerate(zip(tokens.chunk(micro), labels.chunk(micro)))
            ]
        loss = sum(float(ce) for ce, _, _ in results) / micro
        correct = None if self.plan.orgs[self.name].task is None else sum(int(c) for _, _, c in results)
        return HeldOut(loss, correct)

    def _through_path(
        self, key: CallKey, tokens: Tensor, labels: Tensor, salt: int = 0
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(cross-entropy, summed aux loss, and held out with a task head: the examples it
        classifies right) of one micro-batch: each segment of the path in turn."""
        # Noise on the hidden states that leave it and on the gradients it returns (privacy).
        release = releaser(self.plan, key, self.noise_key, salt)
        correct = None
        with calling(key):
            x = tokens.to(self.device)
            aux = torch.zeros((), device=self.device)
            for org, segment in self.path:
                inputs = [x, labels.to(self.device)] if segment.takes_labels else [x]
                x, segment_aux, *rest = remote_call(self.peer(org), key, segment, inputs)
                if release is not None:
                    x = release(segment.blocks[-1], x)
                aux = aux + segment_aux
                correct = rest[0] if rest else None
        return x, aux, correct
