"""The Mixture-of-Experts decoder-only transformer, all of its maths in one file.

Mixtral family: RMSNorm, rotary position embeddings, grouped-query attention (optionally with
q/k/v biases and a sliding window), a router over SwiGLU experts (top-k softmax by default;
soft, hard Gumbel-softmax or hierarchical, optionally with expert capacity), optional
DeepSeek-style shared experts (optionally behind a sigmoid gate, as in Qwen2-MoE), the
Switch/Mixtral load-balancing loss and multiplicative router jitter; optional LoRA adapters
(:class:`LoRALinear`) on the attention projections and the experts.

This module knows nothing about plans or networks. fedsplit partitions the model by
*replacing* two containers with ones that have the same call signature:

* ``Block.attention`` (an :class:`Attention`) by a sum of head groups, and
* ``MoE.experts`` (an :class:`Experts`) by a dispatcher that sends rows to other organisations.

So the monolithic model and every partition run the same code below.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import LoraConfig, ModelConfig, RouterConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(cfg: ModelConfig, seq_len: int, device: torch.device | str | None = None):
    """cos and sin of shape (T, head_dim), in the rotate-half layout that HF checkpoints use."""
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim)
    )
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, head_dim) queries or keys by their position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update: ``W x + b + scaling * lora_B(lora_A(x))`` (PEFT's
    names and initialisation: ``A`` Kaiming-uniform, ``B`` zero). The base weight is cast to the
    input's dtype, so a frozen base may be kept in another precision than the adapters."""

    def __init__(self, in_features: int, out_features: int, bias: bool, lora: LoraConfig):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = nn.Linear(in_features, lora.rank, bias=False)
        self.lora_B = nn.Linear(lora.rank, out_features, bias=False)
        self.scaling = lora.scaling

    def reset_adapters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor, dropout: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``dropout``: what the adapter reads instead of ``x`` (LoRA dropout, PEFT's order:
        ``B A dropout(x)``); the base reads ``x``."""
        return self.base(x) + self.adapter_out(self.adapter_in(x if dropout is None else dropout(x)), x.dtype)

    def base(self, x: Tensor) -> Tensor:
        """``W x + b``, without the adapter."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def adapter_in(self, x: Tensor) -> Tensor:
        return lora_code(self.lora_A, x)

    def adapter_out(self, code: Tensor, dtype: torch.dtype) -> Tensor:
        return lora_update(self.lora_B, code, dtype, self.scaling)

    def merged_weight(self) -> Tensor:
        """``W + scaling * B A``: the plain weight that computes what this layer computes."""
        return self.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight).to(self.weight.dtype)


LORA_DROPOUT_STREAM = 0x2545F4914F6CDD1D  # LoRA dropout's masks: a seed stream apart from the routers'
_TARGET_IDS = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "o_proj": 4, "w1": 5, "w2": 6, "w3": 7}
SHARED_EXPERTS = -2  # the expert index of a layer's shared experts in a LoraDropout (-1: attention)


