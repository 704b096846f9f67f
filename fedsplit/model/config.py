"""Model configuration: every number that changes the maths of the MoE transformer."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

LoraTarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "experts", "shared_experts"]
RouterKind = Literal["topk", "soft", "hard", "hierarchical"]


class RouterConfig(BaseModel):
    """How a layer's gate turns its logits into expert weights (``fedsplit.model.moe.route``).

    * ``topk``: softmax over the experts, keep the ``top_k`` largest (Mixtral, Switch).
    * ``soft``: every expert, weighted by the softmax (``top_k`` must equal ``num_experts``).
    * ``hard``: one expert per token drawn by Gumbel-softmax at ``temperature``, weight one in the
      forward, the softmax's gradient in the backward (straight-through; ``top_k`` must be 1); the
      noise is seeded like router jitter, and evaluation takes the argmax.
    * ``hierarchical``: the experts in ``groups`` equal groups; a gate over the groups keeps the
      ``group_top_k`` largest, each kept group's own gate (its experts' rows of the router) keeps
      ``top_k`` of its experts; an expert's weight is its group's weight times its own (a level
      keeping one is not renormalised to one, so that its gate learns from the task).

    ``capacity_factor`` (topk, hierarchical) caps each expert at ``ceil(capacity_factor x
    assignments / reachable experts)`` (token, slot) assignments per micro-batch; the rest are
    dropped, first slots before second ones and earlier tokens first, and pass through the
    residual only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: RouterKind = "topk"
    temperature: float | None = Field(default=None, gt=0, le=1e3, description="hard: the Gumbel-softmax's (default 1)")
    groups: int | None = Field(default=None, gt=0, le=1 << 14, description="hierarchical: groups of experts")
    group_top_k: int | None = Field(default=None, gt=0, description="hierarchical: groups kept per token (default 1)")
    capacity_factor: float | None = Field(default=None, gt=0, le=1 << 10, description="topk, hierarchical")

    @model_validator(mode="after")
    def _check_kind(self) -> RouterConfig:
        allowed = {"hard": {"temperature"}, "hierarchical": {"groups", "group_top_k", "capacity_factor"}}
        allowed["topk"] = {"capacity_factor"}
        for name in ("temperature", "groups", "group_top_k", "capacity_factor"):
            if getattr(self, name) is not None and name not in allowed.get(self.kind, set()):
                raise ValueError(f"router.{name} does not apply to router kind '{self.kind}'")
        if self.kind == "hierarchical" and self.groups is None:
            raise ValueError("router kind 'hierarchical' needs router.groups (how many groups of experts)")
        return self

    @property
    def gumbel_temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    @property
    def groups_kept(self) -> int:
        return 1 if self.group_top_k is None else self.group_top_k


