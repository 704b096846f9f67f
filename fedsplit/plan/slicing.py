"""Map units onto the monolithic model's parameter names, slice them out, and put them back.

A partition's state dict uses the monolithic names: a whole tensor keeps its name
(``layers.2.moe.experts.5.w1.weight``); a head group's share of an attention projection is named
with the rows or columns it holds (``layers.3.attention.q_proj.weight[0:32]``, ``layers.3.attention.q_proj.bias[0:32]``,
``layers.3.attention.o_proj.weight[:, 0:32]``). Reassembly is the exact inverse.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import TASK_HEADS, ModelConfig, parameter_shapes
from .units import Unit

_KEY = re.compile(r"^(?P<name>[^\[]+)\[(?P<cols>:, )?(?P<start>\d+):(?P<stop>\d+)\]$")


@dataclass(frozen=True)
class TensorSlice:
    """A whole parameter (``dim is None``) or a range of its rows (dim 0) or columns (dim 1)."""

    name: str
    dim: int | None = None
    start: int = 0
    stop: int = 0

    @property
    def key(self) -> str:
        if self.dim is None:
            return self.name
        cols = ":, " if self.dim == 1 else ""
        return f"{self.name}[{cols}{self.start}:{self.stop}]"

    def take(self, full: Tensor) -> Tensor:
        if self.dim is None:
            return full
        return full.narrow(self.dim, self.start, self.stop - self.start)

    @classmethod
    def parse(cls, key: str) -> TensorSlice:
        m = _KEY.match(key)
        if not m:
            return cls(key)
        return cls(m["name"], 1 if m["cols"] else 0, int(m["start"]), int(m["stop"]))


def kv_runs(groups: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive KV heads folded into half-open runs: {0, 1, 3} -> [(0, 2), (3, 4)]."""
    runs: list[tuple[int, int]] = []
    for g in sorted(groups):
        if runs and runs[-1][1] == g:
            runs[-1] = (runs[-1][0], g + 1)
        else:
            runs.append((g, g + 1))
    return runs


def head_run_slices(cfg: ModelConfig, layer: int, run: tuple[int, int]) -> dict[str, TensorSlice]:
    """The projection slices of KV heads ``run`` (half-open), keyed by their parameter's name in
    :class:`~fedsplit.model.Attention` (``q_proj.weight``, ``q_proj.bias``, ...). Biases are cut
    along the same rows as their weights."""
    g0, g1 = run
    hd, per = cfg.head_dim, cfg.heads_per_kv_head
    prefix = f"layers.{layer}.attention"
    rows = {"q_proj": (g0 * per * hd, g1 * per * hd), "k_proj": (g0 * hd, g1 * hd), "v_proj": (g0 * hd, g1 * hd)}
    params = ("weight", "bias") if cfg.qkv_bias else ("weight",)
    out = {f"{proj}.{p}": TensorSlice(f"{prefix}.{proj}.{p}", 0, *r) for proj, r in rows.items() for p in params}
    out["o_proj.weight"] = TensorSlice(f"{prefix}.o_proj.weight", 1, *rows["q_proj"])
    # LoRA: a head group holds the factor that is cut like its projection: the rows of q/k/v's B,
    # the columns of o_proj's A. The factors that act on every head at once (q/k/v's A, o_proj's
    # B) are the layer block's (hub_adapter_slices), so that head groups on several organisations
    # never share a tensor.
    for proj, r in rows.items():
        if cfg.adapts(proj):
            out[f"{proj}.lora_B.weight"] = TensorSlice(f"{prefix}.{proj}.lora_B.weight", 0, *r)
    if cfg.adapts("o_proj"):
        out["o_proj.lora_A.weight"] = TensorSlice(f"{prefix}.o_proj.lora_A.weight", 1, *rows["q_proj"])
    return out


def hub_adapter_slices(cfg: ModelConfig, layer: int) -> dict[str, TensorSlice]:
    """The attention adapter factors that act on all of a layer's heads, held with its block:
    keyed by their target (``q_proj``: its ``A``, ..., ``o_proj``: its ``B``)."""
    prefix = f"layers.{layer}.attention"
    out = {p: TensorSlice(f"{prefix}.{p}.lora_A.weight") for p in cfg.adapted_qkv}
    if cfg.adapts("o_proj"):
        out["o_proj"] = TensorSlice(f"{prefix}.o_proj.lora_B.weight")
    return out


