"""Model configuration: every number that changes the maths of the MoE transformer."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """A Mixtral-family decoder-only MoE transformer.

    Loaded from YAML (``configs/models/*.yaml``); unknown keys are rejected so that a typo
    never silently falls back to a default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    num_experts: int = Field(gt=0)
    top_k: int = Field(gt=0)
    expert_ffn_size: int = Field(gt=0)
    num_shared_experts: int = Field(default=0, ge=0)
    shared_expert_ffn_size: int | None = Field(default=None, gt=0)
    normalize_top_k: bool = True
    router_jitter: float = Field(default=0.0, ge=0.0, lt=1.0)
    aux_loss_coef: float = Field(default=0.01, ge=0.0)
    tie_embeddings: bool = False
    qkv_bias: bool = Field(default=False, description="q, k and v projections add a bias (Qwen2-MoE)")
    shared_expert_gate: bool = Field(
        default=False,
        description="scale the shared experts' output per token by sigmoid(Linear(hidden, 1)) (Qwen2-MoE)",
    )
    sliding_window: int | None = Field(
        default=None,
        gt=0,
        description="a query attends to at most this many latest positions, itself included (Mixtral)",
    )
    init_std: float = Field(default=0.02, gt=0)

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("shared_expert_gate needs shared experts (num_shared_experts is 0)")
        return self

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
