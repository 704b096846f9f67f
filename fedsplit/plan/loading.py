"""Loading a plan: a federation file and the organisation files it names (or a run's resolved
plan, which has every organisation and the model inline), validated, with every problem found
reported at once (file, line, organisation, field, selector).

A *resolved plan* (:func:`write_resolved`) is what a run works from: the plan as loaded, with
the run's overrides applied and every path absolute, in one file that :func:`load_plan` reads
back to the same plan. The coordinator writes it to the run directory; every process of the run
(the ServerApp, each worker host) loads it, so none re-reads the user's files or patches them.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from collections.abc import Mapping
from pathlib import Path

from ..data.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer
from ..interop import CheckpointError, ModelCheckpoint, is_model_directory, open_checkpoint
from ..model import ModelConfig, TaskHeadConfig
from .errors import PlanError, Problem
from .finetune import adapted_model, frozen_parameters
from .plan import Entry, Org, Partition, Plan
from .schema import MAX_ORGS, FederationFile, FinetuneConfig, OrgFile, TaskConfig
from .units import SelectorError, Unit, all_units, describe, parse_selector
from .yaml_io import Lines, load_yaml, not_a_regular_file


def load_plan(path: str | Path) -> Plan:
    """Load and validate a federation file and the organisation files it names (or written
    inline), or a run's resolved plan.

    Raises :class:`PlanError` listing every problem found, each with its file and line.
    """
    path = Path(path)
    fed, fed_lines, problems = load_yaml(path, FederationFile)
    if fed is None:
        raise PlanError(problems)
    lines = Lines(fed_lines)

    model, model_source, checkpoint, model_problems = _load_model(path, fed.model)
    if model is None:
        where = Problem(f"the model {fed.model!r} is invalid (below)", file=path, line=lines.of("model"), field="model")
        raise PlanError([where, *model_problems])

    try:
        model = adapted_model(model, fed.finetune)
    except ValueError as e:
        problems.append(Problem(str(e), file=path, line=lines.of("finetune"), field="finetune"))
        raise PlanError(problems) from None
    model = with_tasks(model, fed.tasks)
    _check_base_dtype(path, fed, lines, problems)
    frozen = frozen_parameters(model, fed.finetune, fed.freeze, path, lines, problems)

    orgs: dict[str, Org] = {}
    for org in _load_orgs(path, fed, lines, model, problems):
        if org.name in orgs:
            problems.append(
                Problem(
                    f"organisation name already used by {orgs[org.name].file}", file=org.file, org=org.name, field="org"
                )
            )
        else:
            orgs[org.name] = org
    if problems:
        raise PlanError(problems)

    partitions = _partitions(model, path, orgs, problems)
    _check_data_owners(path, orgs, problems)
    _check_tasks_trained(path, fed, lines, orgs, problems)
    if not problems:
        _check_owned_experts(model, orgs, partitions, problems)
    tokenizer = _checked_tokenizer(path, fed, lines, model, problems)
    if problems:
        raise PlanError(problems)
    plan = Plan(
        fed.name,
        path,
        model,
        model_source,
        fed.training,
        fed.aggregation,
        orgs,
        tuple(partitions),
        fed.transport,
        tokenizer,
        checkpoint=checkpoint,
        finetune=fed.finetune,
        freeze=tuple(fed.freeze),
        frozen=frozen,
        privacy=fed.privacy,
        tasks=dict(fed.tasks),
    )
    return dataclasses.replace(plan, warnings=tuple(_privacy_warnings(plan)))


def with_tasks(model: ModelConfig, tasks: Mapping[str, TaskConfig]) -> ModelConfig:
    """``model`` with a classification head for each of ``tasks`` (in their order)."""
    heads = tuple(TaskHeadConfig(name=name, labels=tuple(t.labels)) for name, t in tasks.items())
    return model.model_copy(update={"tasks": heads})


def _check_tasks_trained(
    fed_file: Path, fed: FederationFile, lines: Lines, orgs: dict[str, Org], problems: list[Problem]
) -> None:
    """Every declared task is some data owner's."""
    trained = {o.task for o in orgs.values()}
    for name in fed.tasks:
        if name not in trained:
            problems.append(
                Problem(
                    f"no organisation trains task {name!r}: set 'task: {name}' in the file of the data owner whose "
                    "labelled data it is, or remove the task",
                    file=fed_file,
                    line=lines.of("tasks", name),
                    field=f"tasks.{name}",
                )
            )


