"""A resolved plan: the model, the run's settings, the organisations and the partitions they hold,
with the routes each data owner's batches take. Frozen: a run's settings are overridden by
:meth:`Plan.with_settings`, which makes a new plan; :mod:`.loading` makes one from YAML.

Placement rules:

* Each ``holds`` entry of an organisation names a set of units (see :mod:`.units`).
* Two entries that share a unit must be nested: equal sets make the organisations *replicas* of
  one partition; a strictly smaller set *carves* its units out of the larger one. Anything else
  (a partial overlap) is an error.
* A unit belongs to the smallest entry that names it; the organisations holding an entry with
  exactly that set hold the unit. A partition is the set of units that share a smallest entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ..interop import ModelCheckpoint
from ..model import ModelConfig, in_base
from .errors import Problem
from .schema import AggregationConfig, FinetuneConfig, PrivacyConfig, TaskConfig, TrainingConfig, TransportConfig
from .slicing import TensorSlice, unit_parameter_count, unit_slices
from .units import Unit


@dataclass(frozen=True)
class Entry:
    """One selector of one organisation's ``holds`` list."""

    org: str
    selector: str
    units: frozenset[Unit]
    file: Path
    line: int | None


@dataclass(frozen=True)
class Org:
    name: str
    file: Path
    device: str
    train_data: tuple[Path, ...]
    eval_data: tuple[Path, ...]
    entries: tuple[Entry, ...]
    local: tuple[str, ...]
    address: str | None
    activation_checkpointing: bool | None = None  # its own choice; None: the federation's
    device_line: int | None = None  # where its file names its device, for errors about the device
    owns: tuple[Entry, ...] = ()  # routed experts trained on its batches only (see Plan.blocked_experts)
    withdraw_experts: bool = False  # its owned experts are left out of exported models
    task: str | None = None  # the task its data trains (a task head's loss), None: next-token prediction

    @property
    def owned_experts(self) -> frozenset[Unit]:
        return frozenset(u for e in self.owns for u in e.units)

    @property
    def holds_data(self) -> bool:
        return bool(self.train_data)


@dataclass(frozen=True)
class Partition:
    name: str
    units: frozenset[Unit]
    holders: tuple[str, ...]
    local_holders: frozenset[str] = frozenset()

    @property
    def replicated(self) -> bool:
        return len(self.holders) > 1


