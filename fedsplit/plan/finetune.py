"""What trains: a plan's ``finetune`` (LoRA adapters over a frozen base) and ``freeze`` sections,
turned into the adapted model and the set of parameters that get no gradient.

The adapters are part of the model (:class:`~fedsplit.model.LoraConfig` on its configuration),
so they are sliced, placed, averaged and reassembled like any other parameter: an expert's
adapters live with the expert; a layer's attention adapters with its heads. ``frozen`` holds
monolithic parameter names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from ..model import ModelConfig, is_adapter, parameter_shapes
from .errors import Problem
from .plan import Partition
from .schema import FinetuneConfig
from .slicing import unit_slices
from .units import SelectorError, parse_selector
from .yaml_io import Lines

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def adapted_model(model: ModelConfig, finetune: FinetuneConfig | None) -> ModelConfig:
    """``model`` with the adapters ``finetune`` asks for (a ``ValueError`` saying why not)."""
    if finetune is None:
        return model.base
    lora = {"rank": finetune.rank, "alpha": finetune.alpha, "targets": tuple(dict.fromkeys(finetune.targets))}
    try:
        return ModelConfig.model_validate({**model.base.model_dump(), "lora": lora})
    except ValidationError as e:
        raise ValueError("; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())) from None


def _selected(
    selectors: Sequence[str], field: str, model: ModelConfig, file: Path, lines: Lines, problems: list[Problem]
) -> set[str]:
    """The parameter names a list of selectors covers; whole attention only."""
    names: set[str] = set()
    path = tuple(field.split("."))
    for i, selector in enumerate(selectors):
        where = {"file": file, "line": lines.of(*path, i), "field": field, "selector": selector}
        try:
            units = parse_selector(selector, model)
        except SelectorError as e:
            problems.append(Problem(str(e), **where))
            continue
        for layer in {u.layer for u in units if u.kind == "kv"}:
            if len({u for u in units if u.kind == "kv" and u.layer == layer}) != model.num_kv_heads:
                problems.append(
                    Problem(
                        f"names some of layer {layer}'s heads: attention trains or stays frozen whole "
                        f"(layers.{layer}.attention)",
                        **where,
                    )
                )
        names |= {s.name for s in unit_slices(model, units)}
    return names


def frozen_parameters(
    model: ModelConfig,
    finetune: FinetuneConfig | None,
    freeze: Sequence[str],
    file: Path,
    lines: Lines,
    problems: list[Problem],
) -> frozenset[str]:
    """The parameters of ``model`` (already adapted) that do not train. With LoRA: all but the
    adapters and what ``finetune.train`` names; without: what ``freeze`` names."""
    everything = set(parameter_shapes(model))
    frozen = _selected(freeze, "freeze", model, file, lines, problems)
    if finetune is None:
        return frozenset(frozen)
    trained = _selected(finetune.train, "finetune.train", model, file, lines, problems)
    adapters = {n for n in everything if is_adapter(n)}
    for field, clash, why in (
        ("freeze", frozen & adapters, "they carry LoRA adapters, which train"),
        ("freeze", frozen & trained, "finetune.train trains them"),
    ):
        if clash:
            shown = ", ".join(sorted(clash)[:3]) + (" ..." if len(clash) > 3 else "")
            problems.append(
                Problem(
                    f"freezes {shown}, but {why}: remove them from one of the two",
                    file=file,
                    line=lines.of(field),
                    field=field,
                )
            )
    return frozenset(everything - adapters - trained)


def check_adapted_attention(
    model: ModelConfig, kv_partitions: dict[int, set[str]], file: Path, lines: Lines, problems: list[Problem]
) -> None:
    """Attention adapters need each adapted layer's heads in one partition: LoRA's ``A`` of q/k/v
    and ``B`` of o_proj act on all heads at once, so head groups on two organisations would each
    need all of them (``kv_partitions``: layer -> the names of the partitions holding its heads)."""
    targets = [t for t in ATTENTION_TARGETS if model.adapts(t)]
    for layer, holders in sorted(kv_partitions.items()):
        if targets and len(holders) > 1:
            problems.append(
                Problem(
                    f"LoRA on {', '.join(targets)} needs layer {layer}'s heads in one piece, and the plan splits "
                    f"them ({', '.join(sorted(holders))}): the adapters' A (q/k/v) and B (o_proj) act on every "
                    "head at once. Adapt only the experts there, or hold the layer's heads together",
                    file=file,
                    line=lines.of("finetune", "targets"),
                    field="finetune.targets",
                )
            )
            return


def kv_partitions(partitions: Sequence[Partition]) -> dict[int, set[str]]:
    """Layer -> the partitions that hold some of its heads."""
    out: dict[int, set[str]] = {}
    for p in partitions:
        for u in p.units:
            if u.kind == "kv":
                out.setdefault(u.layer, set()).add(p.name)
    return out