class LoraDropout(NamedTuple):
    """LoRA dropout of one micro-batch's layer: the mask of an adapter's input is a function of
    (micro-batch seed, layer, target, expert) and its shape alone, so that the split model's pieces,
    the monolith, and a forward recomputed by activation checkpointing drop the same inputs. A head
    group draws the mask of all of o_proj's input and keeps its own columns."""

    p: float
    seed: int
    layer: int
    expert: int = -1  # a routed expert's index, SHARED_EXPERTS, or -1 (attention)

    def at(self, expert: int) -> LoraDropout:
        return self._replace(expert=expert)

    def mask(self, target: str, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """Kept entries ``1 / (1 - p)``, dropped ones zero (inverted dropout, as ``nn.Dropout``)."""
        seed = ((self.seed * 100_003 + self.layer) * 1_000_033 + _TARGET_IDS[target] * 10_007 + self.expert + 2) ^ (
            LORA_DROPOUT_STREAM
        )
        generator = torch.Generator(device=device).manual_seed(seed % (1 << 63))
        kept = torch.rand(tuple(shape), generator=generator, device=device) >= self.p
        return kept.to(dtype) / (1.0 - self.p)

    def of(self, target: str) -> Callable[[Tensor], Tensor]:
        """The dropout of ``target``'s adapter input."""
        return lambda x: x * self.mask(target, x.shape, x.device, x.dtype)


def lora_dropout(cfg: ModelConfig, noise_seed: int | None, layer: int, training: bool) -> LoraDropout | None:
    """Layer ``layer``'s LoRA dropout for the micro-batch of ``noise_seed``: only in training (with
    gradients), and only with adapters whose ``dropout`` is above zero."""
    lora = cfg.lora
    if lora is None or not lora.dropout or noise_seed is None or not (training and torch.is_grad_enabled()):
        return None
    return LoraDropout(lora.dropout, noise_seed, layer)


def project(linear: nn.Linear, x: Tensor, dropout: LoraDropout | None, target: str) -> Tensor:
    """``linear(x)``, with LoRA dropout on its adapter's input when it has one and ``dropout`` is given."""
    if dropout is None or not isinstance(linear, LoRALinear):
        return linear(x)
    return linear(x, dropout.of(target))


def lora_code(lora_A: nn.Linear, x: Tensor) -> Tensor:
    """``A x``: an adapter's rank-sized code of its input, in the adapter's dtype."""
    return lora_A(x.to(lora_A.weight.dtype))


def lora_update(lora_B: nn.Linear, code: Tensor, dtype: torch.dtype, scaling: float) -> Tensor:
    """``scaling * B code`` in ``dtype``: what an adapter adds to its base output. A partition that
    holds an adapter's two factors apart computes with these two, as :class:`LoRALinear` does."""
    return lora_B(code).to(dtype) * scaling


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA factor's."""
    return ".lora_A." in name or ".lora_B." in name


TASK_HEADS = "task_heads"  # the prefix of the task heads' parameters: task_heads.NAME.weight


def is_task_head(name: str) -> bool:
    """Whether a parameter name is a task head's (no base checkpoint has them)."""
    return name.startswith(TASK_HEADS + ".")


def in_base(name: str) -> bool:
    """Whether a base checkpoint holds the parameter: neither an adapter nor a task head, which
    a run adds to its base and draws from its seed."""
    return not (is_adapter(name) or is_task_head(name))


def linear(in_features: int, out_features: int, bias: bool = False, lora: LoraConfig | None = None) -> nn.Linear:
    """A linear map, with adapters when ``lora`` is given."""
    if lora is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return LoRALinear(in_features, out_features, bias, lora)


class Attention(nn.Module):
    """Causal grouped-query attention over ``num_heads`` query heads.

    Query head ``h`` reads KV head ``h // (num_heads / num_kv_heads)``. A head group of a
    partition is this same module built with fewer heads: its ``o_proj`` holds the matching
    columns of the full ``o_proj``, so it returns a partial output and the partials sum to the
    full one.
    """

    def __init__(self, cfg: ModelConfig, num_heads: int | None = None, num_kv_heads: int | None = None):
        super().__init__()
        self.num_heads = num_heads or cfg.num_heads
        self.num_kv_heads = num_kv_heads or cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.sliding_window = cfg.sliding_window
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = linear(d, self.num_heads * hd, cfg.qkv_bias, cfg.adapts("q_proj"))
        self.k_proj = linear(d, self.num_kv_heads * hd, cfg.qkv_bias, cfg.adapts("k_proj"))
        self.v_proj = linear(d, self.num_kv_heads * hd, cfg.qkv_bias, cfg.adapts("v_proj"))
        self.o_proj = linear(self.num_heads * hd, d, False, cfg.adapts("o_proj"))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], dropout: LoraDropout | None = None) -> Tensor:
        q, k, v = (project(getattr(self, p), x, dropout, p) for p in ("q_proj", "k_proj", "v_proj"))
        return project(self.o_proj, self.mix(q, k, v, rope), dropout, "o_proj")

    def mix(self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """Causal attention of projected queries, keys and values, ``(B, T, heads * head_dim)``
        each: the heads' outputs side by side, before ``o_proj``."""
        B, T, _ = q.shape
        cos, sin = rope
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        repeat = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if self.sliding_window is not None and T > self.sliding_window:
            pos = torch.arange(T, device=q.device)
            behind = pos[:, None] - pos[None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=(behind >= 0) & (behind < self.sliding_window))
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)