class LoraConfig(BaseModel):
    """Low-rank adapters (LoRA, Hu et al. 2021) on some of the model's linear maps: a target
    ``W x`` becomes ``W x + (alpha / rank) * B (A x)`` with ``A`` (rank x in) and ``B`` (out x rank).
    ``B`` starts at zero, so the adapted model starts as its base. ``experts`` and
    ``shared_experts`` adapt all three projections (w1, w2, w3) of every routed or shared expert.
    ``dropout`` drops each adapter's input in training, ``B A dropout(x)`` (PEFT's
    ``lora_dropout``), with masks seeded per micro-batch (:class:`~fedsplit.model.moe.LoraDropout`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rank: int = Field(gt=0, le=1 << 16)
    alpha: float = Field(gt=0, le=1 << 16)
    targets: tuple[LoraTarget, ...] = Field(min_length=1)
    dropout: float = Field(default=0.0, ge=0, lt=1, description="of each adapter's input in training (PEFT's)")

    @model_serializer(mode="wrap")
    def _without_zero_dropout(self, dump):
        """No dropout is written as before it existed: manifests and hashes of earlier runs stay."""
        out = dump(self)
        if isinstance(out, dict) and not self.dropout:
            out.pop("dropout", None)
        return out

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class TaskHeadConfig(BaseModel):
    """A sequence-classification head on the trunk (``task_heads.NAME.weight``, ``len(labels)`` x
    hidden, no bias, as Hugging Face's ``*ForSequenceClassification`` ``score``): it reads the
    final-normed hidden state of each sequence's last token. A plan's ``tasks`` section sets them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
    labels: tuple[str, ...] = Field(min_length=2, max_length=1 << 16)


class ModelConfig(BaseModel):
    """A Mixtral-family decoder-only MoE transformer.

    Loaded from YAML (``configs/models/*.yaml``); unknown keys are rejected so that a typo
    never silently falls back to a default.
    """

    # Bounds far beyond today's largest open MoE models (vocabularies of ~256k, 7168 hidden, 61
    # layers, 384 experts): a number past them is a typo or a hostile file, not a model.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    vocab_size: int = Field(gt=0, le=1 << 24)
    hidden_size: int = Field(gt=0, le=1 << 17)
    num_layers: int = Field(gt=0, le=1 << 10)
    num_heads: int = Field(gt=0, le=1 << 10)
    num_kv_heads: int = Field(gt=0, le=1 << 10)
    head_dim: int = Field(gt=0, le=1 << 12)
    rope_theta: float = Field(default=10000.0, gt=0, le=1e12)
    rms_norm_eps: float = Field(default=1e-5, gt=0, le=1)
    num_experts: int = Field(gt=0, le=1 << 14)
    top_k: int = Field(gt=0)
    expert_ffn_size: int = Field(gt=0, le=1 << 18)
    num_shared_experts: int = Field(default=0, ge=0, le=1 << 10)
    shared_expert_ffn_size: int | None = Field(default=None, gt=0, le=1 << 20)
    normalize_top_k: bool = True
    router_jitter: float = Field(default=0.0, ge=0.0, lt=1.0)
    router: RouterConfig = Field(default_factory=RouterConfig, description="the gate's kind (default top-k)")
    aux_loss_coef: float = Field(default=0.01, ge=0.0, le=1e3)
    tie_embeddings: bool = False
    qkv_bias: bool = Field(default=False, description="q, k and v projections add a bias (Qwen2-MoE)")
    shared_expert_gate: bool = Field(
        default=False,
        description="scale the shared experts' output per token by sigmoid(Linear(hidden, 1)) (Qwen2-MoE)",
    )
    sliding_window: int | None = Field(
        default=None,
        gt=0,
        le=1 << 30,
        description="a query attends to at most this many latest positions, itself included (Mixtral)",
    )
    init_std: float = Field(default=0.02, gt=0, le=1)
    lora: LoraConfig | None = Field(
        default=None, description="low-rank adapters; a plan's finetune section sets them on its base model"
    )
    tasks: tuple[TaskHeadConfig, ...] = Field(
        default=(), description="classification heads beside the LM head; a plan's tasks section sets them"
    )

    @model_serializer(mode="wrap")
    def _without_defaults_added_later(self, dump):
        """A top-k router, and no task heads, are written as before either existed: files, hashes
        and manifests of earlier runs stay the same."""
        out = dump(self)
        if isinstance(out, dict):
            if self.router == RouterConfig():
                out.pop("router", None)
            if not self.tasks:
                out.pop("tasks", None)
        return out

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        self._check_router(self.router)
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("shared_expert_gate needs shared experts (num_shared_experts is 0)")
        if self.lora is not None:
            self._check_lora(self.lora)
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task heads must have distinct names, got {', '.join(names)}")
        return self

    def _check_router(self, router: RouterConfig) -> None:
        e, k = self.num_experts, self.top_k
        if router.kind == "soft" and k != e:
            raise ValueError(f"router kind 'soft' weights every expert: top_k must be num_experts ({e}), not {k}")
        if router.kind == "hard" and k != 1:
            raise ValueError(f"router kind 'hard' sends each token to one expert: top_k must be 1, not {k}")
        if router.kind == "hierarchical":
            g = router.groups or 1
            if e % g:
                raise ValueError(f"router.groups ({g}) must divide num_experts ({e}) into equal groups")
            if router.groups_kept > g:
                raise ValueError(f"router.group_top_k ({router.groups_kept}) exceeds router.groups ({g})")
            if k > e // g:
                raise ValueError(f"top_k ({k}) exceeds the {e // g} experts of a group (num_experts / router.groups)")

    @property
    def routed_slots(self) -> int:
        """Experts each token is sent to: ``top_k``, times the groups kept for a hierarchical gate."""
        return self.top_k * (self.router.groups_kept if self.router.kind == "hierarchical" else 1)

    @property
    def group_size(self) -> int:
        """Experts per group of a hierarchical gate (all of them for any other kind)."""
        return self.num_experts // (self.router.groups or 1) if self.router.kind == "hierarchical" else self.num_experts

    def _check_lora(self, lora: LoraConfig) -> None:
        if "shared_experts" in lora.targets and not self.num_shared_experts:
            raise ValueError("LoRA target 'shared_experts': this model has no shared experts (num_shared_experts is 0)")
        d, hd = self.hidden_size, self.head_dim
        sizes = {
            "q_proj": (d, self.num_heads * hd),
            "k_proj": (d, self.num_kv_heads * hd),
            "v_proj": (d, self.num_kv_heads * hd),
            "o_proj": (self.num_heads * hd, d),
            "experts": (d, self.expert_ffn_size),
            "shared_experts": (d, self.shared_ffn_size),
        }
        for target in lora.targets:
            if lora.rank > min(sizes[target]):
                raise ValueError(
                    f"LoRA rank {lora.rank} is larger than {target}, whose smallest side is {min(sizes[target])} "
                    f"({sizes[target][0]} x {sizes[target][1]}): a rank above it adds nothing"
                )

    def adapts(self, target: str) -> LoraConfig | None:
        """The adapters of ``target`` (a :data:`LoraTarget`), or None when it has none."""
        return self.lora if self.lora is not None and target in self.lora.targets else None

    @property
    def adapted_qkv(self) -> tuple[str, ...]:
        """The q/k/v projections with adapters, in that order: their ``A`` reads a layer's input."""
        return tuple(p for p in ("q_proj", "k_proj", "v_proj") if self.adapts(p))

    @property
    def base(self) -> ModelConfig:
        """This model without its adapters and task heads: what a base checkpoint holds."""
        if self.lora is None and not self.tasks:
            return self
        return self.model_copy(update={"lora": None, "tasks": ()})

    def task(self, name: str) -> TaskHeadConfig:
        """The task head named ``name`` (KeyError if there is none)."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def heads_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def shared_ffn_size(self) -> int:
        """Intermediate size of the always-active shared expert block (DeepSeek-MoE style:
        ``num_shared_experts`` experts fused into one SwiGLU of their summed width)."""
        return self.num_shared_experts * (self.shared_expert_ffn_size or self.expert_ffn_size)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        with open(path, encoding="utf-8") as f:
            return cls.model_validate(yaml.safe_load(f))