def _check_base_dtype(path: Path, fed: FederationFile, lines: Lines, problems: list[Problem]) -> None:
    """A frozen base is kept in the precision the run computes in: bf16 needs bf16-mixed."""
    if fed.finetune is None or fed.finetune.base_dtype is None:
        return
    computes = "bf16" if fed.training.precision == "bf16-mixed" else "fp32"
    if fed.finetune.base_dtype != computes:
        problems.append(
            Problem(
                f"base_dtype {fed.finetune.base_dtype}, but training.precision {fed.training.precision} computes in "
                f"{computes}: the frozen base is kept in the precision it computes in (set training.precision "
                f"{'bf16-mixed' if fed.finetune.base_dtype == 'bf16' else 'fp32'}, or drop base_dtype)",
                file=path,
                line=lines.of("finetune", "base_dtype"),
                field="finetune.base_dtype",
            )
        )


def _load_model(
    fed_file: Path, model: str | ModelConfig
) -> tuple[ModelConfig | None, Path, ModelCheckpoint | None, list[Problem]]:
    """The model written inline or in a model YAML (seeded initial weights), or a Hugging Face or
    fedsplit model directory (its weights): (config, source, checkpoint, problems)."""
    if isinstance(model, ModelConfig):
        return model, fed_file, None, []
    path = (fed_file.parent / model).resolve()
    if not is_model_directory(path):
        config, _, problems = load_yaml(path, ModelConfig)
        return config, path, None, problems
    try:
        checkpoint = open_checkpoint(path)
    except CheckpointError as e:
        return None, path, None, [Problem(e.reason, file=e.file or path, field=e.field)]
    return checkpoint.config, path, checkpoint, []


def _load_orgs(fed_file: Path, fed: FederationFile, lines: Lines, model: ModelConfig, problems: list[Problem]):
    """Each organisation of the ``orgs`` list: files (or globs) relative to the federation file,
    or inline definitions. Overlapping globs (``orgs/*.yaml`` and ``orgs/a.yaml``) name a file
    once, not twice: loading it again would report the org as a duplicate of itself."""
    loaded: set[Path] = set()
    for i, item in enumerate(fed.orgs):
        if isinstance(item, OrgFile):
            org = _org(item, fed_file, lines.within("orgs", i), model, problems)
            if org is not None:
                yield org
            continue
        files = sorted(glob.glob(str(fed_file.parent / item)))
        where = {"file": fed_file, "line": lines.of("orgs", i), "field": "orgs"}
        if not files:
            problems.append(Problem(f"no organisation file matches {item!r}", **where))
        if len(files) + len(loaded) > MAX_ORGS:
            problems.append(
                Problem(f"{item!r} matches {len(files)} files: a plan has at most {MAX_ORGS} organisations", **where)
            )
            return
        for f in files:
            if Path(f).resolve() in loaded:
                continue
            loaded.add(Path(f).resolve())
            spec, org_lines, found = load_yaml(Path(f), OrgFile)
            problems += found
            org = _org(spec, Path(f), Lines(org_lines), model, problems) if spec is not None else None
            if org is not None:
                yield org


def _org(spec: OrgFile, file: Path, lines: Lines, model: ModelConfig, problems: list[Problem]) -> Org | None:
    entries = []
    for i, selector in enumerate(spec.holds):
        line = lines.of("holds", i)
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
                    line=lines.of("local", i),
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
    if spec.activation_checkpointing and entries and not any(u.layer >= 0 for e in entries for u in e.units):
        problems.append(
            Problem(
                "activation checkpointing recomputes layers, and this organisation holds none (only "
                f"{', '.join(e.selector for e in entries)}): remove the field",
                file=file,
                line=lines.of("activation_checkpointing"),
                org=spec.org,
                field="activation_checkpointing",
            )
        )
    owns = _owned(spec, file, lines, model, bool(train), problems)
    _check_task(spec, file, lines, model, bool(train), problems)
    local = tuple(s.strip() for s in spec.local)
    return Org(
        spec.org,
        file,
        spec.device,
        tuple(train),
        tuple(evals),
        tuple(entries),
        local,
        spec.address,
        spec.activation_checkpointing,
        lines.of("device"),
        owns,
        spec.withdraw_experts,
        spec.task,
    )


def _check_task(
    spec: OrgFile, file: Path, lines: Lines, model: ModelConfig, holds_data: bool, problems: list[Problem]
) -> None:
    """An organisation's ``task``: one the federation declares, trained on its own data."""
    if spec.task is None:
        return
    where = {"file": file, "line": lines.of("task"), "org": spec.org, "field": "task"}
    declared = [t.name for t in model.tasks]
    if spec.task not in declared:
        problems.append(
            Problem(
                f"task {spec.task!r} is not declared: the federation file's 'tasks' section declares "
                f"{', '.join(declared) or 'none'}",
                **where,
            )
        )
    elif not holds_data:
        problems.append(
            Problem(
                f"task {spec.task!r} trains on this organisation's labelled data, and it has none: give it "
                "'data: {train: FILE.jsonl}' (lines with 'text' and 'label')",
                **where,
            )
        )


