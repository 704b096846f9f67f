"""Model directories: open a Hugging Face or fedsplit checkpoint directory, write either kind.

* A **Hugging Face** directory has ``config.json`` and ``model.safetensors`` (or shards listed
  in ``model.safetensors.index.json``), as ``save_pretrained`` writes them.
* A **fedsplit** model directory has ``model.yaml`` (a :class:`~fedsplit.model.ModelConfig`) and
  ``model.safetensors`` under fedsplit's own names: what ``fedsplit import`` and
  ``fedsplit upcycle`` write.

Either can be a plan's ``model:``; the plan then starts from its weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import Tensor

from ..model import TASK_HEADS, ModelConfig, parameter_shapes
from .errors import CheckpointError
from .hf_config import MIXTRAL, QWEN2_MOE, config_from_hf, config_to_hf, hf_architecture
from .hf_weights import Stored, hf_names, locate, to_hf
from .reader import INDEX_FILE, SINGLE_FILE, CheckpointReader, SafetensorsFiles

HF_CONFIG = "config.json"
SEQUENCE_CLASSIFIERS = {MIXTRAL, QWEN2_MOE}  # the architectures with a *ForSequenceClassification
TASK_HEADS_FILE = "task_heads.safetensors"  # beside a HF export: each task's score weight, its labels in the metadata
FEDSPLIT_CONFIG = "model.yaml"
DEFAULT_SHARD_BYTES = 5 * 2**30  # what save_pretrained uses


@dataclass
class ModelCheckpoint:
    """A checkpoint directory: its model config and a reader of its weights by fedsplit name."""

    path: Path
    config: ModelConfig
    format: str  # "hf" or "fedsplit"
    architecture: str | None  # the HF architecture, for format "hf"
    reader: CheckpointReader

    def identity(self) -> str:
        """Which checkpoint this is: a hash of its config file and of its weight files' headers
        and ends (:meth:`~.reader.SafetensorsFiles.identity`)."""
        config = self.path / (HF_CONFIG if self.format == "hf" else FEDSPLIT_CONFIG)
        return hashlib.sha256(config.read_bytes() + self.reader.files.identity().encode()).hexdigest()[:16]


def is_model_directory(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / HF_CONFIG).exists() or (path / FEDSPLIT_CONFIG).exists())


def open_checkpoint(path: str | Path) -> ModelCheckpoint:
    """Open a HF or fedsplit model directory; reads the config and the tensors' index, no weights."""
    path = Path(path)
    if (path / HF_CONFIG).exists():
        try:
            hf = json.loads((path / HF_CONFIG).read_text())
        except ValueError as e:
            raise CheckpointError(f"not valid JSON ({e})", file=path / HF_CONFIG) from None
        cfg, arch = config_from_hf(hf, path / HF_CONFIG)
        files = SafetensorsFiles(path)
        reader = CheckpointReader(cfg, files, locate(cfg, arch, files.keys, path))
        reader.check_shapes()
        return ModelCheckpoint(path, cfg, "hf", arch, reader)
    if (path / FEDSPLIT_CONFIG).exists():
        try:
            cfg = ModelConfig.from_yaml(path / FEDSPLIT_CONFIG)
        except (ValidationError, yaml.YAMLError) as e:
            raise CheckpointError(f"not a valid model config: {e}", file=path / FEDSPLIT_CONFIG) from None
        files = SafetensorsFiles(path)
        names = set(parameter_shapes(cfg))
        if files.keys != names:
            wrong = sorted(files.keys ^ names)
            raise CheckpointError(
                f"the weights do not match model.yaml: {', '.join(wrong[:5])} "
                f"{'missing' if wrong[0] in names else 'unexpected'}",
                file=path / SINGLE_FILE,
                field=wrong[0],
            )
        reader = CheckpointReader(cfg, files, {n: Stored(n) for n in names})
        reader.check_shapes()
        return ModelCheckpoint(path, cfg, "fedsplit", None, reader)
    raise CheckpointError(
        f"is not a model directory: it has neither {HF_CONFIG} (Hugging Face) nor {FEDSPLIT_CONFIG} (fedsplit)",
        file=path,
    )


