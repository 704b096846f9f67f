"""Where each fedsplit tensor lives in a Hugging Face checkpoint, and the HF names to write.

Two on-disk layouts are read:

* per expert (``...experts.3.w1.weight`` in Mixtral, ``...experts.3.gate_proj.weight`` in
  Qwen2-MoE): what published checkpoints hold and what ``save_pretrained`` writes in transformers
  5.24, which converts its fused in-memory tensors back on save;
* fused (``...mlp.experts.gate_up_proj`` of shape ``(E, 2F, D)`` and ``...mlp.experts.down_proj``
  of shape ``(E, D, F)``): transformers 5's in-memory layout. Expert ``e``'s ``w1`` is
  ``gate_up_proj[e, :F]``, its ``w3`` ``gate_up_proj[e, F:]`` and its ``w2`` ``down_proj[e]``.

Granite-MoE-Shared stores its experts fused on disk as well (``block_sparse_moe.input_linear``,
``(E, 2F, D)``, gate rows first; ``output_linear``, ``(E, D, F)``) and its shared expert as one
``shared_mlp.input_linear`` of shape ``(2F_s, D)``; a fedsplit tensor is a :class:`Stored` index
into them, and an export writes the fused tensors back whole.

Exports use the per-expert layout where the architecture has one, which every transformers
version loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..model import ModelConfig
from .errors import CheckpointError
from .hf_config import GRANITE_SHARED, LLAMA, MIXTRAL, QWEN2_MOE

# Buffers some older checkpoints carry; they are recomputed from the config, never learned.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Stored:
    """A stored tensor and, for fused layouts, the leading index that selects ours inside it."""

    key: str
    index: tuple[int | slice, ...] = ()


ZEROS = None  # a fedsplit tensor with no stored counterpart: the router of a one-expert dense model


def hf_names(cfg: ModelConfig, arch: str) -> dict[str, Stored | None]:
    """fedsplit name -> where an export of ``arch`` stores it, or :data:`ZEROS` where HF stores nothing."""
    names: dict[str, Stored | None] = {
        "embed.weight": Stored("model.embed_tokens.weight"),
        "final_norm.weight": Stored("model.norm.weight"),
    }
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = Stored("lm_head.weight")
    attn_params = ("weight", "bias") if cfg.qkv_bias else ("weight",)
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        names[f"{ours}.attn_norm.weight"] = Stored(f"{hf}.input_layernorm.weight")
        names[f"{ours}.ffn_norm.weight"] = Stored(f"{hf}.post_attention_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj"):
            for p in attn_params:
                names[f"{ours}.attention.{proj}.{p}"] = Stored(f"{hf}.self_attn.{proj}.{p}")
        names[f"{ours}.attention.o_proj.weight"] = Stored(f"{hf}.self_attn.o_proj.weight")
        experts = f"{ours}.moe.experts"
        if arch == LLAMA:
            names[f"{ours}.moe.router.weight"] = ZEROS
            names.update(_swiglu(f"{experts}.0", f"{hf}.mlp", "gate_proj", "down_proj", "up_proj"))
        elif arch == MIXTRAL:
            names[f"{ours}.moe.router.weight"] = Stored(f"{hf}.block_sparse_moe.gate.weight")
            for e in range(cfg.num_experts):
                names.update(_swiglu(f"{experts}.{e}", f"{hf}.block_sparse_moe.experts.{e}", "w1", "w2", "w3"))
        elif arch == GRANITE_SHARED:
            moe, f = f"{hf}.block_sparse_moe", cfg.expert_ffn_size
            names[f"{ours}.moe.router.weight"] = Stored(f"{moe}.router.layer.weight")
            for e in range(cfg.num_experts):
                names.update(
                    _fused_swiglu(
                        f"{experts}.{e}", f"{moe}.input_linear.weight", f"{moe}.output_linear.weight", f, (e,)
                    )
                )
            names.update(
                _fused_swiglu(
                    f"{ours}.moe.shared_experts",
                    f"{hf}.shared_mlp.input_linear.weight",
                    f"{hf}.shared_mlp.output_linear.weight",
                    cfg.shared_ffn_size,
                )
            )
        else:
            names[f"{ours}.moe.router.weight"] = Stored(f"{hf}.mlp.gate.weight")
            for e in range(cfg.num_experts):
                names.update(_swiglu(f"{experts}.{e}", f"{hf}.mlp.experts.{e}", "gate_proj", "down_proj", "up_proj"))
            names.update(
                _swiglu(f"{ours}.moe.shared_experts", f"{hf}.mlp.shared_expert", "gate_proj", "down_proj", "up_proj")
            )
            names[f"{ours}.moe.shared_experts.gate.weight"] = Stored(f"{hf}.mlp.shared_expert_gate.weight")
    return names


def _swiglu(ours: str, hf: str, w1: str, w2: str, w3: str) -> dict[str, Stored]:
    return {
        f"{ours}.w1.weight": Stored(f"{hf}.{w1}.weight"),
        f"{ours}.w2.weight": Stored(f"{hf}.{w2}.weight"),
        f"{ours}.w3.weight": Stored(f"{hf}.{w3}.weight"),
    }


def _fused_swiglu(ours: str, gate_up: str, down: str, ffn: int, lead: tuple[int, ...] = ()) -> dict[str, Stored]:
    """A SwiGLU stored as ``gate_up`` (``w1`` rows, then ``w3`` rows) and ``down`` (``w2``),
    at index ``lead`` of stacked experts."""
    return {
        f"{ours}.w1.weight": Stored(gate_up, (*lead, slice(0, ffn))),
        f"{ours}.w3.weight": Stored(gate_up, (*lead, slice(ffn, 2 * ffn))),
        f"{ours}.w2.weight": Stored(down, lead),
    }


def _fused(cfg: ModelConfig, ours: str) -> Stored | None:
    """The transformers-5 fused location of a router or routed-expert tensor, if it is one."""
    parts = ours.split(".")
    prefix = f"model.layers.{parts[1]}.mlp"
    if parts[2:] == ["moe", "router", "weight"]:
        return Stored(f"{prefix}.gate.weight")
    if parts[2:4] != ["moe", "experts"]:
        return None
    expert = _fused_swiglu(
        ".".join(parts[:5]),
        f"{prefix}.experts.gate_up_proj",
        f"{prefix}.experts.down_proj",
        cfg.expert_ffn_size,
        (int(parts[4]),),
    )
    return expert.get(ours)


def locate(cfg: ModelConfig, arch: str, keys: set[str], file: Path) -> dict[str, Stored | None]:
    """Where every fedsplit tensor is stored among ``keys``. Refuses a checkpoint that lacks a
    tensor or holds one fedsplit has no place for (a bias, an extra norm): dropping it would
    silently change the maths."""
    found: dict[str, Stored | None] = {}
    for ours, stored in hf_names(cfg, arch).items():
        if stored is ZEROS or stored.key in keys:
            found[ours] = stored
            continue
        fused = _fused(cfg, ours) if arch in (MIXTRAL, QWEN2_MOE) else None
        if fused is None or fused.key not in keys:
            raise CheckpointError(f"the checkpoint has no tensor {stored.key!r}", file=file, field=stored.key)
        found[ours] = fused
    used = {s.key for s in found.values() if s is not None}
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = sorted(k for k in keys - used - tied_head if not k.endswith(_IGNORED_SUFFIXES))
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise CheckpointError(
            f"tensors fedsplit's {arch} mapping has no place for: {', '.join(extra[:5])}{more}",
            file=file,
            field=extra[0],
        )
    return found


def to_hf(cfg: ModelConfig, arch: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A fedsplit state dict under the names and layout an export of ``arch`` writes."""
    names = hf_names(cfg, arch)
    missing = sorted(names.keys() - state.keys())
    if missing:
        raise CheckpointError(f"the state dict lacks {', '.join(missing[:5])}", field=missing[0])
    pieces: dict[str, list[tuple[tuple[int | slice, ...], Tensor]]] = {}
    for ours, stored in names.items():
        if stored is not ZEROS:
            pieces.setdefault(stored.key, []).append((stored.index, state[ours]))
    return {key: parts[0][1] if parts[0][0] == () else _assemble(parts) for key, parts in pieces.items()}


def _assemble(parts: list[tuple[tuple[int | slice, ...], Tensor]]) -> Tensor:
    """The fused tensor whose indexed parts are ``parts``; each leading dimension is as long as
    the largest index into it, and every element must be covered once."""
    lead = len(parts[0][0])
    sizes = [
        max(i + 1 if isinstance(i, int) else i.stop for i in (index[d] for index, _ in parts)) for d in range(lead)
    ]
    kept = sum(isinstance(i, slice) for i in parts[0][0])
    first = parts[0][1]
    fused = first.new_empty((*sizes, *first.shape[kept:]))
    for index, t in parts:
        fused[index] = t
    if sum(t.numel() for _, t in parts) != fused.numel():
        raise CheckpointError(f"the parts of a fused tensor do not cover it ({len(parts)} parts)")
    return fused