class SwiGLU(nn.Module):
    """One expert: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, ffn: int, lora: LoraConfig | None = None):
        super().__init__()
        self.w1 = linear(dim, ffn, lora=lora)
        self.w2 = linear(ffn, dim, lora=lora)
        self.w3 = linear(dim, ffn, lora=lora)

    def forward(self, x: Tensor, dropout: LoraDropout | None = None) -> Tensor:
        h = F.silu(project(self.w1, x, dropout, "w1")) * project(self.w3, x, dropout, "w3")
        return project(self.w2, h, dropout, "w2")


class SharedExperts(SwiGLU):
    """The always-active shared experts of a layer, fused into one SwiGLU of their summed width.

    With ``shared_expert_gate`` each token's output is scaled by ``sigmoid(gate(x))``, a learned
    per-token switch (Qwen2-MoE). The gate lives here, with the experts it scales, so that whoever
    holds the ``shared_experts`` unit computes the whole term."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, cfg.shared_ffn_size, cfg.adapts("shared_experts"))
        self.gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x: Tensor, dropout: LoraDropout | None = None) -> Tensor:
        y = super().forward(x, None if dropout is None else dropout.at(SHARED_EXPERTS))
        return y if self.gate is None else torch.sigmoid(self.gate(x)) * y


class Experts(nn.ModuleList):
    """The routed experts of one layer.

    Called with the rows routed to each expert, returns each expert's output on its rows. A
    partitioned layer swaps this container for one that computes some experts elsewhere.
    """

    def forward(self, rows: dict[int, Tensor], dropout: LoraDropout | None = None) -> dict[int, Tensor]:
        return {e: self[e](x, None if dropout is None else dropout.at(e)) for e, x in rows.items()}


def expert(cfg: ModelConfig) -> SwiGLU:
    """One routed expert of the model (with its adapters, when the experts have them)."""
    return SwiGLU(cfg.hidden_size, cfg.expert_ffn_size, cfg.adapts("experts"))