def save_fedsplit(cfg: ModelConfig, state: Mapping[str, Tensor], out: str | Path) -> Path:
    """Write a fedsplit model directory (``model.yaml`` and ``model.safetensors``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / FEDSPLIT_CONFIG).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()}, out / SINGLE_FILE, metadata={"format": "pt"}
    )
    return out


def save_hf(
    cfg: ModelConfig, state: Mapping[str, Tensor], out: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> Path:
    """Write a HF directory that ``AutoModelForCausalLM.from_pretrained`` loads: ``config.json``
    and the weights in one file, or in shards of at most ``max_shard_bytes`` with an index. Task
    heads (the model's ``tasks``) go beside it, in :data:`TASK_HEADS_FILE`."""
    _refuse_adapters(cfg)
    arch = hf_architecture(cfg.base)
    _write_hf(out, config_to_hf(cfg.base), to_hf(cfg.base, arch, state), max_shard_bytes)
    if cfg.tasks:
        labels = {t.name: list(t.labels) for t in cfg.tasks}
        heads = {f"{t.name}.score.weight": state[f"{TASK_HEADS}.{t.name}.weight"] for t in cfg.tasks}
        save_file(_contiguous(heads), Path(out) / TASK_HEADS_FILE, metadata={"labels": json.dumps(labels)})
    return Path(out)


def save_hf_classifier(
    cfg: ModelConfig,
    state: Mapping[str, Tensor],
    task: str,
    out: str | Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the trunk with task ``task``'s head as a HF directory that
    ``AutoModelForSequenceClassification.from_pretrained`` loads (the architecture's
    ``*ForSequenceClassification``: its ``score`` is the head, on the last token that is not
    ``pad_token_id``, which is where fedsplit's examples carry their label).

    transformers finds that token by comparing ids with ``pad_token_id``, so the pad must be an id
    that no text encodes to (fedsplit's own :data:`~fedsplit.data.PAD_ID` is a real token of a
    BPE vocabulary: an example ending in it would be pooled one token early). The export adds one:
    ``vocab_size``, a zero embedding row that a causal model's real tokens never read."""
    _refuse_adapters(cfg)
    try:
        labels = cfg.task(task).labels
    except KeyError:
        declared = ", ".join(t.name for t in cfg.tasks) or "none"
        raise CheckpointError(f"the model has no task head {task!r} (its tasks: {declared})", field="tasks") from None
    arch = hf_architecture(cfg.base)
    if arch not in SEQUENCE_CLASSIFIERS:
        raise CheckpointError(
            f"transformers has no sequence classifier for {arch} (what the model's shared experts need): export "
            f"the causal LM, which keeps every task head beside it in {TASK_HEADS_FILE} (leave out --task)",
            field="tasks",
        )
    tensors = {k: v for k, v in to_hf(cfg.base, arch, state).items() if k != "lm_head.weight"}
    embed = hf_names(cfg.base, arch)["embed.weight"].key
    tensors[embed] = torch.cat([tensors[embed], tensors[embed].new_zeros(1, cfg.hidden_size)])
    tensors["score.weight"] = state[f"{TASK_HEADS}.{task}.weight"]
    config = config_to_hf(cfg.base) | {
        "architectures": [arch.removesuffix("ForCausalLM") + "ForSequenceClassification"],
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "vocab_size": cfg.vocab_size + 1,
        "pad_token_id": cfg.vocab_size,
    }
    return _write_hf(out, config, tensors, max_shard_bytes)


def _refuse_adapters(cfg: ModelConfig) -> None:
    if cfg.lora is not None:
        raise CheckpointError(
            "the model has LoRA adapters, which a Hugging Face model has no place for: merge them first "
            "(fedsplit export --format hf --merge)",
            field="lora",
        )


def _contiguous(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _write_hf(out: str | Path, config: dict, state: Mapping[str, Tensor], max_shard_bytes: int) -> Path:
    """``config.json`` and the tensors, in one file or in shards of at most ``max_shard_bytes``."""
    tensors = _contiguous(state)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], out / SINGLE_FILE, metadata={"format": "pt"})
        return out
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out