def _swiglu(prefix: str, adapted: bool) -> list[TensorSlice]:
    """An expert's three projections, each with its LoRA A and B when the experts are adapted."""
    parts = ("weight", "lora_A.weight", "lora_B.weight") if adapted else ("weight",)
    return [TensorSlice(f"{prefix}.{w}.{part}") for w in ("w1", "w2", "w3") for part in parts]


def unit_slices(cfg: ModelConfig, units: Iterable[Unit]) -> list[TensorSlice]:
    """The tensors (or tensor slices) that hold a set of units' parameters."""
    out: list[TensorSlice] = []
    kv: dict[int, list[int]] = defaultdict(list)
    for u in sorted(units):
        if u.kind == "embed":
            out.append(TensorSlice("embed.weight"))
        elif u.kind == "final_norm":
            out.append(TensorSlice("final_norm.weight"))
        elif u.kind == "lm_head":
            if not cfg.tie_embeddings:
                out.append(TensorSlice("lm_head.weight"))
        elif u.kind == "task":
            out.append(TensorSlice(f"{TASK_HEADS}.{u.name}.weight"))
        elif u.kind == "router":
            p = f"layers.{u.layer}"
            out += [
                TensorSlice(f"{p}.attn_norm.weight"),
                TensorSlice(f"{p}.ffn_norm.weight"),
                TensorSlice(f"{p}.moe.router.weight"),
                *hub_adapter_slices(cfg, u.layer).values(),
            ]
            if cfg.router.kind == "hierarchical":
                out.append(TensorSlice(f"{p}.moe.group_router.weight"))
        elif u.kind == "kv":
            kv[u.layer].append(u.index)
        elif u.kind == "expert":
            out += _swiglu(f"layers.{u.layer}.moe.experts.{u.index}", cfg.adapts("experts") is not None)
        elif u.kind == "shared_experts":
            out += _swiglu(f"layers.{u.layer}.moe.shared_experts", cfg.adapts("shared_experts") is not None)
            if cfg.shared_expert_gate:
                out.append(TensorSlice(f"layers.{u.layer}.moe.shared_experts.gate.weight"))
    for layer, groups in sorted(kv.items()):
        for run in kv_runs(groups):
            out += head_run_slices(cfg, layer, run).values()
    return out


def unit_parameter_count(cfg: ModelConfig, units: Iterable[Unit], leave_out: frozenset[str] = frozenset()) -> int:
    """Elements of the units' parameters, less those of the parameters named in ``leave_out``."""
    shapes = parameter_shapes(cfg)
    total = 0
    for s in unit_slices(cfg, units):
        if s.name in leave_out:
            continue
        shape = list(shapes[s.name])
        if s.dim is not None:
            shape[s.dim] = s.stop - s.start
        total += int(torch.Size(shape).numel())
    return total


def select(state_dict: Mapping[str, Tensor], slices: Iterable[TensorSlice]) -> dict[str, Tensor]:
    """Copy the given slices out of a monolithic state dict (contiguous, detached)."""
    return {s.key: s.take(state_dict[s.name]).detach().clone().contiguous() for s in slices}


class ReassemblyError(ValueError):
    pass


def reassemble(
    cfg: ModelConfig, state_dicts: Iterable[Mapping[str, Tensor]], skip: Collection[str] = ()
) -> dict[str, Tensor]:
    """Put partition state dicts back into one monolithic state dict (all parameters but those
    named in ``skip``: a fine-tune's frozen base, for what trained).

    Every element of every parameter must be written exactly once, or once per replica with
    equal values; anything else is an error (a hole or a conflicting overlap), never a silent
    default.
    """
    shapes = {name: shape for name, shape in parameter_shapes(cfg).items() if name not in skip}
    full: dict[str, Tensor] = {}
    written: dict[str, Tensor] = {}
    for sd in state_dicts:
        for key, value in sd.items():
            s = TensorSlice.parse(key)
            if s.name not in shapes:
                raise ReassemblyError(f"{key!r} is not a parameter of this model")
            if s.name not in full:
                full[s.name] = torch.empty(shapes[s.name], dtype=value.dtype)
                written[s.name] = torch.zeros(shapes[s.name], dtype=torch.bool)
            target, mask = s.take(full[s.name]), s.take(written[s.name])
            if target.shape != value.shape:
                raise ReassemblyError(f"{key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            if mask.any() and not torch.equal(target[mask], value.to(target.dtype)[mask]):
                raise ReassemblyError(f"{key!r} overlaps another partition with different values")
            target.copy_(value)
            mask.fill_(True)
    missing = [name for name in shapes if name not in written or not bool(written[name].all())]
    if missing:
        raise ReassemblyError(
            f"no partition holds (all of) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return {name: full[name] for name in shapes}
