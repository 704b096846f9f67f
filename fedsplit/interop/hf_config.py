"""Hugging Face ``config.json`` to :class:`~fedsplit.model.ModelConfig` and back.

Every field that changes the maths is either mapped or refused with its name; fields that only
matter for inference servers or tokenizers (``max_position_embeddings``, ``use_cache``, token
ids) are ignored. Supported architectures:

* ``MixtralForCausalLM``: top-k softmax router, always renormalised; optional sliding window.
* ``Qwen2MoeForCausalLM``: q/k/v biases, ``norm_topk_prob``, one shared expert behind a sigmoid
  gate, in every layer (``decoder_sparse_step`` 1, no ``mlp_only_layers``).
* ``GraniteMoeSharedForCausalLM``: shared experts added without a gate (DeepSeek-MoE's way,
  fedsplit's default); its top-k softmax is always renormalised, and its embedding, residual
  and logit multipliers must be 1 (fedsplit has none) and its attention scale 1/sqrt(head_dim).
* ``LlamaForCausalLM``: a dense SwiGLU model, read as a one-expert MoE (the router's softmax over
  one expert is exactly 1), the input of ``fedsplit upcycle``.

Two training-only settings travel as well as they can: ``router_aux_loss_coef`` becomes
``aux_loss_coef`` although fedsplit sums a per-layer (Megatron-style) balancing loss where
transformers pools the layers, and router jitter, which Qwen2-MoE lacks, is dropped on export.
Neither changes the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..model import ModelConfig
from .errors import CheckpointError

MIXTRAL, QWEN2_MOE, LLAMA = "MixtralForCausalLM", "Qwen2MoeForCausalLM", "LlamaForCausalLM"
GRANITE_SHARED = "GraniteMoeSharedForCausalLM"
ARCHITECTURES = (MIXTRAL, QWEN2_MOE, GRANITE_SHARED, LLAMA)
_MODEL_TYPE = {MIXTRAL: "mixtral", QWEN2_MOE: "qwen2_moe", GRANITE_SHARED: "granitemoeshared", LLAMA: "llama"}
_NEUTRAL_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "logits_scaling")


def architecture_of(hf: dict[str, Any], file: Path) -> str:
    names = hf.get("architectures") or []
    supported = [a for a in names if a in ARCHITECTURES]
    if not supported:
        raise CheckpointError(
            f"unsupported architecture {', '.join(names) or '(none given)'}: fedsplit reads {', '.join(ARCHITECTURES)}",
            file=file,
            field="architectures",
        )
    return supported[0]


def config_from_hf(hf: dict[str, Any], file: Path) -> tuple[ModelConfig, str]:
    """The fedsplit config equivalent to a HF ``config.json`` and the architecture it names."""
    arch = architecture_of(hf, file)
    fields = _Fields(hf, file)
    fields.require("hidden_act", lambda v: v == "silu", "only SwiGLU with silu is supported")
    fields.require("attention_dropout", lambda v: not v, "attention dropout changes training maths; set it to 0.0")
    fields.require("mlp_bias", lambda v: not v, "fedsplit's feed-forward layers have no biases")
    fields.require(
        "pretraining_tp", lambda v: v in (None, 1), "tensor-parallel slicing of the projections is not supported"
    )
    heads = fields.get("num_attention_heads")
    common = dict(
        vocab_size=fields.get("vocab_size"),
        hidden_size=fields.get("hidden_size"),
        num_layers=fields.get("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=fields.get("num_key_value_heads", heads) or heads,
        head_dim=fields.get("head_dim", None) or fields.get("hidden_size") // heads,
        rope_theta=_rope_theta(fields),
        rms_norm_eps=fields.get("rms_norm_eps"),
        tie_embeddings=bool(fields.get("tie_word_embeddings", False)),
        init_std=fields.get("initializer_range", 0.02),
    )
    if arch == MIXTRAL:
        specific = dict(
            num_experts=fields.get("num_local_experts"),
            top_k=fields.get("num_experts_per_tok"),
            expert_ffn_size=fields.get("intermediate_size"),
            normalize_top_k=True,
            router_jitter=fields.get("router_jitter_noise", 0.0),
            aux_loss_coef=fields.get("router_aux_loss_coef", 0.0),
            sliding_window=fields.get("sliding_window", None),
        )
    elif arch == QWEN2_MOE:
        fields.require("decoder_sparse_step", lambda v: v in (None, 1), "every layer must be a MoE layer (1)")
        fields.require("mlp_only_layers", lambda v: not v, "every layer must be a MoE layer (no dense-only layers)")
        fields.require("shared_expert_intermediate_size", lambda v: v > 0, "a Qwen2-MoE layer needs its shared expert")
        specific = dict(
            num_experts=fields.get("num_experts"),
            top_k=fields.get("num_experts_per_tok"),
            expert_ffn_size=fields.get("moe_intermediate_size"),
            normalize_top_k=bool(fields.get("norm_topk_prob", False)),
            num_shared_experts=1,
            shared_expert_ffn_size=fields.get("shared_expert_intermediate_size"),
            shared_expert_gate=True,
            qkv_bias=bool(fields.get("qkv_bias", True)),
            aux_loss_coef=fields.get("router_aux_loss_coef", 0.0),
            sliding_window=_qwen_window(fields),
        )
    elif arch == GRANITE_SHARED:
        for name in _NEUTRAL_MULTIPLIERS:
            fields.require(name, lambda v: v == 1, "fedsplit's model has no such multiplier; it must be 1.0")
        scale = common["head_dim"] ** -0.5
        fields.require(
            "attention_multiplier",
            lambda v: abs(v - scale) <= 1e-6 * scale,
            f"fedsplit scales attention scores by 1/sqrt(head_dim) = {scale!r}",
        )
        fields.require("attention_bias", lambda v: not v, "fedsplit's attention has no biases in this architecture")
        shared = fields.get("shared_intermediate_size", 0)
        specific = dict(
            num_experts=fields.get("num_local_experts"),
            top_k=fields.get("num_experts_per_tok"),
            expert_ffn_size=fields.get("intermediate_size"),
            normalize_top_k=True,
            num_shared_experts=1 if shared else 0,
            shared_expert_ffn_size=shared or None,
            aux_loss_coef=fields.get("router_aux_loss_coef", 0.0),
        )
    else:
        fields.require("attention_bias", lambda v: not v, "fedsplit's attention has no o_proj bias")
        specific = dict(num_experts=1, top_k=1, expert_ffn_size=fields.get("intermediate_size"), aux_loss_coef=0.0)
    try:
        return ModelConfig(**common, **specific), arch
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise CheckpointError(
            f"the config does not describe a model fedsplit can build: {problems}", file=file
        ) from None


def _rope_theta(fields: _Fields) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (4)."""
    params = fields.get("rope_parameters", None) or {}
    scaling = fields.get("rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise CheckpointError(
            f"RoPE type {kind!r} is not supported (only the default rotary embedding)",
            file=fields.file,
            field="rope_parameters.rope_type" if params else "rope_scaling",
        )
    return float(params.get("rope_theta") or fields.get("rope_theta", 10000.0))


