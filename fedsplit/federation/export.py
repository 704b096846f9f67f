"""``fedsplit export``: a run's last complete round (or a given round, or a model directory) as
one safetensors file, as a Hugging Face directory, or as a PEFT adapter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save_file

from ..interop import (
    TASK_HEADS_FILE,
    CheckpointError,
    is_model_directory,
    open_checkpoint,
    save_hf,
    save_hf_classifier,
)
from ..interop.adapters import merge_adapters
from ..interop.peft_format import save_peft
from ..interop.withdraw import without_experts
from ..model import ModelConfig, is_adapter
from ..plan import resolved_model, resolved_owned_experts
from ..runtime.weights import base_checkpoint
from .checkpoint import Checkpoint, find_checkpoint, model_weights
from .rundir import PLAN_FILE, find_run_plan


def model_config(source: Path, model: Path | None = None) -> ModelConfig:
    """The model configuration of a checkpoint: ``model`` (a model YAML or directory), else the
    run's resolved plan beside or above the checkpoint."""
    if model is not None:
        return open_checkpoint(model).config if model.is_dir() else ModelConfig.from_yaml(model)
    plan = find_run_plan(source)
    if plan is None:
        raise CheckpointError(
            f"no {PLAN_FILE} beside or above it to take the model config from: give --model MODEL_YAML", file=source
        )
    return resolved_model(plan)


def withdrawn_experts(plan: Path | None, without: Sequence[str] = ()) -> tuple[list[str], list[tuple[int, int]]]:
    """The organisations whose owned experts leave a model of the run whose resolved plan is
    ``plan`` (``without``, and those whose plan says ``withdraw_experts``) and those experts, as
    (layer, expert) pairs."""
    if plan is None:
        if without:
            raise CheckpointError(f"--without needs the run's {PLAN_FILE} beside or above the checkpoint (none found)")
        return [], []
    try:
        owned = resolved_owned_experts(plan)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"not a run's resolved plan ({e})", file=plan) from None
    unknown = [o for o in without if o not in owned]
    if unknown:
        owners = ", ".join(sorted(owned)) or "none: its plan has no 'owns'"
        raise CheckpointError(
            f"--without {', '.join(unknown)}: owns no experts in this run (organisations that own experts: {owners})",
            file=plan,
        )
    orgs = sorted(set(without) | {o for o, (_, withdrawn) in owned.items() if withdrawn})
    return orgs, sorted((u.layer, u.index) for o in orgs for u in owned[o][0])


def export(
    source: Path,
    out: Path,
    format: str = "safetensors",
    model: Path | None = None,
    merge: bool = False,
    without: Sequence[str] = (),
    task: str | None = None,
) -> str:
    """Write the model at ``source`` to ``out``; what was written, for the user. ``format``:
    ``safetensors`` (fedsplit's names), ``hf`` (a transformers directory) or ``peft`` (a LoRA
    fine-tune's adapters as PEFT saves them). ``merge``: fold a fine-tuned model's LoRA adapters
    into its base weights first. ``without``: organisations whose owned experts are left out (the
    router renormalised over the rest), besides those whose plan withdraws them. ``task``: with
    ``hf``, the trunk with that task's head as a sequence classifier instead of the causal LM
    (which has every task head beside it, in ``task_heads.safetensors``). Raises
    :class:`CheckpointError` when ``source`` holds no complete checkpoint or cannot be exported so."""
    source, out = Path(source), Path(out)
    if task is not None and format != "hf":
        raise CheckpointError(
            f"--task writes a Hugging Face sequence classifier: use it with --format hf, not {format}"
        )
    if format == "hf" and is_model_directory(source):
        if merge or without:
            raise CheckpointError(
                "--merge and --without apply to a run's checkpoint; a model directory is converted as it is",
                file=source,
            )
        directory = open_checkpoint(source)
        written = save_hf(directory.config, directory.reader.read_all(), out)
        return f"wrote a Hugging Face checkpoint to {written}: AutoModelForCausalLM.from_pretrained({str(written)!r})"
    ckpt = find_checkpoint(source)
    if ckpt is None:
        raise CheckpointError(
            "holds no complete checkpoint (give a run directory or a checkpoints/round-NNNN directory)", file=source
        )
    orgs, removed = withdrawn_experts(find_run_plan(ckpt.path), without)
    if removed and format == "peft":
        raise CheckpointError(
            f"a PEFT adapter applies to its base, which keeps the experts of {', '.join(orgs)}: use --format hf, "
            "or --format safetensors, to leave them out"
        )
    needs_config = merge or removed or format != "safetensors" or "base" in ckpt.manifest
    cfg = model_config(ckpt.path, model) if needs_config else None
    if format == "peft":
        return _export_peft(ckpt, cfg, out)
    weights = model_weights(ckpt, cfg) if cfg is not None else ckpt.weights
    if merge:
        cfg, weights = merge_adapters(cfg, weights)
    left_out = ""
    if removed:
        cfg, weights = without_experts(cfg, weights, removed)
        left_out = f" without the experts of {', '.join(orgs)} ({cfg.num_experts} experts per layer left)"
    if format == "hf" and task is not None:
        written = save_hf_classifier(cfg, weights, task, out)
        return (
            f"wrote task {task}'s classifier{left_out} to {written}: "
            f"AutoModelForSequenceClassification.from_pretrained({str(written)!r})"
        )
    if format == "hf":
        written = save_hf(cfg, weights, out)
        heads = f", its task heads in {written / TASK_HEADS_FILE}" if cfg.tasks else ""
        return (
            f"wrote a Hugging Face checkpoint{left_out} to {written}{heads}: "
            f"AutoModelForCausalLM.from_pretrained({str(written)!r})"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "round": str(ckpt.round)}
    if removed:
        metadata["num_experts"] = str(cfg.num_experts)
    save_file({k: v.contiguous() for k, v in weights.items()}, out, metadata=metadata)
    merged = " (adapters merged)" if merge else ""
    model_yaml = f"; load it with num_experts: {cfg.num_experts} in the model YAML" if removed else ""
    return f"wrote the full model of round {ckpt.round}{merged}{left_out} ({len(weights)} tensors) to {out}{model_yaml}"


def _export_peft(ckpt: Checkpoint, cfg: ModelConfig, out: Path) -> str:
    """The adapters in ``out``, for the base model the run read (a Hugging Face directory, which
    is checked, not read), or for the base written beside them in ``out/base``."""
    base = ckpt.manifest.get("base")
    trained_full = sorted(k for k in ckpt.weights if not is_adapter(k)) if base else []
    if trained_full:
        raise CheckpointError(
            f"the fine-tune also trained full weights ({', '.join(trained_full[:3])}"
            f"{' ...' if len(trained_full) > 3 else ''}), which a PEFT adapter has no place for: "
            "export --format hf --merge",
            field=trained_full[0],
        )
    checkpoint = base_checkpoint(base, cfg) if base else None
    if checkpoint is not None and checkpoint.format == "hf":
        base_dir = checkpoint.path
    else:
        weights = model_weights(ckpt, cfg)
        base_dir = save_hf(cfg.base, {k: v for k, v in weights.items() if not is_adapter(k)}, out / "base").resolve()
    written = save_peft(cfg, ckpt.weights, out, str(base_dir))
    return (
        f"wrote the LoRA adapters of round {ckpt.round} to {written} for the base in {base_dir}: "
        f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), {str(written)!r})"
    )