def _owned(
    spec: OrgFile, file: Path, lines: Lines, model: ModelConfig, holds_data: bool, problems: list[Problem]
) -> tuple[Entry, ...]:
    """The org's ``owns`` entries: routed experts only, and only a data owner's."""
    where = {"file": file, "org": spec.org}
    if spec.owns and not holds_data:
        problems.append(
            Problem(
                "owned experts train on their owner's batches only, and this organisation has none: give it "
                "'data: {train: ...}', or name the experts in the 'owns' of the data owner they serve",
                line=lines.of("owns"),
                field="owns",
                **where,
            )
        )
    if spec.withdraw_experts and not spec.owns:
        problems.append(
            Problem(
                "withdraw_experts leaves this organisation's owned experts out of exported models, and it owns "
                "none: add them to 'owns', or remove the field",
                line=lines.of("withdraw_experts"),
                field="withdraw_experts",
                **where,
            )
        )
    entries = []
    for i, selector in enumerate(spec.owns):
        line = lines.of("owns", i)
        try:
            units = parse_selector(selector, model)
        except SelectorError as e:
            problems.append(Problem(str(e), line=line, selector=selector, field="owns", **where))
            continue
        others = frozenset(u for u in units if u.kind != "expert")
        if others:
            problems.append(
                Problem(
                    f"an organisation owns routed experts only (layers.A-B.experts.E-F), and this also names "
                    f"{describe(others, model)}",
                    line=line,
                    selector=selector,
                    field="owns",
                    **where,
                )
            )
            continue
        entries.append(Entry(spec.org, selector.strip(), units, file, line))
    return tuple(entries)


def _data_paths(file: Path, lines: Lines, spec: OrgFile, split: str, problems: list[Problem]) -> list[Path]:
    value = getattr(spec.data, split) if spec.data else None
    if value is None:
        return []
    paths: list[Path] = []
    for pattern in [value] if isinstance(value, str) else value:
        matches = sorted(glob.glob(str(file.parent / pattern)))
        where = {"file": file, "line": lines.of("data", split), "org": spec.org, "field": f"data.{split}"}
        if not matches:
            problems.append(
                Problem(f"data file {pattern!r} does not exist (paths are relative to {file.parent})", **where)
            )
        for m in matches:
            why = not_a_regular_file(Path(m))
            if why:
                problems.append(Problem(f"data file {m} {why}", **where))
            else:
                paths.append(Path(m).resolve())
    return paths


