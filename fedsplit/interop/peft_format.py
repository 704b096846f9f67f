"""LoRA adapters as the ``peft`` library saves them: ``adapter_config.json`` and
``adapter_model.safetensors``, which ``PeftModel.from_pretrained`` loads onto the transformers
model of the base (see :func:`~.hf_config.hf_architecture`).

Names follow transformers 5's in-memory modules, which is what PEFT adapts: attention and
shared-expert projections are ``nn.Linear`` modules (``target_modules``); routed experts are
fused 3-D parameters, ``experts.gate_up_proj`` ``(E, 2F, D)`` and ``experts.down_proj``
``(E, D, F)``, which PEFT adapts through ``target_parameters``: one ``lora_A`` of ``(E r, in)``
whose rows ``e r .. (e + 1) r`` are expert ``e``'s ``A``, one ``lora_B`` of ``(out, r E)`` whose
columns ``e, e + E, e + 2E, ...`` are its ``B``. Two parameters of one module nest: the first
listed is the inner wrapper (``experts.base_layer``).

Where one fused tensor holds two of fedsplit's adapted maps with the same input (``gate_up_proj``:
``w1`` rows then ``w3`` rows), PEFT gets one adapter of rank ``2r``: ``A = [A1; A3]`` and
``B = [[B1, 0], [0, B3]]``, whose product is exactly ``[B1 A1; B3 A3]``; its alpha doubles too,
so that ``alpha / r`` is unchanged (``rank_pattern``, ``alpha_pattern``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..model import ModelConfig
from .errors import CheckpointError
from .hf_config import GRANITE_SHARED, QWEN2_MOE, hf_architecture

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def peft_adapter(cfg: ModelConfig, state: Mapping[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """The ``adapter_config.json`` fields (but the base's path) and the tensors of ``cfg``'s
    adapters in ``state``."""
    lora = cfg.lora
    if lora is None:
        raise CheckpointError("the model has no LoRA adapters to export: use --format hf", field="finetune")
    arch = hf_architecture(cfg.base)
    moe = "block_sparse_moe" if arch == GRANITE_SHARED else "mlp"
    tensors: dict[str, Tensor] = {}
    modules: list[str] = []
    doubled: list[str] = []

    def adapter(name: str) -> tuple[Tensor, Tensor]:
        return state[f"{name}.lora_A.weight"].float(), state[f"{name}.lora_B.weight"].float()

    def put(module: str, a: Tensor, b: Tensor) -> None:
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b.contiguous()

    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if cfg.adapts(proj):
                put(f"{hf}.self_attn.{proj}", *adapter(f"{ours}.attention.{proj}"))
                modules.append(f"self_attn.{proj}")
        if cfg.adapts("experts"):
            experts = [f"{ours}.moe.experts.{e}" for e in range(cfg.num_experts)]
            gate_up = [_fused_gate_up(adapter(f"{x}.w1"), adapter(f"{x}.w3")) for x in experts]
            down = [adapter(f"{x}.w2") for x in experts]
            put(f"{hf}.{moe}.experts.base_layer", *_stack_experts(gate_up))
            put(f"{hf}.{moe}.experts", *_stack_experts(down))
            doubled.append("experts.gate_up_proj")
        if cfg.adapts("shared_experts"):
            shared = f"{ours}.moe.shared_experts"
            if arch == QWEN2_MOE:
                for ours_w, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                    put(f"{hf}.mlp.shared_expert.{theirs}", *adapter(f"{shared}.{ours_w}"))
                    modules.append(f"shared_expert.{theirs}")
            else:
                put(f"{hf}.shared_mlp.input_linear", *_fused_gate_up(adapter(f"{shared}.w1"), adapter(f"{shared}.w3")))
                put(f"{hf}.shared_mlp.output_linear", *adapter(f"{shared}.w2"))
                modules += ["shared_mlp.input_linear", "shared_mlp.output_linear"]
                doubled.append("shared_mlp.input_linear")
    doubled = sorted(set(doubled))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        # The adapter is written for inference (inference_mode), where dropout does nothing; PEFT
        # also refuses any on the fused experts' target_parameters ("lora.ParamWrapper does not
        # work with lora_dropout != 0"), so a fine-tune's training dropout is not carried over.
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": sorted(set(modules)),
        "target_parameters": [f"{moe}.experts.gate_up_proj", f"{moe}.experts.down_proj"]
        if cfg.adapts("experts")
        else None,
        "rank_pattern": dict.fromkeys(doubled, 2 * lora.rank),
        "alpha_pattern": dict.fromkeys(doubled, 2 * lora.alpha),
    }
    return config, tensors


def _fused_gate_up(w1: tuple[Tensor, Tensor], w3: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """One rank-2r adapter of ``[w1; w3]`` from the rank-r adapters of ``w1`` and ``w3``."""
    (a1, b1), (a3, b3) = w1, w3
    return torch.cat([a1, a3]), torch.block_diag(b1, b3)


def _stack_experts(adapters: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """PEFT's ``(E r, in)`` and ``(out, r E)`` factors of per-expert ``(A_e, B_e)``."""
    a = torch.cat([a for a, _ in adapters])
    b = torch.stack([b for _, b in adapters], dim=-1)  # (out, r, E): column j E + e is B_e[:, j]
    return a, b.reshape(b.shape[0], -1)


def save_peft(cfg: ModelConfig, state: Mapping[str, Tensor], out: Path, base: str) -> Path:
    """Write ``cfg``'s adapters in ``state`` as a PEFT adapter directory for the base model at
    ``base`` (its ``base_model_name_or_path``)."""
    config, tensors = peft_adapter(cfg, state)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": base}, indent=2))
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return out
