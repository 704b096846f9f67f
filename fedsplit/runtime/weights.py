"""The weights a run starts from."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from ..interop import CheckpointError, ModelCheckpoint, open_checkpoint
from ..model import ModelConfig, MoETransformer, in_base, is_task_head, parameter_shapes
from ..plan import Plan, TensorSlice, select

SEEDED = "seeded"  # a base drawn from the plan's seed, not read from a model directory


def initial_weights(plan: Plan) -> dict[str, torch.Tensor]:
    """The weights of the plan's model directory when it names one, else a seeded initialisation;
    plus what the run adds to its base (the base is the same without them): LoRA's adapters and
    the task heads."""
    base = plan.checkpoint.reader.read_all() if plan.checkpoint is not None else seeded(plan.model, plan.training.seed)
    return {**base, **added_weights(plan)}


def seeded(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The seeded initialisation of ``cfg``'s base model (its adapters left out)."""
    torch.manual_seed(seed)
    return MoETransformer(cfg.base).state_dict()


def trained_weights(plan: Plan) -> dict[str, torch.Tensor]:
    """The parameters of :func:`initial_weights` that train: what a coordinator holds, averages and
    checkpoints. Over a frozen base read from a model directory, only those tensors are read."""
    if plan.checkpoint is None or not plan.frozen:
        return {k: v for k, v in initial_weights(plan).items() if k not in plan.frozen}
    names = [n for n in parameter_shapes(plan.model) if n not in plan.frozen and in_base(n)]
    read = plan.checkpoint.reader.read((n, None, 0, 0) for n in names)
    return {**dict(zip(names, read)), **added_weights(plan)}


def base_identity(plan: Plan) -> dict:
    """Which frozen base a fine-tune trains over: the model directory it reads (and a hash of it,
    :meth:`~fedsplit.interop.ModelCheckpoint.identity`), or the seed of a seeded initialisation.
    A fine-tune's checkpoints record it; resuming or exporting against another base is refused."""
    if plan.checkpoint is not None:
        return {"source": str(plan.checkpoint.path.resolve()), "sha256": plan.checkpoint.identity()}
    return {"source": SEEDED, "seed": plan.training.seed, "sha256": _seeded_hash(plan.model.base, plan.training.seed)}


def _seeded_hash(cfg: ModelConfig, seed: int) -> str:
    spec = json.dumps({"seed": seed, "model": cfg.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def base_checkpoint(identity: dict, cfg: ModelConfig) -> ModelCheckpoint | None:
    """The model directory that ``identity`` (from :func:`base_identity`) names, opened (headers
    only), or None for a seeded base of ``cfg``; refused, naming both hashes, when what is there
    now is another base."""
    seeded_base = identity["source"] == SEEDED
    checkpoint = None if seeded_base else open_checkpoint(Path(identity["source"]))
    found = _seeded_hash(cfg.base, int(identity["seed"])) if seeded_base else checkpoint.identity()
    if found != identity["sha256"]:
        raise CheckpointError(
            f"{'the seeded base of this model' if seeded_base else 'it'} is not the base this run fine-tuned "
            f"(hash {found}, the run's base {identity['sha256']}): restore that base, or start a new run",
            file=None if seeded_base else checkpoint.path,
        )
    return checkpoint


def base_weights(identity: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The base weights that ``identity`` names (see :func:`base_checkpoint`)."""
    checkpoint = base_checkpoint(identity, cfg)
    return seeded(cfg, int(identity["seed"])) if checkpoint is None else checkpoint.reader.read_all()


class LazyWeights(Mapping[str, torch.Tensor]):
    """Tensors by key, each read when it is asked for: an organisation loading its share of a
    checkpoint holds one of them at a time beside its model, not a second copy of its share."""

    def __init__(self, keys: Iterable[str], read: Callable[[str], torch.Tensor]):
        self._keys, self._read = list(keys), read
        self._known = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        return self._read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def selection(weights: Mapping[str, torch.Tensor], slices: Iterable[TensorSlice]) -> LazyWeights:
    """``slices`` of a (possibly lazy) full model's ``weights``, each cut when it is read."""
    by_key = {s.key: s for s in slices}
    return LazyWeights(by_key, lambda key: by_key[key].take(weights[by_key[key].name]))


def initial_weights_of(plan: Plan, org: str) -> Mapping[str, torch.Tensor]:
    """``org``'s share of :func:`initial_weights`, reading only its slices of a checkpoint, one
    at a time as they are loaded."""
    if plan.checkpoint is None:
        return select(initial_weights(plan), plan.slices_of(org))
    adapters = select(added_weights(plan), [s for s in plan.slices_of(org) if not in_base(s.name)])
    base = {s.key: s for s in plan.slices_of(org) if in_base(s.name)}

    def read(key: str) -> torch.Tensor:
        if key in adapters:
            return adapters[key]
        s = base[key]
        return plan.checkpoint.reader.read([(s.name, s.dim, s.start, s.stop)])[0]

    return LazyWeights([*base, *adapters], read)


def added_weights(plan: Plan) -> dict[str, torch.Tensor]:
    """What a run adds to its base, drawn from the plan's seed in parameter order so that every
    organisation and the reference draw the same: LoRA's initial factors, PEFT's way (``A``
    Kaiming-uniform with bound 1/sqrt(fan in), ``B`` zero, so that the adapted model starts as
    its base), and each task head, normal with the model's ``init_std`` (as the trunk's linears)."""
    generator = torch.Generator().manual_seed(plan.training.seed)
    out = {}
    for name, shape in parameter_shapes(plan.model).items():
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(shape[1])
            out[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        elif ".lora_B." in name:
            out[name] = torch.zeros(shape)
        elif is_task_head(name):
            out[name] = torch.randn(shape, generator=generator) * plan.model.init_std
    return out
