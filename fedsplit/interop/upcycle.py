"""Dense-to-MoE upcycling by splitting each FFN's intermediate neurons into experts (LLaMA-MoE).

A dense SwiGLU FFN ``W2 (silu(W1 x) * W3 x)`` is a sum over its intermediate neurons, so
cutting the neurons into disjoint sets and giving each set its rows of ``W1``/``W3`` and columns
of ``W2`` yields experts whose outputs sum to the dense output exactly. Three ways to cut:

* ``random``: a seeded random permutation, cut into equal parts;
* ``cluster``: balanced k-means on the neurons' (normalised) ``W1`` rows, so that neurons that
  read similar input directions land in the same expert;
* ``shared``: the most important neurons (first-order Taylor score ``|a * dL/da|`` of their
  activations on a calibration batch) form an always-active shared expert, the rest are split
  at random.

The routed experts' down projections are multiplied by the number of experts ``N``. With
renormalised top-k weights and a uniform router, the layer's output is then an unbiased
estimate of the dense FFN (each of the ``k`` chosen experts weighs ``N/k``), LLaMA-MoE's gate
scaling folded into the weights so that the model and its HF export need no extra field. With
all ``N`` experts active and a uniform router every expert's gate is exactly ``N * 1/N = 1`` and
the layer computes the dense FFN: :func:`check_upcycle` measures that, and how far top-k routing
with the (random) initial router moves the output.

The input is a dense model: a fedsplit model with one expert and no shared experts (a HF
``LlamaForCausalLM`` directory reads as one).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import ModelConfig, MoE, MoETransformer, cross_entropy
from .errors import CheckpointError

Method = Literal["random", "cluster", "shared"]
METHODS: tuple[str, ...] = ("random", "cluster", "shared")


def check_dense(cfg: ModelConfig) -> None:
    if cfg.num_experts != 1 or cfg.num_shared_experts:
        raise CheckpointError(
            f"upcycling needs a dense model (one expert, no shared experts); this one has "
            f"{cfg.num_experts} experts and {cfg.num_shared_experts} shared",
            field="num_experts",
        )


def default_shared_neurons(ffn: int, experts: int) -> int:
    """The shared expert is as wide as a routed one, plus the neurons an even split leaves over."""
    return ffn - experts * (ffn // (experts + 1))


def upcycle(
    cfg: ModelConfig,
    state: Mapping[str, Tensor],
    experts: int,
    method: Method,
    *,
    top_k: int = 2,
    shared_neurons: int | None = None,
    seed: int = 0,
    calibration: Tensor | None = None,
    aux_loss_coef: float = 0.01,
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The MoE config and weights made from a dense model's; see the module docstring.

    ``calibration`` (token ids, ``(B, T)``) scores neurons for ``method="shared"``; by default a
    seeded batch of random tokens.
    """
    check_dense(cfg)
    if method not in METHODS:
        raise ValueError(f"unknown upcycling method {method!r}: use one of {', '.join(METHODS)}")
    ffn = cfg.expert_ffn_size
    shared = (
        (default_shared_neurons(ffn, experts) if shared_neurons is None else shared_neurons)
        if method == "shared"
        else 0
    )
    if not 0 <= shared < ffn:
        raise ValueError(f"shared neurons ({shared}) must be fewer than the FFN's {ffn}")
    if (ffn - shared) % experts:
        raise ValueError(
            f"the FFN's {ffn} intermediate neurons{f' less {shared} shared' if shared else ''} do not "
            f"split into {experts} equal experts; pick a number of experts (or shared neurons) that divides them"
        )
    gen = torch.Generator().manual_seed(seed)
    moe_cfg = ModelConfig(
        **{
            **cfg.model_dump(),
            "num_experts": experts,
            "top_k": top_k,
            "normalize_top_k": True,
            "expert_ffn_size": (ffn - shared) // experts,
            "num_shared_experts": 1 if shared else 0,
            "shared_expert_ffn_size": shared or None,
            "aux_loss_coef": aux_loss_coef,
        }
    )
    scores = (
        taylor_importance(cfg, state, calibration if calibration is not None else _random_tokens(cfg, gen))
        if shared
        else None
    )

    out = {k: v.clone() for k, v in state.items() if ".moe." not in k}
    for i in range(cfg.num_layers):
        p = f"layers.{i}.moe"
        w1, w2, w3 = (state[f"{p}.experts.0.{w}.weight"] for w in ("w1", "w2", "w3"))
        routed = torch.arange(ffn)
        if scores is not None:
            order = scores[i].argsort(descending=True)
            routed = order[shared:].sort().values
            _put(out, f"{p}.shared_experts", w1, w2, w3, order[:shared].sort().values, 1.0)
        groups = (
            _balanced_kmeans(F.normalize(w1[routed], dim=1), experts, gen)
            if method == "cluster"
            else _random_split(len(routed), experts, gen)
        )
        for e, group in enumerate(groups):
            _put(out, f"{p}.experts.{e}", w1, w2, w3, routed[group], float(experts))
        out[f"{p}.router.weight"] = torch.randn(experts, cfg.hidden_size, generator=gen) * cfg.init_std
    return moe_cfg, out


def _put(
    out: dict[str, Tensor], prefix: str, w1: Tensor, w2: Tensor, w3: Tensor, neurons: Tensor, scale: float
) -> None:
    out[f"{prefix}.w1.weight"] = w1[neurons].clone()
    out[f"{prefix}.w3.weight"] = w3[neurons].clone()
    out[f"{prefix}.w2.weight"] = w2[:, neurons] * scale


