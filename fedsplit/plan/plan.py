"""Load, merge and validate a plan; derive its partitions, replicas and per-data-owner routes.

Placement rules:

* Each ``holds`` entry of an organisation names a set of units (see :mod:`.units`).
* Two entries that share a unit must be nested: equal sets make the organisations *replicas* of
  one partition; a strictly smaller set *carves* its units out of the larger one. Anything else
  (a partial overlap) is an error.
* A unit belongs to the smallest entry that names it; the organisations holding an entry with
  exactly that set hold the unit. A partition is the set of units that share a smallest entry.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ..data.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer
from ..interop import CheckpointError, ModelCheckpoint, is_model_directory, open_checkpoint
from ..model import ModelConfig
from .errors import PlanError, Problem
from .schema import AggregationConfig, FederationFile, OrgFile, TrainingConfig, TransportConfig
from .slicing import TensorSlice, unit_parameter_count, unit_slices
from .units import SelectorError, Unit, all_units, describe, parse_selector
from .yaml_io import line_of, load_yaml


@dataclass(frozen=True)
class Entry:
    """One selector of one organisation's ``holds`` list."""

    org: str
    selector: str
    units: frozenset[Unit]
    file: Path
    line: int | None


@dataclass
class Org:
    name: str
    file: Path
    device: str
    train_data: list[Path]
    eval_data: list[Path]
    entries: list[Entry]
    local: list[str]
    address: str | None

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


@dataclass
class Plan:
    name: str
    file: Path
    model: ModelConfig
    model_source: Path
    training: TrainingConfig
    aggregation: AggregationConfig
    orgs: dict[str, Org]
    partitions: list[Partition]
    transport: TransportConfig = field(default_factory=TransportConfig)
    tokenizer: Path | None = None  # a tokenizer file; None: UTF-8 bytes
    warnings: list[Problem] = field(default_factory=list)
    checkpoint: ModelCheckpoint | None = None  # when ``model:`` names a model directory: its weights

    def __post_init__(self) -> None:
        self._partition_of = {u: p for p in self.partitions for u in p.units}
        self._routes: dict[str, dict[Unit, str]] = {}

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

    def path_orgs(self, data_owner: str) -> frozenset[str]:
        """Every organisation that computes something for ``data_owner``'s batches, itself included."""
        return frozenset(self.route(data_owner).values()) | {data_owner}

    def users(self, partition: Partition, org: str) -> list[str]:
        """Data owners whose batches go through ``org``'s replica of ``partition``."""
        return [d for d in self.data_owners if self.replica_for(partition, d) == org]

    def slices_of(self, org: str, local_only: bool = False) -> list[TensorSlice]:
        """The tensors (or slices) ``org`` holds, partition by partition (only those it keeps
        local, never averaged, with ``local_only``)."""
        held = [p for p in self.partitions if org in (p.local_holders if local_only else p.holders)]
        return [s for p in held for s in unit_slices(self.model, p.units)]

    def checkpoint_slices(self, org: str) -> dict[str, Tensor]:
        """``org``'s share of the plan's checkpoint, keyed like :meth:`slices_of`: only the
        tensors, and for head groups only the rows and columns, that it holds are read from disk."""
        if self.checkpoint is None:
            raise ValueError(f"plan '{self.name}' starts from a seeded initialisation, not a checkpoint")
        slices = self.slices_of(org)
        return dict(
            zip((s.key for s in slices), self.checkpoint.reader.read((s.name, s.dim, s.start, s.stop) for s in slices))
        )

    def units_of(self, org: str) -> frozenset[Unit]:
        return frozenset(u for p in self.partitions if org in p.holders for u in p.units)

    def parameter_count(self, org: str) -> int:
        return unit_parameter_count(self.model, self.units_of(org))