def _partitions(model: ModelConfig, fed_file: Path, orgs: dict[str, Org], problems: list[Problem]) -> list[Partition]:
    entries = [e for org in orgs.values() for e in org.entries]
    for i, a in enumerate(entries):
        for b in entries[i + 1 :]:
            shared = a.units & b.units
            if shared and not (a.units <= b.units or b.units <= a.units):
                problems.append(
                    Problem(
                        f"overlaps '{b.selector}' of org '{b.org}' ({b.file}) on {describe(shared, model)}, but the "
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
                f"held by no organisation: {describe(missing, model)}; add them to some organisation's 'holds'",
                file=fed_file,
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


def _check_owned_experts(
    model: ModelConfig, orgs: dict[str, Org], partitions: list[Partition], problems: list[Problem]
) -> None:
    """Owned experts have one owner and one holder (they are never averaged), and every data owner
    keeps at least ``top_k`` experts it may be routed to in every layer."""
    partition_of = {u: p for p in partitions for u in p.units}
    owner: dict[Unit, str] = {}
    for org in orgs.values():
        for entry in org.owns:
            where = {"file": entry.file, "line": entry.line, "org": org.name, "selector": entry.selector}
            taken = sorted({owner[u] for u in entry.units if u in owner and owner[u] != org.name})
            if taken:
                problems.append(Problem(f"these experts are already owned by {', '.join(taken)}", **where))
            shared = frozenset(u for u in entry.units if partition_of[u].replicated)
            if shared:
                holders = sorted({h for u in shared for h in partition_of[u].holders})
                problems.append(
                    Problem(
                        f"owned experts are never averaged, so exactly one organisation holds each, and "
                        f"{', '.join(holders)} all hold {describe(shared, model)}: carve them out into one "
                        f"organisation's holds (e.g. '{describe(shared, model).split(', ')[0]}' in {org.name}'s)",
                        **where,
                    )
                )
            owner.update(dict.fromkeys(entry.units, org.name))
    if problems or not owner:
        return
    for name, org in orgs.items():
        if not org.holds_data:
            continue
        for layer in range(model.num_layers):
            barred = sorted((u.index, o) for u, o in owner.items() if u.layer == layer and o != name)
            short = _too_few_reachable(model, [e for e, _ in barred])
            if short:
                problems.append(
                    Problem(
                        f"its batches may be routed to {short[0]} of layer {layer} (the others are owned by "
                        f"{', '.join(sorted({o for _, o in barred}))}), {short[1]}: own fewer experts in that layer",
                        file=org.file,
                        org=name,
                        field="owns",
                    )
                )
                break


def _too_few_reachable(model: ModelConfig, barred: list[int]) -> tuple[str, str] | None:
    """(the experts left, why too few) when ``barred`` experts are out of a data owner's reach:
    a soft router needs one, top-k ``top_k``, a hierarchical gate ``top_k`` in every group."""
    left = model.num_experts - len(barred)
    if model.router.kind == "soft":
        return None if left else ("no expert", "and a soft router needs one")
    if model.router.kind == "hierarchical":
        size = model.group_size
        for g in range(model.num_experts // size):
            in_group = size - sum(e // size == g for e in barred)
            if in_group < model.top_k:
                return f"{in_group} experts of group {g}", f"fewer than top_k ({model.top_k}) inside a group"
        return None
    return None if left >= model.top_k else (f"{left} experts", f"fewer than top_k ({model.top_k})")


def _check_data_owners(fed_file: Path, orgs: dict[str, Org], problems: list[Problem]) -> None:
    if orgs and not any(o.holds_data for o in orgs.values()):
        problems.append(
            Problem("no organisation has training data (give at least one org a 'data: {train: ...}')", file=fed_file)
        )


def _checked_tokenizer(
    fed_file: Path, fed: FederationFile, lines: Lines, model: ModelConfig, problems: list[Problem]
) -> Path | None:
    """The plan's tokenizer file (None: bytes), whose vocabulary must fit the model's."""
    path = (fed_file.parent / fed.tokenizer).resolve() if fed.tokenizer else None
    where = {
        "file": fed_file,
        "line": lines.of("tokenizer") if path else lines.of("model"),
        "field": "tokenizer" if path else "model",
    }
    why = not_a_regular_file(path) if path else None
    if why:
        problems.append(Problem(f"the tokenizer file {path} {why}", **where))
        return path
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
                f"in {fed.model if isinstance(fed.model, str) else 'the model'} to at least {vocab}, or train a "
                "smaller tokenizer",
                **where,
            )
        )
    return path


def _privacy_warnings(plan: Plan) -> list[Problem]:
    warnings = []
    for d in plan.data_owners:
        route = plan.route(d)
        org = plan.orgs[d]
        if plan.privacy is not None:
            warnings += _unnoised(plan, d)
        if route[Unit("embed")] != d:
            warnings.append(
                Problem(
                    "raw tokens leave the organisation: it does not hold 'embed', so its token ids go to "
                    f"'{route[Unit('embed')]}'",
                    file=org.file,
                    org=d,
                )
            )
        head = plan.loss_unit(d)
        if route[head] != d:
            what = "next-token labels" if head.kind == "lm_head" else "class labels"
            warnings.append(
                Problem(
                    f"labels leave the organisation: it does not hold '{head}', so its {what} go to '{route[head]}'",
                    file=org.file,
                    org=d,
                )
            )
    return warnings


def _unnoised(plan: Plan, d: str) -> list[Problem]:
    """What ``privacy`` leaves unnoised of data owner ``d``'s: inside the layers it runs itself, the
    inputs (privacy.activations) and the output gradients (privacy.gradients) of the pieces held
    elsewhere; and the gradients it returns, or the hidden states it sends, when only the other is
    noised."""
    route, org, cfg, privacy = plan.route(d), plan.orgs[d], plan.model, plan.privacy
    sent = {
        "privacy.activations": (privacy.activations, "its normalised hidden states"),
        "privacy.gradients": (privacy.gradients, "the gradients of their outputs"),
    }
    out = []
    for layer in range(cfg.num_layers):
        if route[Unit("router", layer)] != d:
            continue
        pieces = [("head groups", "kv", cfg.num_kv_heads), ("experts", "expert", cfg.num_experts)]
        pieces.append(("shared experts", "shared_experts", 1 if cfg.num_shared_experts else 0))
        blocked = plan.blocked_experts(d).get(layer, ())  # the other owners' experts never get its tokens
        for name, kind, count in pieces:
            reached = [i for i in range(count) if not (kind == "expert" and i in blocked)]
            holders = sorted({route[Unit(kind, layer, i if kind != "shared_experts" else -1)] for i in reached} - {d})
            for holder in holders:
                for field, (noise, what) in sent.items():
                    if noise is not None:
                        out.append(
                            Problem(
                                f"{field} noises what crosses the cuts of its path only: layer {layer}'s {name} at "
                                f"{holder} receive {what} without noise",
                                file=org.file,
                                org=d,
                            )
                        )
    returns = any(o == d for o, _ in plan.path(d)[1:])  # it computes after another organisation
    leaves = any(o != d for o, _ in plan.path(d))
    one_sided = {
        "activations": (returns and privacy.gradients is None, "hidden states it sends", "gradients it returns"),
        "gradients": (leaves and privacy.activations is None, "gradients it returns", "hidden states it sends"),
    }
    for field, (gap, covered, uncovered) in one_sided.items():
        other = "gradients" if field == "activations" else "activations"
        if gap and getattr(privacy, field) is not None:
            out.append(
                Problem(
                    f"privacy.{field} noises the {covered}; the {uncovered} are not noised (privacy.{other})",
                    file=org.file,
                    org=d,
                )
            )
    return out


def resolved(plan: Plan) -> dict:
    """The plan as one self-contained document that :func:`load_plan` reads back to the same
    plan: its run settings as they are now, every organisation inline, every path absolute, and
    the model inline (or the absolute path of the model directory whose weights it starts from)."""
    model = str(plan.model_source) if plan.checkpoint is not None else plan.model.base.model_dump(mode="json")
    orgs = []
    for name, o in plan.orgs.items():
        org: dict = {"org": name, "device": o.device, "holds": [e.selector for e in o.entries], "local": list(o.local)}
        if o.train_data or o.eval_data:
            org["data"] = {"train": [str(p) for p in o.train_data], "eval": [str(p) for p in o.eval_data]}
        if o.address:
            org["address"] = o.address
        if o.activation_checkpointing is not None:
            org["activation_checkpointing"] = o.activation_checkpointing
        if o.owns:
            org["owns"] = [e.selector for e in o.owns]
        if o.withdraw_experts:
            org["withdraw_experts"] = True
        if o.task is not None:
            org["task"] = o.task
        orgs.append(org)
    document = {
        "name": plan.name,
        "model": model,
        "training": plan.training.model_dump(mode="json"),
        "aggregation": plan.aggregation.model_dump(mode="json"),
        "transport": plan.transport.model_dump(mode="json"),
        "orgs": orgs,
    }
    if plan.finetune is not None:
        document["finetune"] = plan.finetune.model_dump(mode="json")
    if plan.freeze:
        document["freeze"] = list(plan.freeze)
    if plan.tokenizer is not None:
        document["tokenizer"] = str(plan.tokenizer)
    if plan.privacy is not None:
        document["privacy"] = plan.privacy.model_dump(mode="json")
    if plan.tasks:
        document["tasks"] = {name: t.model_dump(mode="json") for name, t in plan.tasks.items()}
    return document


def write_resolved(plan: Plan, path: Path) -> Path:
    """Write :func:`resolved` to ``path`` (JSON, which :func:`load_plan` reads as YAML)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(resolved(plan), indent=2) + "\n")
    tmp.replace(path)
    return path


def resolved_owned_experts(path: Path) -> dict[str, tuple[frozenset[Unit], bool]]:
    """Each owning organisation's owned experts and whether it withdrew them, read from a run's
    resolved plan without validating the rest (as :func:`resolved_model`): what export leaves out."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    model = resolved_model(path)
    return {
        o["org"]: (
            frozenset(u for s in o["owns"] for u in parse_selector(s, model)),
            bool(o.get("withdraw_experts", False)),
        )
        for o in document["orgs"]
        if o.get("owns")
    }


def resolved_model(path: Path) -> ModelConfig:
    """The model configuration of a resolved plan file, read without validating the rest of the
    plan (whose data files may live on other machines): what a run's checkpoints load into."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    model = document["model"]
    base = ModelConfig.model_validate(model) if isinstance(model, dict) else open_checkpoint(Path(model)).config
    finetune = document.get("finetune")
    adapted = adapted_model(base, None if finetune is None else FinetuneConfig.model_validate(finetune))
    tasks = {name: TaskConfig.model_validate(t) for name, t in document.get("tasks", {}).items()}
    return with_tasks(adapted, tasks)