@dataclass(frozen=True)
class Plan:
    name: str
    file: Path  # the file it was loaded from (the federation file, or a run's resolved plan)
    model: ModelConfig
    model_source: Path  # the model YAML or model directory
    training: TrainingConfig
    aggregation: AggregationConfig
    orgs: dict[str, Org]
    partitions: tuple[Partition, ...]
    transport: TransportConfig = field(default_factory=TransportConfig)
    tokenizer: Path | None = None  # a tokenizer file; None: UTF-8 bytes
    warnings: tuple[Problem, ...] = ()
    checkpoint: ModelCheckpoint | None = None  # when ``model:`` names a model directory: its weights
    finetune: FinetuneConfig | None = None  # LoRA over a frozen base (``model`` then has the adapters)
    freeze: tuple[str, ...] = ()  # the federation file's freeze selectors
    frozen: frozenset[str] = frozenset()  # parameter names that get no gradient (see .finetune)
    privacy: PrivacyConfig | None = None  # noise on what data owners send (see fedsplit.runtime.privacy)
    tasks: Mapping[str, TaskConfig] = field(default_factory=dict)  # classification tasks (the model's task heads)
    _partition_of: dict[Unit, Partition] = field(init=False, repr=False, compare=False)
    _routes: dict[str, dict[Unit, str]] = field(init=False, repr=False, compare=False)
    _blocked: dict[str, dict[int, tuple[int, ...]]] = field(init=False, repr=False, compare=False)
    _owner_of: dict[Unit, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_partition_of", {u: p for p in self.partitions for u in p.units})
        object.__setattr__(self, "_routes", {})
        object.__setattr__(self, "_blocked", {})
        owned = {u: name for name, org in self.orgs.items() for u in org.owned_experts}
        object.__setattr__(self, "_owner_of", owned)

    def with_settings(
        self,
        *,
        training: TrainingConfig | None = None,
        transport: TransportConfig | None = None,
        aggregation: AggregationConfig | None = None,
    ) -> Plan:
        """This plan with some of its run settings replaced (the command line's, a benchmark's)."""
        return dataclasses.replace(
            self,
            training=training or self.training,
            transport=transport or self.transport,
            aggregation=aggregation or self.aggregation,
        )

    def with_training(self, **changes) -> Plan:
        """This plan with some ``training`` fields changed (validated like the file's)."""
        return self.with_settings(training=TrainingConfig.model_validate({**self.training.model_dump(), **changes}))

    @property
    def data_owners(self) -> list[str]:
        return [name for name, org in self.orgs.items() if org.holds_data]

    def partition_of(self, unit: Unit) -> Partition:
        return self._partition_of[unit]

    def replica_for(self, partition: Partition, data_owner: str) -> str:
        """Which holder serves ``data_owner``'s batches: its own replica if it holds one, else
        the holders in turn over the data owners that do not (deterministic load spreading)."""
        if data_owner in partition.holders:
            return data_owner
        others = [d for d in self.data_owners if d not in partition.holders]
        return partition.holders[others.index(data_owner) % len(partition.holders)]

    def route(self, data_owner: str) -> dict[Unit, str]:
        """The organisation that computes each unit for ``data_owner``'s batches. Asked on every
        data-plane call, so it is worked out once per data owner (placement never changes)."""
        if data_owner not in self._routes:
            self._routes[data_owner] = {u: self.replica_for(p, data_owner) for p in self.partitions for u in p.units}
        return self._routes[data_owner]

    @property
    def owner_of(self) -> dict[Unit, str]:
        """Each owned expert's data owner (experts nobody owns are shared and not listed)."""
        return self._owner_of

    def owners(self, units) -> list[str]:
        """The data owners that own any of ``units``, by name."""
        return sorted({self._owner_of[u] for u in units if u in self._owner_of})

    def blocked_experts(self, data_owner: str) -> dict[int, tuple[int, ...]]:
        """Per layer, the experts that ``data_owner``'s batches are never routed to: the other data
        owners' owned experts. Its router sees -inf for them, so the monolith and the split model
        route its tokens alike and no gradient of its batches reaches them."""
        if data_owner not in self._blocked:
            blocked: dict[int, list[int]] = {}
            for unit, owner in sorted(self.owner_of.items()):
                if owner != data_owner:
                    blocked.setdefault(unit.layer, []).append(unit.index)
            self._blocked[data_owner] = {layer: tuple(experts) for layer, experts in blocked.items()}
        return self._blocked[data_owner]

    def loss_unit(self, data_owner: str) -> Unit:
        """The head whose loss ``data_owner``'s batches train: ``lm_head``, or its task's head."""
        task = self.orgs[data_owner].task
        return Unit("lm_head") if task is None else Unit("task", name=task)

    def objective_weight(self, data_owner: str) -> float:
        """The weight of ``data_owner``'s loss in a step's objective: 1 for next-token prediction,
        its task's ``weight`` for a task."""
        task = self.orgs[data_owner].task
        return 1.0 if task is None else self.tasks[task].weight

    def path(self, data_owner: str) -> list[tuple[str, tuple[str | int, ...]]]:
        """The data owner's path: (organisation, blocks) for each run of consecutive blocks
        (``embed``, layer indices, ``final_norm``, then ``lm_head``, or ``task_head`` for a
        data owner that trains a task) that one organisation computes."""
        route, head = self.route(data_owner), self.loss_unit(data_owner)
        blocks: list[tuple[str | int, str]] = [("embed", route[Unit("embed")])]
        blocks += [(i, route[Unit("router", i)]) for i in range(self.model.num_layers)]
        blocks += [("final_norm", route[Unit("final_norm")])]
        blocks += [("lm_head" if head.kind == "lm_head" else "task_head", route[head])]
        path: list[tuple[str, list[str | int]]] = []
        for block, org in blocks:
            if path and path[-1][0] == org:
                path[-1][1].append(block)
            else:
                path.append((org, [block]))
        return [(org, tuple(run)) for org, run in path]

    def path_orgs(self, data_owner: str) -> frozenset[str]:
        """Every organisation that computes something for ``data_owner``'s batches, itself included."""
        return frozenset(self.route(data_owner).values()) | {data_owner}

    def users(self, partition: Partition, org: str) -> list[str]:
        """Data owners whose batches go through ``org``'s replica of ``partition``."""
        return [d for d in self.data_owners if self.replica_for(partition, d) == org]

    def slices_of(self, org: str, local_only: bool = False, trained_only: bool = False) -> list[TensorSlice]:
        """The tensors (or slices) ``org`` holds, partition by partition (only those it keeps
        local, never averaged, with ``local_only``; only those that train, with ``trained_only``)."""
        held = [p for p in self.partitions if org in (p.local_holders if local_only else p.holders)]
        slices = [s for p in held for s in unit_slices(self.model, p.units)]
        return [s for s in slices if s.name not in self.frozen] if trained_only else slices

    def trains(self, key: str) -> bool:
        """Whether the parameter (or slice) ``key`` trains, or stays as the run began."""
        return TensorSlice.parse(key).name not in self.frozen

    def trained_slices(self, units) -> list[TensorSlice]:
        """The slices of ``units`` that train: what crosses the control plane and is averaged."""
        return [s for s in unit_slices(self.model, units) if s.name not in self.frozen]

    def frozen_part(self, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The frozen parameters of a full model's ``weights``: with the trained partitions' states,
        what reassembles the model."""
        return {name: weights[name] for name in self.frozen}

    def checkpoint_slices(self, org: str) -> dict[str, Tensor]:
        """``org``'s share of the plan's checkpoint, keyed like :meth:`slices_of`: only the
        tensors, and for head groups only the rows and columns, that it holds are read from disk."""
        if self.checkpoint is None:
            raise ValueError(f"plan '{self.name}' starts from a seeded initialisation, not a checkpoint")
        slices = [s for s in self.slices_of(org) if in_base(s.name)]  # the others: see initial_weights
        return dict(
            zip((s.key for s in slices), self.checkpoint.reader.read((s.name, s.dim, s.start, s.stop) for s in slices))
        )

    def units_of(self, org: str) -> frozenset[Unit]:
        return frozenset(u for p in self.partitions if org in p.holders for u in p.units)

    def parameter_count(self, org: str) -> int:
        return unit_parameter_count(self.model, self.units_of(org))

    def trained_parameter_count(self, org: str) -> int:
        return unit_parameter_count(self.model, self.units_of(org), self.frozen)

    def training_bytes(self, org: str) -> int:
        """``org``'s weights, gradients and optimizer state: :attr:`bytes_per_parameter` for each
        parameter that trains, the compute precision's bytes for each frozen one."""
        trained = self.trained_parameter_count(org)
        frozen_bytes = 2 if self.training.precision == "bf16-mixed" else 4
        return trained * self.bytes_per_parameter + (self.parameter_count(org) - trained) * frozen_bytes

    def checkpoints_activations(self, org: str) -> bool:
        """Whether ``org``'s blocks recompute their forward in backward (its own file's choice,
        else the federation's)."""
        own = self.orgs[org].activation_checkpointing
        return self.training.activation_checkpointing if own is None else own

    @property
    def bytes_per_parameter(self) -> int:
        """Training memory per held parameter: fp32 weights and gradients plus the optimizer's state
        (and with bf16-mixed, the bf16 compute copy)."""
        opt = self.training.optimizer
        state = 2 if opt.name in ("adam", "adamw") else (1 if opt.momentum else 0)
        return 4 * (2 + state) + (2 if self.training.precision == "bf16-mixed" else 0)
