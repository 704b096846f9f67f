"""``fedsplit export``: a run's last complete round (or a given round, or a model directory) as
one safetensors file or as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from ..interop import CheckpointError, is_model_directory, open_checkpoint, save_hf
from ..interop.adapters import merge_adapters
from ..model import ModelConfig
from ..plan import resolved_model
from .checkpoint import find_checkpoint
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
    """Write the model at ``source`` to ``out``; what was written, for the user. ``merge``: fold a
    fine-tuned model's LoRA adapters into its base weights first. Raises :class:`CheckpointError`
    when ``source`` holds no complete checkpoint or cannot be exported."""
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
    weights = ckpt.weights
    if merge or format == "hf":
        cfg = model_config(ckpt.path, model)
        if merge:
            cfg, weights = merge_adapters(cfg, weights)
    if format == "hf":
        written = save_hf(cfg, weights, out)
        return f"wrote a Hugging Face checkpoint to {written}: AutoModelForCausalLM.from_pretrained({str(written)!r})"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, out, metadata={"format": "pt", "round": str(ckpt.round)})
    merged = " (adapters merged)" if merge else ""
    return f"wrote the full model of round {ckpt.round}{merged} ({len(weights)} tensors) to {out}"