def _random_tokens(cfg: ModelConfig, gen: torch.Generator, batch: int = 8, seq_len: int = 64) -> Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)


def _random_split(n: int, parts: int, gen: torch.Generator) -> list[Tensor]:
    return [g.sort().values for g in torch.randperm(n, generator=gen).chunk(parts)]


def _balanced_kmeans(points: Tensor, k: int, gen: torch.Generator, iterations: int = 20) -> list[Tensor]:
    """k equal-sized clusters: Lloyd iterations whose assignment step fills clusters greedily,
    closest (point, centroid) pairs first, each up to ``len(points) / k`` points."""
    n, size = points.shape[0], points.shape[0] // k
    centroids = points[torch.randperm(n, generator=gen)[:k]].clone()
    for _ in range(iterations):
        assign = [-1] * n
        room, left = [size] * k, n
        for flat in torch.cdist(points, centroids).flatten().argsort().tolist():
            point, cluster = divmod(flat, k)
            if assign[point] < 0 and room[cluster]:
                assign[point] = cluster
                room[cluster] -= 1
                left -= 1
                if not left:
                    break
        labels = torch.tensor(assign)
        new = torch.stack([points[labels == c].mean(dim=0) for c in range(k)])
        if torch.allclose(new, centroids):
            break
        centroids = new
    return [torch.where(labels == c)[0] for c in range(k)]


def taylor_importance(cfg: ModelConfig, state: Mapping[str, Tensor], tokens: Tensor) -> list[Tensor]:
    """Per layer, each intermediate neuron's first-order Taylor importance on ``tokens``: the
    summed ``|a * dL/da|`` of its activation ``a`` (the input of ``W2``) under the next-token loss,
    an estimate of how much the loss changes if the neuron is removed."""
    model = _model(cfg, state)
    activations: list[Tensor] = []

    def keep(module, inputs):
        inputs[0].retain_grad()
        activations.append(inputs[0])

    hooks = [layer.moe.experts[0].w2.register_forward_pre_hook(keep) for layer in model.layers]
    try:
        logits, _ = model(tokens[:, :-1])
        cross_entropy(logits, tokens[:, 1:]).backward()
    finally:
        for h in hooks:
            h.remove()
    return [(a * a.grad).abs().reshape(-1, a.shape[-1]).sum(dim=0).detach() for a in activations]


def _model(cfg: ModelConfig, state: Mapping[str, Tensor]) -> MoETransformer:
    model = MoETransformer(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


@dataclass
class UpcycleReport:
    """How the upcycled FFNs compare with the dense ones on the same inputs (per layer, worst
    layer reported), and how far the whole model's logits move."""

    all_experts_max_abs_diff: float  # every expert active, unit gates: should be ~1e-7
    top_k_ffn_rel_error: float  # the MoE layer as configured (top-k, initial router) vs dense, ||d|| / ||dense||
    top_k_logits_max_abs_diff: float
    top_k_logits_rel_error: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@torch.no_grad()
def check_upcycle(
    dense_cfg: ModelConfig,
    dense_state: Mapping[str, Tensor],
    moe_cfg: ModelConfig,
    moe_state: Mapping[str, Tensor],
    tokens: Tensor | None = None,
    seed: int = 0,
) -> UpcycleReport:
    """Compare each upcycled FFN with its dense original on the dense model's own FFN inputs, for
    ``tokens`` (default: a seeded batch of random ones)."""
    if tokens is None:
        tokens = _random_tokens(dense_cfg, torch.Generator().manual_seed(seed), batch=4)
    dense = _model(dense_cfg, dense_state)
    inputs: list[Tensor] = []
    hooks = [layer.moe.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for layer in dense.layers]
    try:
        dense_logits, _ = dense(tokens)
    finally:
        for h in hooks:
            h.remove()
    uniform = ModelConfig(**{**moe_cfg.model_dump(), "top_k": moe_cfg.num_experts})
    exact, rel = 0.0, 0.0
    for i, x in enumerate(inputs):
        target, _ = dense.layers[i].moe(x)
        prefix = f"layers.{i}.moe."
        weights = {k[len(prefix) :]: v for k, v in moe_state.items() if k.startswith(prefix)}
        all_active = _moe_layer(uniform, i, {**weights, "router.weight": torch.zeros_like(weights["router.weight"])})
        exact = max(exact, float((all_active(x)[0] - target).abs().max()))
        routed, _ = _moe_layer(moe_cfg, i, weights)(x)
        rel = max(rel, float((routed - target).norm() / target.norm()))
    moe_logits, _ = _model(moe_cfg, moe_state)(tokens)
    diff = moe_logits - dense_logits
    return UpcycleReport(exact, rel, float(diff.abs().max()), float(diff.norm() / dense_logits.norm()))


def _moe_layer(cfg: ModelConfig, layer: int, weights: Mapping[str, Tensor]) -> MoE:
    moe = MoE(cfg, layer)
    moe.load_state_dict(weights, strict=True)
    return moe.eval()


def save_upcycled(
    dense: Path, out: Path, cfg: ModelConfig, state: Mapping[str, Tensor], report: UpcycleReport, **how
) -> Path:
    """The upcycled model as a fedsplit model directory, with ``upcycle.json``: where it came from,
    how it was cut (``how``: method, experts, top-k, seed) and the report's numbers."""
    from .directory import save_fedsplit

    out = save_fedsplit(cfg, state, out)
    (out / "upcycle.json").write_text(json.dumps({"source": str(dense), **how, **report.as_dict()}, indent=2))
    return out
