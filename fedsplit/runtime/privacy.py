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

``privacy.gradients: {clip, noise_multiplier}`` does the same to what a data owner returns where
its path comes back to it from another organisation: in the backward, the gradient of each
token's received hidden state is clipped and noised before it is sent back (the forward is
unchanged). The monolith applies the same function at the same block, so split training stays
exact; ε then composes both mechanisms (their Rényi divergences add).
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
from ..plan.schema import ActivationNoise, GradientNoise
from .calls import CallKey


def cut_blocks(plan: Plan, data_owner: str) -> frozenset[str | int]:
    """The blocks after which ``data_owner``'s hidden states leave it: the last block of each run
    of its path that it computes, when another organisation computes the next run."""
    path = plan.path(data_owner)
    return frozenset(
        blocks[-1] for (org, blocks), (after, _) in zip(path, path[1:]) if org == data_owner and after != data_owner
    )


def entry_blocks(plan: Plan, data_owner: str) -> frozenset[str | int]:
    """The blocks after which ``data_owner``'s path comes back to it from another organisation:
    where it returns, in the backward, the gradient of the hidden states it received."""
    path = plan.path(data_owner)
    return frozenset(
        blocks[-1] for (org, blocks), (after, _) in zip(path, path[1:]) if org != data_owner and after == data_owner
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


class _NoisedGradient(torch.autograd.Function):
    """The identity in the forward; in the backward, the incoming gradient clipped and noised per
    token by :func:`release_noise`. ``scale``: how much smaller the gradient arriving here is than
    the data owner's own objective's (the monolith averages over data owners), so that the
    mechanism sees what a split run returns."""

    @staticmethod
    def forward(ctx, x: Tensor, noise: GradientNoise, seed: int, scale: float) -> Tensor:
        ctx.noise, ctx.seed, ctx.scale = noise, seed, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.scale == 1.0:
            return release_noise(ctx.noise, grad, ctx.seed), None, None, None
        return release_noise(ctx.noise, grad * ctx.scale, ctx.seed) / ctx.scale, None, None, None


def noised_gradient(x: Tensor, noise: GradientNoise, seed: int, scale: float = 1.0) -> Tensor:
    """``x`` unchanged in the forward; in the backward, its gradient clipped and noised per token
    (what privacy.gradients returns for a received hidden state ``x``)."""
    return _NoisedGradient.apply(x, noise, seed, scale)


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


def seeded_noise_keys(plan: Plan) -> dict[str, int]:
    """Every data owner's noise key drawn from the plan's seed: for ``verify``, whose model is
    thrown away and whose result should repeat (a non-bitwise plan's drift depends on the noise:
    a near-tied top-k choice it pushes over flips), never for a run that trains."""
    return {
        d: int.from_bytes(hashlib.sha256(f"verify:{plan.training.seed}:{d}".encode()).digest()[:8], "big") >> 2
        for d in plan.data_owners
    }


def releaser(
    plan: Plan, key: CallKey, secret: int | None, salt: int = 0, gradient_scale: float = 1.0
) -> Release | None:
    """What ``key``'s data owner applies to a block's output where it leaves it (privacy.activations)
    or comes back to it (privacy.gradients, on the gradient it returns); None when the plan asks
    for neither, or its path never leaves it. The noise is drawn from its ``secret`` key (and
    ``salt``: the round, for held-out evaluation); ``gradient_scale``: see :class:`_NoisedGradient`."""
    privacy = plan.privacy
    activations = privacy.activations if privacy is not None else None
    gradients = privacy.gradients if privacy is not None else None
    cuts = cut_blocks(plan, key.data_owner) if activations is not None else frozenset()
    entries = entry_blocks(plan, key.data_owner) if gradients is not None else frozenset()
    if not cuts and not entries:
        return None
    if secret is None:
        raise ValueError(f"{key.data_owner} has no noise key: privacy's noise is drawn from one")
    base = f"{secret}:{key.data_owner}:{key.step}:{key.micro_batch}:{salt}"

    def seed(block: str | int, what: str = "") -> int:
        digest = hashlib.sha256(f"{base}:{what}{_block_position(plan, block)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def release(block: str | int, x: Tensor) -> Tensor:
        if block in cuts:
            return release_noise(activations, x, seed(block))
        if block in entries and torch.is_grad_enabled():
            return noised_gradient(x, gradients, seed(block, "gradient:"), gradient_scale)
        return x

    return release


def mechanisms(plan: Plan, data_owner: str) -> list[float]:
    """The noise multipliers of the Gaussian mechanisms a data owner's training applies each step:
    one per cut of its path for its activations, one per block where it comes back for its
    gradients (each releases every position of the batch once more)."""
    privacy = plan.privacy
    if privacy is None:
        return []
    out = []
    if privacy.activations is not None:
        out += [privacy.activations.noise_multiplier] * len(cut_blocks(plan, data_owner))
    if privacy.gradients is not None:
        out += [privacy.gradients.noise_multiplier] * len(entry_blocks(plan, data_owner))
    return out


def sample_rate(plan: Plan, train_tokens: int | None) -> float:
    """The share of a data owner's token positions that one step's batch releases (1 when the
    size of its text is unknown)."""
    t = plan.training
    return 1.0 if not train_tokens else min(1.0, t.batch_size * t.seq_len / train_tokens)


def epsilon(plan: Plan, data_owner: str, steps: int, train_tokens: int | None) -> float:
    """ε at ``privacy.delta`` of ``steps`` steps of a data owner with ``train_tokens`` training
    tokens, every mechanism of :func:`mechanisms` composed (inf if one adds no noise; 0 before
    any step)."""
    return gaussian_epsilon(mechanisms(plan, data_owner), sample_rate(plan, train_tokens), steps, plan.privacy.delta)


RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # opacus's default orders


def gaussian_epsilon(noise_multipliers: float | list[float], sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` of ``steps`` steps of subsampled Gaussian mechanisms, one per noise
    multiplier each step (opacus's RDP analysis; the mechanisms' Rényi divergences add)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    multipliers = [noise_multipliers] if isinstance(noise_multipliers, (int, float)) else noise_multipliers
    if steps == 0 or not multipliers:
        return 0.0
    if not all(multipliers):
        return float("inf")
    rdp = sum(compute_rdp(q=sample_rate, noise_multiplier=s, steps=steps, orders=RDP_ORDERS) for s in multipliers)
    return float(get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)[0])