def _qwen_window(fields: _Fields) -> int | None:
    """Qwen2-MoE chooses sliding or full attention per layer; fedsplit has one kind for all."""
    if not fields.get("use_sliding_window", False):
        return None
    kinds = set(fields.get("layer_types", None) or ["sliding_attention"])
    if kinds == {"full_attention"}:
        return None
    if kinds != {"sliding_attention"}:
        raise CheckpointError(
            "mixes sliding-window and full-attention layers; fedsplit uses one kind for every layer",
            file=fields.file,
            field="layer_types",
        )
    return fields.get("sliding_window")


class _Fields:
    """Reads a config dict, naming the field in every error."""

    def __init__(self, hf: dict[str, Any], file: Path):
        self.hf, self.file = hf, file

    _MISSING = object()

    def get(self, name: str, default: Any = _MISSING) -> Any:
        if name in self.hf:
            return self.hf[name]
        if default is self._MISSING:
            raise CheckpointError("missing from config.json", file=self.file, field=name)
        return default

    def require(self, name: str, ok, why: str) -> None:
        if name in self.hf and not ok(self.hf[name]):
            raise CheckpointError(f"{self.hf[name]!r} is not supported: {why}", file=self.file, field=name)


def hf_architecture(cfg: ModelConfig) -> str:
    """The HF architecture that computes exactly what ``cfg`` does, or an error naming the field
    that no supported architecture can express."""
    if cfg.router.kind == "hierarchical":
        raise CheckpointError(
            "no supported HF architecture has a hierarchical router (a gate over groups of experts)",
            field="router.kind",
        )
    if cfg.router.capacity_factor is not None:
        raise CheckpointError(
            "no supported HF architecture drops tokens over an expert's capacity, so the exported model "
            "would compute another function",
            field="router.capacity_factor",
        )
    if cfg.shared_expert_gate:
        return QWEN2_MOE
    if cfg.qkv_bias:
        raise CheckpointError(
            "no supported HF architecture has q/k/v biases without a gated shared expert (Qwen2-MoE): "
            "set shared_expert_gate: true or qkv_bias: false",
            field="qkv_bias",
        )
    arch = GRANITE_SHARED if cfg.num_shared_experts else MIXTRAL
    if not cfg.normalize_top_k:
        raise CheckpointError(
            f"{arch} always renormalises the top-k weights; normalize_top_k must be true "
            "(or shared_expert_gate: true, for Qwen2-MoE)",
            field="normalize_top_k",
        )
    if arch == GRANITE_SHARED and cfg.sliding_window is not None:
        raise CheckpointError(
            f"{arch}, the HF architecture with ungated shared experts, has no sliding window", field="sliding_window"
        )
    return arch


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """``config.json`` of the HF architecture that computes what ``cfg`` does."""
    arch = hf_architecture(cfg)
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": _MODEL_TYPE[arch],
        "dtype": "float32",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.init_std,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "num_experts_per_tok": cfg.top_k,
        "router_aux_loss_coef": cfg.aux_loss_coef,
    }
    if arch == MIXTRAL:
        hf.update(
            num_local_experts=cfg.num_experts,
            intermediate_size=cfg.expert_ffn_size,
            router_jitter_noise=cfg.router_jitter,
            sliding_window=cfg.sliding_window,
        )
    elif arch == GRANITE_SHARED:
        hf.update(
            num_local_experts=cfg.num_experts,
            intermediate_size=cfg.expert_ffn_size,
            shared_intermediate_size=cfg.shared_ffn_size,
            attention_bias=False,
            attention_multiplier=cfg.head_dim**-0.5,
            **dict.fromkeys(_NEUTRAL_MULTIPLIERS, 1.0),
        )
    else:
        window = cfg.sliding_window is not None
        hf.update(
            num_experts=cfg.num_experts,
            moe_intermediate_size=cfg.expert_ffn_size,
            intermediate_size=cfg.shared_ffn_size,
            shared_expert_intermediate_size=cfg.shared_ffn_size,
            norm_topk_prob=cfg.normalize_top_k or cfg.router.kind == "hard",  # hard: weight one
            qkv_bias=cfg.qkv_bias,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=window,
            sliding_window=cfg.sliding_window,
            max_window_layers=cfg.num_layers,
            layer_types=["sliding_attention" if window else "full_attention"] * cfg.num_layers,
        )
    return hf
