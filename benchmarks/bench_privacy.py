#!/usr/bin/env python
"""How much of a data owner's text can the organisations that receive its activations recover?

    .venv/bin/python benchmarks/bench_privacy.py [--quick] [--train-steps 300] [--probe-steps 400]
                                                 [--noise 0 0.5 1 2]

The victim is a data owner training on Shakespeare. The attacker is an organisation on its path
(`fedsplit plan check` lists who receives what): the holder of the middle layers (hidden states
after layer 0, 1 or 2, every token), a head-group holder (a layer's normalised attention input,
every token) or an expert holder (a layer's normalised MoE input, only the rows routed to its
experts). It is assumed white-box: it knows the weights below the cut. That holds for a data
owner that also hosts middle pieces (it holds a replica of the ends, the same weights at the
start of each round) and for anyone given the reassembled model; a pure compute organisation
holds none of them, so for it the numbers are an upper bound. It computes hidden states of a
public corpus it has (the shipped Python source and arithmetic, never Shakespeare) through the
same weights, trains an inversion probe on them (hidden state -> the token at that position; a
linear map and a small MLP), and applies it to the victim's real activations.

Split training is exact, so the activations an organisation receives are those of the monolithic
model with the same weights; the benchmark computes them there. It does so for the initial
weights and for weights trained on all three corpora (``--train-steps`` AdamW steps), and
prints top-1 token recovery on the victim's text next to the baseline of always guessing its most
frequent token. Deterministic: fixed seeds, CPU.

Labels: where a data owner's path comes back to it (in a U-shaped plan, the holder of the last
middle layer hands the hidden states back to the owner, who holds the loss), that holder receives,
in the backward, the gradient of the loss at each token's hidden state: it carries the next token.
The label-inference attack trains the same probes on those gradients (white-box: computed on the
attacker's public text through the same weights) to predict the label, applies them to the
victim's returned gradients, and compares with always guessing the most frequent label; then the
same with ``privacy.gradients`` (each token's gradient clipped to the median norm and noised by
the owner before it is returned, the attacker training on gradients noised alike) for each
``--noise`` multiplier. The forward is unchanged by that defence, so the attack runs on the
trained weights; what the noise costs the model is not measured here.

The defence (``privacy.activations``: each token's hidden state clipped to ``clip``, Gaussian
noise of ``noise_multiplier x clip`` added by the data owner at the cut) is measured at the
layer-0 cut for each ``--noise`` multiplier, with ``clip`` the median token norm there: the
attacker trains its probe on its public text noised the same way (it knows the plan), the model
is trained with the noise in its forward (as the split run trains), and each row gives token
recovery, held-out perplexity of that model on the victim's text (noised as it is evaluated) and
the ε that opacus's RDP accountant gives for a run of 4 x 30 steps of batch 8 x 64 over the
victim's training text at δ = 1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from report import loadavg, provenance, table  # noqa: E402
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedsplit.model import ModelConfig, MoETransformer  # noqa: E402
from fedsplit.model.moe import route  # noqa: E402
from fedsplit.plan.schema import ActivationNoise, GradientNoise  # noqa: E402
from fedsplit.runtime.privacy import gaussian_epsilon, noised_gradient, release_noise  # noqa: E402

DATA = REPO / "data"
SEQ = 64


def byte_sequences(path: Path, count: int, seed: int, part: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """``count`` random windows of SEQ + 1 bytes from the ``part`` of ``path`` (fractions of its length)."""
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
    lo, hi = int(len(data) * part[0]), int(len(data) * part[1])
    gen = torch.Generator().manual_seed(seed)
    starts = lo + torch.randint(0, hi - lo - SEQ - 1, (count,), generator=gen)
    return torch.stack([data[s : s + SEQ + 1] for s in starts.tolist()])


FIRST_HALF, SECOND_HALF = (0.0, 0.5), (0.5, 1.0)


def noised_at(layer: int, noise: ActivationNoise | None, seed: int):
    """The ``release`` of a data owner whose path leaves it after ``layer`` (None: no defence)."""
    if noise is None:
        return None
    return lambda block, x: release_noise(noise, x, seed) if block == layer else x


def returned_noised_at(layer: int, noise: GradientNoise, seed: int):
    """The ``release`` of a data owner whose path comes back to it after ``layer``: the gradient
    it returns there clipped and noised (privacy.gradients), the forward unchanged."""
    return lambda block, x: noised_gradient(x, noise, seed) if block == layer else x


Defence = Callable[[int], Callable | None]  # a training step's seed -> its release (None: no defence)


def train_monolith(model: MoETransformer, steps: int, seed: int, defence: Defence | None = None) -> None:
    """AdamW on batches from all three shipped corpora in turn (Shakespeare's first half only:
    the victim's observed text comes from its second half); with ``defence``, through the release
    it gives for each step (noise at a cut, as a data owner with that defence sends or returns it)."""
    corpora = [
        (DATA / "tinyshakespeare.txt", FIRST_HALF),
        (DATA / "python-stdlib.txt", (0.0, 1.0)),
        (DATA / "arithmetic.txt", (0.0, 1.0)),
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        path, part = corpora[step % len(corpora)]
        batch = byte_sequences(path, 8, seed * 100_000 + step, part)
        release = defence(seed * 100_000 + step) if defence is not None else None
        logits, aux = model(batch[:, :-1], release=release)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss = ce + model.cfg.aux_loss_coef * aux  # fedsplit's objective
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


Observer = Callable[[MoETransformer, Tensor], tuple[Tensor, Tensor]]  # tokens -> (states, their tokens)


def after_layer(layer: int, noise: ActivationNoise | None = None, seed: int = 0) -> Observer:
    """The residual stream after ``layer``: what the holder of the next layers receives (clipped
    and noised with ``noise``, drawn from ``seed``)."""

    def observe(model: MoETransformer, tokens: Tensor) -> tuple[Tensor, Tensor]:
        seen = {}

        def keep(block, x):
            x = release_noise(noise, x, seed) if noise is not None and block == layer else x
            if block == layer:
                seen["h"] = x
            return x

        with torch.no_grad():
            model(tokens, release=keep)
        return seen["h"].reshape(-1, model.cfg.hidden_size), tokens.reshape(-1)

    return observe


def returned_gradients(layer: int, noise: GradientNoise | None = None, seed: int = 0) -> Observer:
    """The gradient of the loss at each token's hidden state after ``layer``: what a data owner
    returns to the holder of ``layer`` when its path comes back to it there (clipped and noised
    with ``noise``), and the label (the next token) of each position. Takes SEQ + 1 wide text."""

    def observe(model: MoETransformer, tokens: Tensor) -> tuple[Tensor, Tensor]:
        seen = {}

        def keep(block, x):
            if block != layer:
                return x
            x = x.detach().requires_grad_(True)
            seen["h"] = x
            return noised_gradient(x, noise, seed) if noise is not None else x

        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        logits, aux = model(inputs, release=keep)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        (loss + model.cfg.aux_loss_coef * aux).backward()
        model.zero_grad()
        return seen["h"].grad.reshape(-1, model.cfg.hidden_size), labels.reshape(-1)

    return observe


def perplexity(model: MoETransformer, tokens: Tensor, noise: ActivationNoise | None, seed: int) -> float:
    """Held-out perplexity of next-token prediction on ``tokens`` (SEQ + 1 wide), noised after layer 0."""
    with torch.no_grad():
        logits, _ = model(tokens[:, :-1], release=noised_at(0, noise, seed))
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).exp())


def attention_input(layer: int) -> Observer:
    """A layer's normalised attention input: what each of its head-group holders receives."""

    def observe(model: MoETransformer, tokens: Tensor) -> tuple[Tensor, Tensor]:
        seen = {}
        hook = model.layers[layer].attention.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
        with torch.no_grad():
            model(tokens)
        hook.remove()
        return seen["x"].reshape(-1, model.cfg.hidden_size), tokens.reshape(-1)

    return observe


def routed_rows(layer: int, experts: range) -> Observer:
    """A layer's normalised MoE input, only the tokens routed to ``experts``: what their holder
    receives (a token routed to two of them arrives twice; counted once)."""

    def observe(model: MoETransformer, tokens: Tensor) -> tuple[Tensor, Tensor]:
        seen = {}
        moe = model.layers[layer].moe
        hook = moe.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
        with torch.no_grad():
            model(tokens)
        hook.remove()
        x = seen["x"].reshape(-1, model.cfg.hidden_size)
        _, _, chosen = route(moe.router(x), model.cfg.top_k, model.cfg.normalize_top_k)
        mine = ((chosen >= experts.start) & (chosen < experts.stop)).any(dim=-1)
        return x[mine], tokens.reshape(-1)[mine]

    return observe


def train_probe(states: Tensor, tokens: Tensor, hidden: int | None, steps: int, seed: int) -> nn.Module:
    """An inversion probe, hidden state -> token: linear (``hidden`` None) or a one-hidden-layer MLP."""
    torch.manual_seed(seed)
    dim = states.shape[-1]
    probe = (
        nn.Linear(dim, 256)
        if hidden is None
        else nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 256))
    )
    mean, std = states.mean(0), states.std(0) + 1e-6
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    x = (states - mean) / std
    for _ in range(steps):
        loss = F.cross_entropy(probe(x), tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.eval()
    return nn.Sequential(_Standardise(mean, std), probe)


class _Standardise(nn.Module):
    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def recovery(probe: nn.Module, states: Tensor, tokens: Tensor) -> float:
    with torch.no_grad():
        return float((probe(states).argmax(-1) == tokens).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer training and probe steps, less text")
    parser.add_argument("--train-steps", type=int, default=300, help="AdamW steps of the trained weights")
    parser.add_argument("--probe-steps", type=int, default=400, help="Adam steps of each probe (full batch)")
    parser.add_argument("--public-seqs", type=int, default=256, help="public sequences the attacker has")
    parser.add_argument("--victim-seqs", type=int, default=128, help="victim sequences it observes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--noise", type=float, nargs="*", default=[0.0, 0.5, 1.0, 2.0], help="noise multipliers of the defence"
    )
    args = parser.parse_args()
    if args.quick:
        args.train_steps, args.probe_steps, args.public_seqs, args.victim_seqs = 60, 150, 96, 48
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print("\n".join(provenance()))
    print(f"load before: {loadavg()}")
    started = time.monotonic()
    cfg = ModelConfig.from_yaml(REPO / "configs" / "models" / "tiny.yaml")
    torch.manual_seed(args.seed)
    initial = MoETransformer(cfg).eval()
    trained = MoETransformer(cfg)
    trained.load_state_dict(initial.state_dict())
    train_monolith(trained, args.train_steps, args.seed)
    half = args.public_seqs // 2
    public = torch.cat(
        [
            byte_sequences(DATA / "python-stdlib.txt", half, args.seed + 1),
            byte_sequences(DATA / "arithmetic.txt", args.public_seqs - half, args.seed + 2),
        ]
    )[:, :SEQ]
    victim = byte_sequences(DATA / "tinyshakespeare.txt", args.victim_seqs, args.seed + 3, SECOND_HALF)[:, :SEQ]
    counts = torch.bincount(victim.reshape(-1), minlength=256)
    baseline = float(counts.max() / counts.sum())
    experts = range(cfg.num_experts // 2, cfg.num_experts)
    positions = [
        ("middle-layer holder", "hidden states after layer 0", after_layer(0)),
        ("middle-layer holder", "hidden states after layer 1", after_layer(1)),
        ("middle-layer holder", "hidden states after layer 2", after_layer(2)),
        ("head-group holder", "layer 3 attention input", attention_input(3)),
        (
            "expert holder",
            f"layer 2 rows routed to experts {experts.start}-{experts.stop - 1}",
            routed_rows(2, experts),
        ),
    ]
    rows = []
    for attacker, observed, observe in positions:
        cells = [attacker, observed]
        shares = []
        for weights in (initial, trained):
            pub_states, pub_tokens = observe(weights, public)
            vic_states, vic_tokens = observe(weights, victim)
            shares.append(len(vic_tokens) / victim.numel())
            for hidden in (None, 256):
                probe = train_probe(pub_states, pub_tokens, hidden, args.probe_steps, args.seed)
                cells.append(f"{100 * recovery(probe, vic_states, vic_tokens):.1f}%")
        cells.append(f"{100 * shares[-1]:.0f}%")
        rows.append(cells)
        print(f"  {attacker}, {observed}: {', '.join(cells[2:])}", flush=True)
    print(
        f"\n## Token recovery from a data owner's activations (tiny model, byte-level; attacker's probe trained on "
        f"{args.public_seqs} x {SEQ} public tokens of Python and arithmetic, applied to {args.victim_seqs} x {SEQ} "
        f"of the victim's Shakespeare; trained weights: {args.train_steps} AdamW steps)\n"
    )
    print(
        "\n".join(
            table(
                [
                    "attacker",
                    "observes",
                    "initial, linear",
                    "initial, MLP",
                    "trained, linear",
                    "trained, MLP",
                    "victim tokens seen (trained)",
                ],
                rows,
            )
        )
    )
    print(f"\nbaseline (always the victim's most frequent token): {100 * baseline:.1f}%")
    if args.noise:
        defence_rows(args, cfg, initial, trained, public, victim)
    label_rows(args, cfg, initial, trained)
    print(f"took {time.monotonic() - started:.0f} s; load after: {loadavg()}")
    print(json.dumps({"rows": rows, "baseline": baseline}))


def defence_rows(
    args, cfg: ModelConfig, initial: MoETransformer, trained: MoETransformer, public: Tensor, victim: Tensor
) -> None:
    """Recovery, utility and ε of privacy.activations at the layer-0 cut, one row per multiplier."""
    held_out = byte_sequences(DATA / "tinyshakespeare.txt", args.victim_seqs, args.seed + 4, SECOND_HALF)
    states, _ = after_layer(0)(trained, public)
    clip = float(states.norm(dim=-1).median())
    victim_tokens = len((DATA / "tinyshakespeare.txt").read_bytes()) // 2
    q, steps, delta = 8 * SEQ / victim_tokens, 4 * 30, 1e-5
    rows = [
        ["none", "-", *recoveries(trained, None, public, victim, args), f"{perplexity(trained, held_out, None, 0):.2f}"]
    ]
    rows[0].append("inf")
    for multiplier in args.noise:
        noise = ActivationNoise(clip=clip, noise_multiplier=multiplier)
        model = MoETransformer(cfg)
        model.load_state_dict(initial.state_dict())
        train_monolith(model, args.train_steps, args.seed, lambda step, noise=noise: noised_at(0, noise, step))
        cells = [f"{multiplier:g}", f"{clip:.3g}", *recoveries(model, noise, public, victim, args)]
        cells.append(f"{perplexity(model, held_out, noise, args.seed + 5):.2f}")
        cells.append(f"{gaussian_epsilon(multiplier, q, steps, delta):.3g}")
        rows.append(cells)
        print(f"  noise multiplier {multiplier:g}: {', '.join(cells[2:])}", flush=True)
    print(
        f"\n## The defence at the layer-0 cut (privacy.activations, clip = median token norm there; trained "
        f"{args.train_steps} AdamW steps with the noise in the forward; ε: 4 x 30 steps of 8 x {SEQ} over "
        f"{victim_tokens:,} training tokens, δ = {delta:g})\n"
    )
    header = ["noise multiplier", "clip", "recovery, linear", "recovery, MLP", "held-out ppl", "ε"]
    print("\n".join(table(header, rows)))


def label_rows(args, cfg: ModelConfig, initial: MoETransformer, trained: MoETransformer) -> None:
    """Label recovery from the gradients a data owner returns after layer 3 (the last middle layer
    of a U-shaped plan), without and with privacy.gradients at each ``--noise`` multiplier, and
    the defence's cost: held-out perplexity of a model trained with those gradients noised."""
    half = args.public_seqs // 2
    public = torch.cat(
        [
            byte_sequences(DATA / "python-stdlib.txt", half, args.seed + 1),
            byte_sequences(DATA / "arithmetic.txt", args.public_seqs - half, args.seed + 2),
        ]
    )
    victim = byte_sequences(DATA / "tinyshakespeare.txt", args.victim_seqs, args.seed + 3, SECOND_HALF)
    labels = victim[:, 1:].reshape(-1)
    baseline = float(torch.bincount(labels, minlength=256).max() / labels.numel())
    grads, _ = returned_gradients(3)(trained, public)
    clip = float(grads.norm(dim=-1).median())
    victim_tokens = len((DATA / "tinyshakespeare.txt").read_bytes()) // 2
    q, steps, delta = 8 * SEQ / victim_tokens, 4 * 30, 1e-5
    held_out = byte_sequences(DATA / "tinyshakespeare.txt", args.victim_seqs, args.seed + 4, SECOND_HALF)
    rows = []
    for multiplier in [None, *args.noise]:
        noise = None if multiplier is None else GradientNoise(clip=clip, noise_multiplier=multiplier)
        model = trained
        if noise is not None:
            model = MoETransformer(cfg)
            model.load_state_dict(initial.state_dict())
            train_monolith(model, args.train_steps, args.seed, lambda step, n=noise: returned_noised_at(3, n, step))
        pub_grads, pub_labels = returned_gradients(3, noise, args.seed + 21)(trained, public)
        vic_grads, vic_labels = returned_gradients(3, noise, args.seed + 22)(trained, victim)
        cells = ["none" if multiplier is None else f"{multiplier:g}", "-" if noise is None else f"{clip:.3g}"]
        for hidden in (None, 256):
            probe = train_probe(pub_grads, pub_labels, hidden, args.probe_steps, args.seed)
            cells.append(f"{100 * recovery(probe, vic_grads, vic_labels):.1f}%")
        cells.append(f"{perplexity(model, held_out, None, 0):.2f}")
        cells.append("inf" if multiplier is None else f"{gaussian_epsilon(multiplier, q, steps, delta):.3g}")
        rows.append(cells)
        print(f"  returned gradients, noise multiplier {cells[0]}: {', '.join(cells[2:])}", flush=True)
    print(
        f"\n## Label recovery from the gradients a data owner returns after layer 3 (privacy.gradients, clip = "
        f"median token gradient norm there; attacked on the trained weights; held-out ppl: a model trained "
        f"{args.train_steps} AdamW steps with those gradients noised; ε: 4 x 30 steps of 8 x {SEQ} over "
        f"{victim_tokens:,} training tokens, δ = {delta:g})\n"
    )
    header = ["noise multiplier", "clip", "labels recovered, linear", "labels recovered, MLP", "held-out ppl", "ε"]
    print("\n".join(table(header, rows)))
    print(f"\nbaseline (always the victim's most frequent label): {100 * baseline:.1f}%")


def recoveries(model: MoETransformer, noise, public: Tensor, victim: Tensor, args) -> list[str]:
    """Top-1 recovery of the victim's tokens after layer 0 by a linear and an MLP probe trained on the
    attacker's public text, both seen through ``noise`` (different draws)."""
    pub_states, pub_tokens = after_layer(0, noise, args.seed + 11)(model, public)
    vic_states, vic_tokens = after_layer(0, noise, args.seed + 12)(model, victim)
    found = []
    for hidden in (None, 256):
        probe = train_probe(pub_states, pub_tokens, hidden, args.probe_steps, args.seed)
        found.append(f"{100 * recovery(probe, vic_states, vic_tokens):.1f}%")
    return found


if __name__ == "__main__":
    main()