def route(logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Token-choice top-k routing: softmax over all experts, keep the k largest, renormalise
    them (Mixtral) unless ``normalize`` is off. Returns (probs, top-k weights, top-k experts)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


def load_balancing_loss(probs: Tensor, experts: Tensor, num_experts: int) -> Tensor:
    """Switch/Mixtral auxiliary loss: ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of
    (token, slot) assignments that chose expert ``e`` summed over slots and ``P_e`` the mean
    router probability of ``e``. Equals ``top_k`` when routing is perfectly balanced."""
    tokens_per_expert = F.one_hot(experts, num_experts).float().mean(dim=0).sum(dim=0)
    return num_experts * (tokens_per_expert * probs.mean(dim=0)).sum()


class Routing(NamedTuple):
    """Where a layer sends each token: ``experts[t, s]`` (-1: dropped by capacity) with weight
    ``weights[t, s]`` for each of its slots, and the layer's load-balancing loss."""

    weights: Tensor  # (tokens, slots), fp32
    experts: Tensor  # (tokens, slots), int64
    aux: Tensor


def soft_routing(logits: Tensor, blocked: Sequence[int] = ()) -> Routing:
    """Every expert (but the blocked ones), weighted by the softmax over all of them. No
    load-balancing loss: every expert gets every token."""
    probs = torch.softmax(logits.float(), dim=-1)
    allowed = [e for e in range(logits.shape[-1]) if e not in blocked]
    experts = torch.tensor(allowed, device=logits.device).expand(logits.shape[0], -1)
    return Routing(probs[:, allowed], experts, probs.new_zeros(()))


def hard_routing(logits: Tensor, temperature: float, gumbel: Tensor | None) -> Routing:
    """One expert per token: the argmax of ``softmax((logits + gumbel) / temperature)``, with
    weight exactly one in the forward and that softmax's gradient in the backward
    (straight-through Gumbel-softmax). Without ``gumbel`` (evaluation): the argmax of the logits."""
    probs = torch.softmax(logits.float(), dim=-1)
    if gumbel is None:
        expert = logits.argmax(dim=-1, keepdim=True)
        weight = torch.ones(expert.shape, device=logits.device)
    else:
        y = torch.softmax((logits.float() + gumbel) / temperature, dim=-1)
        expert = y.argmax(dim=-1, keepdim=True)
        chosen = y.gather(-1, expert)
        weight = (chosen - chosen.detach()) + 1.0
    return Routing(weight, expert, load_balancing_loss(probs, expert, logits.shape[-1]))


def hierarchical_routing(
    group_logits: Tensor, logits: Tensor, group_top_k: int, top_k: int, normalize: bool
) -> Routing:
    """A gate over groups of experts keeps ``group_top_k`` groups; inside each kept group, the
    softmax over its experts' own logits keeps ``top_k`` of them; an expert's weight is its
    group's weight times its weight inside the group. With ``normalize`` a level that keeps more
    than one renormalises over what it kept; one kept alone keeps its probability, since a weight
    of exactly one would leave its gate nothing to learn from the task (only from the balancing).
    The loss balances both levels: the groups' (``E_g``) plus the experts' under the joint
    probability ``P(group) * P(expert | group)``; equal to ``group_top_k + slots`` when balanced."""
    tokens, groups = group_logits.shape
    size = logits.shape[-1] // groups
    group_probs, group_weights, kept = route(group_logits, group_top_k, normalize and group_top_k > 1)
    inner = torch.softmax(logits.float().reshape(tokens, groups, size), dim=-1)
    in_kept = inner.gather(1, kept[..., None].expand(-1, -1, size))
    weights, members = in_kept.topk(top_k, dim=-1)
    if normalize and top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = (group_weights[..., None] * weights).reshape(tokens, -1)
    experts = (kept[..., None] * size + members).reshape(tokens, -1)
    joint = (group_probs[..., None] * inner).reshape(tokens, -1)
    aux = load_balancing_loss(group_probs, kept, groups) + load_balancing_loss(joint, experts, logits.shape[-1])
    return Routing(weights, experts, aux)


def within_capacity(experts: Tensor, num_experts: int, capacity_factor: float, reachable: int | None = None) -> Tensor:
    """``experts`` with the assignments beyond each expert's capacity set to -1 (dropped).

    Capacity is ``ceil(capacity_factor * assignments / reachable)``, ``reachable`` the experts the
    batch may be routed to (all by default; fewer when some are blocked). Assignments are served
    slot by slot (every token's first choice before any second choice), tokens in order (GShard):
    so whether a token keeps a later choice depends on the other tokens of its micro-batch, later
    positions of its own sequence included."""
    capacity = math.ceil(capacity_factor * experts.numel() / (reachable or num_experts))
    order = experts.t().reshape(-1)  # slot-major
    seen = F.one_hot(order, num_experts).cumsum(dim=0)
    position = seen.gather(1, order[:, None]).squeeze(1) - 1
    kept = (position < capacity).reshape(experts.shape[1], -1).t()
    return experts.masked_fill(~kept, -1)


GUMBEL_STREAM = 0x5DEECE66D  # a hard router's noise: a seed stream apart from jitter's


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        # A hierarchical gate's top level; each group's own gate is its experts' rows of ``router``.
        hierarchical = cfg.router.kind == "hierarchical"
        self.group_router = nn.Linear(cfg.hidden_size, cfg.router.groups, bias=False) if hierarchical else None
        self.experts = Experts(expert(cfg) for _ in range(cfg.num_experts))
        self.shared_experts = SharedExperts(cfg) if cfg.num_shared_experts else None

    def _generator(self, device: torch.device, noise_seed: int | None, stream: int = 0) -> torch.Generator | None:
        """Router noise as a function of (seed, layer, stream) alone, so that a split run and the
        monolithic run, and a recomputed forward, draw the same noise for the same micro-batch.
        Stream 0 is jitter's, drawn as before routers had kinds (a top-k run is unchanged)."""
        if noise_seed is None:
            return None
        return torch.Generator(device=device).manual_seed((noise_seed * 100_003 + self.layer_idx) ^ stream)

    def _noisy(self) -> bool:
        """Router noise is drawn in training only, never while evaluating."""
        return self.training and torch.is_grad_enabled()

    def jitter(self, x: Tensor, noise_seed: int | None) -> Tensor:
        """Multiplicative router-input noise ``U(1-eps, 1+eps)`` (Switch Transformer)."""
        eps = self.cfg.router_jitter
        if not (self._noisy() and eps > 0):
            return x
        noise = torch.rand(x.shape, generator=self._generator(x.device, noise_seed), device=x.device, dtype=x.dtype)
        return x * (1.0 - eps + 2.0 * eps * noise)

    def gumbel(self, shape: torch.Size, device: torch.device, noise_seed: int | None) -> Tensor | None:
        """Standard Gumbel noise for a hard router's logits (training only)."""
        if not self._noisy():
            return None
        gen = self._generator(device, noise_seed, GUMBEL_STREAM)
        uniform = torch.rand(shape, generator=gen, device=device)
        return -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))

    def gate(self, x: Tensor, noise_seed: int | None, blocked: Sequence[int]) -> Routing:
        """The layer's routing of the (flattened) tokens ``x``, by the config's router kind."""
        router: RouterConfig = self.cfg.router
        x = self.jitter(x, noise_seed)
        logits = self.router(x)
        if blocked:
            logits = logits.index_fill(-1, torch.tensor(blocked, device=x.device), float("-inf"))
        if router.kind == "soft":
            return soft_routing(logits, blocked)
        if router.kind == "hard":
            gumbel = self.gumbel(logits.shape, logits.device, noise_seed)
            return hard_routing(logits, router.gumbel_temperature, gumbel)
        if router.kind == "hierarchical":
            routing = hierarchical_routing(
                self.group_router(x), logits, router.groups_kept, self.cfg.top_k, self.cfg.normalize_top_k
            )
        else:
            probs, weights, chosen = route(logits, self.cfg.top_k, self.cfg.normalize_top_k)
            routing = Routing(weights, chosen, load_balancing_loss(probs, chosen, self.cfg.num_experts))
        if router.capacity_factor is not None:
            reachable = self.cfg.num_experts - len(blocked)
            kept = within_capacity(routing.experts, self.cfg.num_experts, router.capacity_factor, reachable)
            routing = routing._replace(experts=kept)
        return routing

    def forward(self, x: Tensor, noise_seed: int | None = None, blocked: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
        """(output, load-balancing loss); ``blocked`` experts get no token of this batch: their
        router logits are -inf, so their probability and router gradient are exactly zero (another
        data owner's owned experts, see :meth:`fedsplit.plan.Plan.blocked_experts`)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen, aux = self.gate(x, noise_seed, blocked)

        # Dispatch loops over experts, never over tokens: gather each expert's rows once.
        slots: dict[int, tuple[Tensor, Tensor]] = {}
        for e in range(self.cfg.num_experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                slots[e] = (token, slot)
        dropout = lora_dropout(self.cfg, noise_seed, self.layer_idx, self.training)
        outputs = self.experts({e: x[token] for e, (token, _) in slots.items()}, dropout)

        out = torch.zeros_like(x)
        for e, (token, slot) in slots.items():
            out = out.index_add(0, token, outputs[e] * weights[token, slot, None].to(x.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x, dropout)
        return out.reshape(shape), aux


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe = MoE(cfg, layer_idx)

    def forward(
        self, h: Tensor, rope: tuple[Tensor, Tensor], noise_seed: int | None = None, blocked: Sequence[int] = ()
    ) -> tuple[Tensor, Tensor]:
        dropout = lora_dropout(self.moe.cfg, noise_seed, self.moe.layer_idx, self.training)
        h = h + self.attention(self.attn_norm(h), rope, dropout)
        moe_out, aux = self.moe(self.ffn_norm(h), noise_seed, blocked)
        return h + moe_out, aux


BlockedExperts = Mapping[int, Sequence[int]]  # layer -> experts a batch may not be routed to
Release = Callable[[str | int, Tensor], Tensor]  # (block, its output) -> what the next block gets


def run_block(
    block: Block,
    h: Tensor,
    rope: tuple[Tensor, Tensor],
    noise_seed: int | None,
    recompute: bool,
    blocked: BlockedExperts | None = None,
) -> tuple[Tensor, Tensor]:
    """``block(h, rope, noise_seed)``, routing to none of ``blocked[layer]``; with ``recompute``
    (activation checkpointing), keeping only its input: its forward runs again during backward,
    drawing the same router noise (seeded)."""
    excluded = tuple(blocked.get(block.moe.layer_idx, ())) if blocked else ()
    if recompute and torch.is_grad_enabled():
        return checkpoint(block, h, rope, noise_seed, excluded, use_reentrant=False)
    return block(h, rope, noise_seed, excluded)


LOSS_CHUNK_ROWS = 1024  # rows of logits alive at once in a recomputed loss


def chunked_cross_entropy(hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` (-100 labels ignored), with the logits of
    only :data:`LOSS_CHUNK_ROWS` rows at a time: each chunk's logits are recomputed in backward
    instead of kept, so the vocabulary-wide logits of a batch never exist at once."""
    rows, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)

    def chunk_sum(h: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(head(h).float(), y, ignore_index=-100, reduction="sum")

    total = sum(
        checkpoint(chunk_sum, h, y, use_reentrant=False) if torch.is_grad_enabled() else chunk_sum(h, y)
        for h, y in zip(rows.split(LOSS_CHUNK_ROWS), labels.split(LOSS_CHUNK_ROWS))
    )
    return total / (labels != -100).sum().clamp_min(1)


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = False  # blocks and the loss recompute their forward in backward
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tasks:  # registered last, so the trunk's seeded initialisation is the same without them
            self.task_heads = nn.ModuleDict(
                {t.name: nn.Linear(cfg.hidden_size, len(t.labels), bias=False) for t in cfg.tasks}
            )
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, LoRALinear):  # after its own weights, which apply() reaches first
            module.reset_adapters()

    def logits(self, h: Tensor) -> Tensor:
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    def loss_head(self, task: str | None = None) -> Callable[[Tensor], Tensor]:
        """What maps final hidden states to logits: the LM head, or task ``task``'s head."""
        return self.logits if task is None else self.task_heads[task]

    def hidden(
        self,
        tokens: Tensor,
        noise_seed: int | None = None,
        blocked: BlockedExperts | None = None,
        release: Release | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(the final-normed hidden state, summed auxiliary load-balancing loss of all layers).
        ``release(block, h)`` replaces the output of ``embed``, of each layer and of ``final_norm``
        (what a split run's data owner does to the hidden states it sends out at those blocks)."""
        keep = release or (lambda _, x: x)
        rope = rope_tables(self.cfg, tokens.shape[1], tokens.device)
        h = keep("embed", self.embed(tokens))
        aux = h.new_zeros(())
        for i, layer in enumerate(self.layers):
            h, layer_aux = run_block(layer, h, rope, noise_seed, self.activation_checkpointing, blocked)
            h = keep(i, h)
            aux = aux + layer_aux
        return keep("final_norm", self.final_norm(h)), aux

    def forward(
        self,
        tokens: Tensor,
        noise_seed: int | None = None,
        blocked: BlockedExperts | None = None,
        release: Release | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns (logits, summed auxiliary load-balancing loss of all layers)."""
        h, aux = self.hidden(tokens, noise_seed, blocked, release)
        return self.logits(h), aux

    def losses(
        self,
        tokens: Tensor,
        labels: Tensor,
        noise_seed: int | None = None,
        blocked: BlockedExperts | None = None,
        release: Release | None = None,
        task: str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(mean cross-entropy, summed aux loss) of a batch; with activation checkpointing the loss
        goes through :func:`chunked_cross_entropy` and the logits are never kept. With ``task``,
        the cross-entropy is that task head's, on the positions whose label is not -100 (each
        sequence's last token, see :func:`fedsplit.data.classification_batch`)."""
        h, aux = self.hidden(tokens, noise_seed, blocked, release)
        head = self.loss_head(task)
        if self.activation_checkpointing:
            return chunked_cross_entropy(h, head, labels), aux
        return cross_entropy(head(h), labels), aux


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy; ``labels`` are already shifted, -100 is ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def correct_labels(logits: Tensor, labels: Tensor) -> Tensor:
    """How many labelled positions (labels not -100) the logits' argmax gets right."""
    return ((logits.argmax(-1) == labels) & (labels != -100)).sum()


def training_loss(cfg: ModelConfig, logits: Tensor, labels: Tensor, aux: Tensor) -> Tensor:
    return cross_entropy(logits, labels) + cfg.aux_loss_coef * aux


@lru_cache(maxsize=16)
def parameter_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Shapes of every parameter of the model, by name, computed on the meta device (no memory)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    return {name: p.shape for name, p in model.state_dict().items()}


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