def load_plan(path: str | Path) -> Plan:
    """Load and validate a federation file and the organisation files it names.

    Raises :class:`PlanError` listing every problem found, each with its file and line.
    """
    path = Path(path)
    fed, fed_lines, problems = load_yaml(path, FederationFile)
    if fed is None:
        raise PlanError(problems)

    model_path = (path.parent / fed.model).resolve()
    model, checkpoint, model_problems = _load_model(model_path)
    if model is None:
        where = Problem(
            f"the model {fed.model!r} is invalid (below)", file=path, line=line_of(fed_lines, ("model",)), field="model"
        )
        raise PlanError([where, *model_problems])

    orgs: dict[str, Org] = {}
    loaded: set[Path] = set()
    for i, pattern in enumerate(fed.orgs):
        files = sorted(glob.glob(str(path.parent / pattern)))
        if not files:
            problems.append(
                Problem(
                    f"no organisation file matches {pattern!r}",
                    file=path,
                    line=line_of(fed_lines, ("orgs", i)),
                    field="orgs",
                )
            )
        for f in files:
            # Overlapping globs (``orgs/*.yaml`` and ``orgs/a.yaml``) name a file once, not twice:
            # loading it again would report the org as a duplicate of itself.
            if Path(f).resolve() in loaded:
                continue
            loaded.add(Path(f).resolve())
            org = _load_org(Path(f), model, problems)
            if org is None:
                continue
            if org.name in orgs:
                problems.append(
                    Problem(
                        f"organisation name already used by {orgs[org.name].file}",
                        file=org.file,
                        org=org.name,
                        field="org",
                    )
                )
                continue
            orgs[org.name] = org
    if problems:
        raise PlanError(problems)

    partitions = _partitions(model, path, orgs, problems)
    _check_data_owners(path, orgs, problems)
    tokenizer = _checked_tokenizer(path, fed, fed_lines, model, problems)
    if problems:
        raise PlanError(problems)
    plan = Plan(
        fed.name, path, model, model_path, fed.training, fed.aggregation, orgs, partitions, fed.transport, tokenizer
    )
    plan.warnings = _privacy_warnings(plan)
    plan.checkpoint = checkpoint
    return plan


def _load_model(path: Path) -> tuple[ModelConfig | None, ModelCheckpoint | None, list[Problem]]:
    """A model YAML (seeded initial weights), or a Hugging Face or fedsplit model directory (its weights)."""
    if not is_model_directory(path):
        model, _, problems = load_yaml(path, ModelConfig)
        return model, None, problems
    try:
        checkpoint = open_checkpoint(path)
    except CheckpointError as e:
        return None, None, [Problem(e.reason, file=e.file or path, field=e.field)]
    return checkpoint.config, checkpoint, []


def _load_org(file: Path, model: ModelConfig, problems: list[Problem]) -> Org | None:
    spec, lines, found = load_yaml(file, OrgFile)
    problems += found
    if spec is None:
        return None
    entries = []
    for i, selector in enumerate(spec.holds):
        line = line_of(lines, ("holds", i))
        try:
            entries.append(Entry(spec.org, selector.strip(), parse_selector(selector, model), file, line))
        except SelectorError as e:
            problems.append(Problem(str(e), file=file, line=line, org=spec.org, selector=selector))
    held = {e.selector for e in entries}
    for i, selector in enumerate(spec.local):
        if selector.strip() not in held:
            problems.append(
                Problem(
                    "a local selector must be one of the org's own 'holds' entries",
                    file=file,
                    line=line_of(lines, ("local", i)),
                    org=spec.org,
                    selector=selector,
                    field="local",
                )
            )
    train = _data_paths(file, lines, spec, "train", problems)
    evals = _data_paths(file, lines, spec, "eval", problems)
    if not spec.holds and not train:
        problems.append(
            Problem(
                "holds no part of the model and has no data: it has nothing to do in this federation",
                file=file,
                org=spec.org,
            )
        )
    return Org(spec.org, file, spec.device, train, evals, entries, [s.strip() for s in spec.local], spec.address)


def _data_paths(file: Path, lines: dict, spec: OrgFile, split: str, problems: list[Problem]) -> list[Path]:
    value = getattr(spec.data, split) if spec.data else None
    if value is None:
        return []
    paths: list[Path] = []
    for pattern in [value] if isinstance(value, str) else value:
        matches = sorted(glob.glob(str(file.parent / pattern)))
        if not matches:
            problems.append(
                Problem(
                    f"data file {pattern!r} does not exist (paths are relative to {file.parent})",
                    file=file,
                    line=line_of(lines, ("data", split)),
                    org=spec.org,
                    field=f"data.{split}",
                )
            )
        paths += [Path(m).resolve() for m in matches]
    return paths


