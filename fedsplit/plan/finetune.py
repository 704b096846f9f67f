"""What trains: a plan's ``finetune`` (LoRA adapters over a frozen base) and ``freeze`` sections,
turned into the adapted model and the set of parameters that get no gradient.

The adapters are part of the model (:class:`~fedsplit.model.LoraConfig` on its configuration),
so they are sliced, placed, averaged and reassembled like any other parameter: an expert's
adapters live with the expert; a head group holds the adapter factors cut like its projections
and the layer's block those that act on all heads (:mod:`~fedsplit.plan.slicing`). ``frozen``
holds monolithic parameter names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from ..model import ModelConfig, is_adapter, is_task_head, parameter_shapes
from .errors import Problem
from .schema import FinetuneConfig
from .slicing import unit_slices
from .units import SelectorError, parse_selector
from .yaml_io import Lines


def adapted_model(model: ModelConfig, finetune: FinetuneConfig | None) -> ModelConfig:
    """``model`` with the adapters ``finetune`` asks for (a ``ValueError`` saying why not)."""
    if finetune is None:
        return model.base
    lora = {
        "rank": finetune.rank,
        "alpha": finetune.alpha,
        "targets": tuple(dict.fromkeys(finetune.targets)),
        "dropout": finetune.dropout,
    }
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
    adapters, the task heads (new, so never frozen by default) and what ``finetune.train``
    names; without: what ``freeze`` names."""
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
    heads = {n for n in everything if is_task_head(n)}
    return frozenset(everything - adapters - heads - trained)
