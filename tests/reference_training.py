"""The monolithic reference trained on the data owners' own batches, for federation tests."""

from __future__ import annotations

import torch

from fedsplit.runtime import MonolithicTrainer, initial_weights
from fedsplit.runtime.batches import batches_for


def monolithic(plan, total_steps: int, noise_keys=None) -> dict[str, torch.Tensor]:
    mono = MonolithicTrainer(plan, initial_weights(plan), noise_keys=noise_keys)
    sources = {d: batches_for(plan, d) for d in plan.data_owners}
    for step in range(total_steps):
        mono.train_step(step, {d: sources[d](step) for d in plan.data_owners})
    return mono.state_dict()


def max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)