def _partitions(model: ModelConfig, fed_file: Path, orgs: dict[str, Org], problems: list[Problem]) -> list[Partition]:
    entries = [e for org in orgs.values() for e in org.entries]
    for i, a in enumerate(entries):
        for b in entries[i + 1 :]:
            shared = a.units & b.units
            if shared and not (a.units <= b.units or b.units <= a.units):
                problems.append(
                    Problem(
                        f"overlaps '{b.selector}' of org '{b.org}' ({b.file}) on {describe(shared)}, but the "
                        "two are neither "
                        f"the same piece (replicas hold identical selections) nor one inside the other (a carve-out); "
                        f"split them so that each unit has one smallest holder",
                        file=a.file,
                        line=a.line,
                        org=a.org,
                        selector=a.selector,
                    )
                )
    if problems:
        return []

    smallest: dict[Unit, frozenset[Unit]] = {}
    for e in entries:
        for u in e.units:
            if u not in smallest or len(e.units) < len(smallest[u]):
                smallest[u] = e.units
    missing = all_units(model) - smallest.keys()
    if missing:
        problems.append(
            Problem(
                f"held by no organisation: {describe(missing)}; add them to some organisation's 'holds'", file=fed_file
            )
        )

    by_key: dict[frozenset[Unit], list[Unit]] = {}
    for u, key in smallest.items():
        by_key.setdefault(key, []).append(u)
    partitions = []
    for key, units in by_key.items():
        defining = [e for e in entries if e.units == key]
        holders = tuple(dict.fromkeys(e.org for e in defining))
        local = frozenset(e.org for e in defining if e.selector in orgs[e.org].local)
        partitions.append(Partition(defining[0].selector, frozenset(units), holders, local))
    partitions.sort(key=lambda p: min(u.position for u in p.units))

    if model.tie_embeddings and smallest:
        embed, head = (next((p for p in partitions if Unit(k) in p.units), None) for k in ("embed", "lm_head"))
        if embed and head and set(embed.holders) != set(head.holders):
            problems.append(
                Problem(
                    f"the model ties lm_head to embed, so the same organisations must hold both "
                    f"(embed: {', '.join(embed.holders)}; lm_head: {', '.join(head.holders)})",
                    file=fed_file,
                )
            )
    return partitions


def _check_data_owners(fed_file: Path, orgs: dict[str, Org], problems: list[Problem]) -> None:
    if orgs and not any(o.holds_data for o in orgs.values()):
        problems.append(
            Problem("no organisation has training data (give at least one org a 'data: {train: ...}')", file=fed_file)
        )


def _checked_tokenizer(
    fed_file: Path, fed: FederationFile, lines: dict, model: ModelConfig, problems: list[Problem]
) -> Path | None:
    """The plan's tokenizer file (None: bytes), whose vocabulary must fit the model's."""
    path = (fed_file.parent / fed.tokenizer).resolve() if fed.tokenizer else None
    where = {
        "file": fed_file,
        "line": line_of(lines, ("tokenizer",) if path else ("model",)),
        "field": "tokenizer" if path else "model",
    }
    try:
        vocab = load_tokenizer(path).vocab_size if path else ByteTokenizer.vocab_size
    except TokenizerError as e:
        problems.append(Problem(str(e), **where))
        return path
    if model.vocab_size < vocab:
        name = (
            f"the tokenizer {fed.tokenizer}" if path else "the byte-level tokenizer (the default: no 'tokenizer' given)"
        )
        problems.append(
            Problem(
                f"{name} has {vocab} tokens but the model's vocab_size is {model.vocab_size}: raise vocab_size "
                f"in {fed.model} to at least {vocab}, or train a smaller tokenizer",
                **where,
            )
        )
    return path


def _privacy_warnings(plan: Plan) -> list[Problem]:
    warnings = []
    for d in plan.data_owners:
        route = plan.route(d)
        org = plan.orgs[d]
        if route[Unit("embed")] != d:
            warnings.append(
                Problem(
                    "raw tokens leave the organisation: it does not hold 'embed', so its token ids go to "
                    f"'{route[Unit('embed')]}'",
                    file=org.file,
                    org=d,
                )
            )
        if route[Unit("lm_head")] != d:
            warnings.append(
                Problem(
                    "labels leave the organisation: it does not hold 'lm_head', so its next-token labels go "
                    f"to '{route[Unit('lm_head')]}'",
                    file=org.file,
                    org=d,
                )
            )
    return warnings
