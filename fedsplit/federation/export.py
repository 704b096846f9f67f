"""``fedsplit export``: a run's last complete round (or a given round, or a model directory) as
one safetensors file, as a Hugging Face directory, or as a PEFT adapter."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from ..interop import CheckpointError, is_model_directory, open_checkpoint, save_hf
from ..interop.adapters import merge_adapters
from ..interop.peft_format import save_peft
from ..model import ModelConfig, is_adapter
from ..plan import resolved_model
from ..runtime.weights import base_checkpoint
from .checkpoint import Checkpoint, find_checkpoint, model_weights
from .rundir import PLAN_FILE


def model_config(source: Path, model: Path | None = None) -> ModelConfig:
    """The model configuration of a checkpoint: ``model`` (a model YAML or directory), else the
    run's resolved plan beside or above the checkpoint."""
    if model is not None:
        return open_checkpoint(model).config if model.is_dir() else ModelConfig.from_yaml(model)
    plans = [d / PLAN_FILE for d in (source, *source.parents[:3]) if (d / PLAN_FILE).exists()]
    if not plans:
        raise CheckpointError(
            f"no {PLAN_FILE} beside or above it to take the model config from: give --model MODEL_YAML", file=source
        )
    return resolved_model(plans[0])


def export(source: Path, out: Path, format: str = "safetensors", model: Path | None = None, merge: bool = False) -> str:
    """Write the model at ``source`` to ``out``; what was written, for the user. ``format``:
    ``safetensors`` (fedsplit's names), ``hf`` (a transformers directory) or ``peft`` (a LoRA
    fine-tune's adapters as PEFT saves them). ``merge``: fold a fine-tuned model's LoRA adapters
    into its base weights first. Raises :class:`CheckpointError` when ``source`` holds no complete
    checkpoint or cannot be exported so."""
    source, out = Path(source), Path(out)
    if format == "hf" and is_model_directory(source):
        directory = open_checkpoint(source)
        written = save_hf(directory.config, directory.reader.read_all(), out)
        return f"wrote a Hugging Face checkpoint to {written}: AutoModelForCausalLM.from_pretrained({str(written)!r})"
    ckpt = find_checkpoint(source)
    if ckpt is None:
        raise CheckpointError(
            "holds no complete checkpoint (give a run directory or a checkpoints/round-NNNN directory)", file=source
        )
    needs_config = merge or format != "safetensors" or "base" in ckpt.manifest
    cfg = model_config(ckpt.path, model) if needs_config else None
    if format == "peft":
        return _export_peft(ckpt, cfg, out)
    weights = model_weights(ckpt, cfg) if cfg is not None else ckpt.weights
    if merge:
        cfg, weights = merge_adapters(cfg, weights)
    if format == "hf":
        written = save_hf(cfg, weights, out)
        return f"wrote a Hugging Face checkpoint to {written}: AutoModelForCausalLM.from_pretrained({str(written)!r})"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, out, metadata={"format": "pt", "round": str(ckpt.round)})
    merged = " (adapters merged)" if merge else ""
    return f"wrote the full model of round {ckpt.round}{merged} ({len(weights)} tensors) to {out}"


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
