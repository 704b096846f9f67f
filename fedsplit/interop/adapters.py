"""LoRA adapters out of a fine-tuned model: merged into the base weights (a plain checkpoint)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..model import ModelConfig, is_adapter


def merge_adapters(cfg: ModelConfig, state: Mapping[str, Tensor]) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The model without adapters (its task heads kept) and its weights with every adapter folded
    in, ``W + (alpha / rank) B A`` (what :class:`~fedsplit.model.LoRALinear` computes), in fp32 and
    cast back to ``W``'s dtype."""
    if cfg.lora is None:
        return cfg, dict(state)
    merged = {k: v for k, v in state.items() if not is_adapter(k)}
    for name in state:
        if name.endswith(".lora_A.weight"):
            prefix = name.removesuffix(".lora_A.weight")
            a, b, w = state[name].float(), state[f"{prefix}.lora_B.weight"].float(), state[f"{prefix}.weight"]
            merged[f"{prefix}.weight"] = (w.float() + cfg.lora.scaling * (b @ a)).to(w.dtype)
    return cfg.model_copy(update={"lora": None}), merged
