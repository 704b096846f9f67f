"""Noise on what a data owner's hidden states tell the organisations its path leads to.

With ``privacy.activations: {clip: C, noise_multiplier: s}`` a data owner clips each token's hidden
state to L2 norm ``C`` and adds Gaussian noise of standard deviation ``s * C`` at every cut of its
path: after each run of blocks it computes itself that another organisation continues
(DP-Forward's per-token Gaussian mechanism, applied by the sender before any byte leaves it). The
noise is drawn from a seed of (plan seed, step, data owner, micro-batch, block), so the monolithic
reference draws the same noise at the same place and split training stays exact. The gradient
passes through the clipping; the noise is a constant of the forward.

The noise must be unknown to the receivers, or they would draw it again and subtract it: its seed
mixes in a secret key of the data owner (:func:`noise_key`, kept in its state directory, never
sent), hashed with the call's step, micro-batch and block. Whoever checks a run against the
monolith holds every data owner's key (``verify``, the tests), and held-out evaluation draws
fresh noise each round.

The accountant is opacus's Rényi-DP analysis (``compute_rdp``, ``get_privacy_spent``): each step is
a Gaussian mechanism with noise multiplier ``s`` on one token position's clipped vector
(sensitivity ``C`` under adding or removing it), applied to a random share of the data owner's
positions (its batch's tokens over its training tokens), composed over the steps so far.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import torch
from torch import Tensor

from ..model import Release
from ..plan import Plan
from ..plan.schema import ActivationNoise
from .calls import CallKey


def cut_blocks(plan: Plan, data_owner: str) -> frozenset[str | int]:
    """The blocks after which ``data_owner``'s hidden states leave it: the last block of each run
    of its path that it computes, when another organisation computes the next run."""
    path = plan.path(data_owner)
    return frozenset(
        blocks[-1] for (org, blocks), (after, _) in zip(path, path[1:]) if org == data_owner and after != data_owner
    )


def _block_position(plan: Plan, block: str | int) -> int:
    return {"embed": 0, "final_norm": plan.model.num_layers + 1}.get(block, block + 1 if isinstance(block, int) else 0)


def release_noise(noise: ActivationNoise, x: Tensor, seed: int) -> Tensor:
    """``x`` with each token's vector clipped to L2 norm ``clip`` and Gaussian noise of standard
    deviation ``noise_multiplier * clip`` added (drawn in fp32 from ``seed``, then cast)."""
    norms = x.float().norm(dim=-1, keepdim=True)
    clipped = x * (noise.clip / norms.clamp_min(1e-12)).clamp(max=1.0).to(x.dtype)
    if not noise.noise_multiplier:
        return clipped
    gen = torch.Generator(device=x.device).manual_seed(seed)
    drawn = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32)
    return clipped + (drawn * (noise.noise_multiplier * noise.clip)).to(x.dtype)


KEY_FILE = "noise.key"


def noise_key(state_dir: Path | None) -> int:
    """A data owner's secret noise key: read from ``state_dir/noise.key``, or made there (readable
    by its owner only) on first use, so that a resumed worker draws what it would have drawn;
    without a state directory, a fresh key."""
    if state_dir is None:
        return secrets.randbits(62)
    path = Path(state_dir) / KEY_FILE
    if path.exists():
        return int(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.randbits(62)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(f"{key}\n")
    return key


def fresh_noise_keys(plan: Plan) -> dict[str, int]:
    """A new secret noise key for every data owner (a run whose noise nobody needs to redraw)."""
    return {d: noise_key(None) for d in plan.data_owners}


def releaser(plan: Plan, key: CallKey, secret: int | None, salt: int = 0) -> Release | None:
    """What ``key``'s data owner applies to a block's output before it leaves it (None: the plan
    asks for nothing, or its path never leaves it), its noise drawn from its ``secret`` key (and
    ``salt``: the round, for held-out evaluation)."""
    noise = plan.privacy.activations if plan.privacy is not None else None
    cuts = cut_blocks(plan, key.data_owner) if noise is not None else frozenset()
    if not cuts:
        return None
    if secret is None:
        raise ValueError(f"{key.data_owner} has no noise key: privacy.activations draws its noise from one")
    base = f"{secret}:{key.data_owner}:{key.step}:{key.micro_batch}:{salt}"

    def release(block: str | int, x: Tensor) -> Tensor:
        if block not in cuts:
            return x
        digest = hashlib.sha256(f"{base}:{_block_position(plan, block)}".encode()).digest()
        return release_noise(noise, x, int.from_bytes(digest[:8], "big") >> 1)

    return release


def sample_rate(plan: Plan, train_tokens: int | None) -> float:
    """The share of a data owner's token positions that one step's batch releases (1 when the
    size of its text is unknown)."""
    t = plan.training
    return 1.0 if not train_tokens else min(1.0, t.batch_size * t.seq_len / train_tokens)


def epsilon(plan: Plan, steps: int, train_tokens: int | None) -> float:
    """ε at ``privacy.delta`` of ``steps`` steps of a data owner with ``train_tokens`` training
    tokens (inf without noise; 0 before any step)."""
    noise = plan.privacy.activations
    return gaussian_epsilon(noise.noise_multiplier, sample_rate(plan, train_tokens), steps, plan.privacy.delta)


RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # opacus's default orders


def gaussian_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` of ``steps`` subsampled Gaussian mechanisms (opacus's RDP analysis)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if steps == 0:
        return 0.0
    if not noise_multiplier:
        return float("inf")
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=RDP_ORDERS)
    return float(get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)[0])
