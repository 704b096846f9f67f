"""``fedsplit plan generate``: a U-shaped federation plan for any number of organisations.

``D`` data owners (``data-00``, ...) each hold a replica of both ends of the model (``embed``,
``layers.0``, ``final_norm``, ``lm_head``), so their tokens and labels never leave them. The
other organisations host the middle layers ``1..L-1``, in three kinds of pieces:

* ``compute-NN``: a range of middle layers: their norms, routers and shared experts, i.e. what
  is left of the layers once the two kinds below are carved out;
* ``heads-NN``: KV groups of the middle layers' attention, each with the query heads reading it;
* ``experts-NN``: routed experts of the middle layers.

Each kind cuts its units (layers, KV groups, experts) into contiguous runs of near-equal size,
one run per organisation of that kind. Heads and experts are named one layer at a time
(``layers.2.experts.0-3``), never across layers, so that each is inside whatever layer range
holds its layer: a plan allows overlapping selections only when one is inside the other.

With more organisations than units, every unit is a piece of its own (a single layer, KV group
or expert) and the surplus organisations replicate pieces in turn. A middle piece's replicas
split the data owners between them (:meth:`.Plan.replica_for`), so a piece has at most ``D``
useful replicas: one more would serve no batch and never train, and such plans are refused.
"""

from __future__ import annotations

import inspect
import os
import shlex
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..model import ModelConfig
from .schema import TrainingConfig

if TYPE_CHECKING:
    from ..data.corpus_split import CorpusSplit

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "configs" / "models" / "tiny.yaml"
TRAIN_DATA = REPO / "data" / "tinyshakespeare.txt"

# The kinds of middle pieces, in the order their pieces are replicated: compute and heads see
# every token, experts only the tokens routed to them.
KINDS = ("compute", "heads", "experts")


def default_data_owners(orgs: int) -> int:
    return max(1, orgs // 4)


def data_owner_names(d: int) -> list[str]:
    """``data-00``, ``data-01``, ...: the data owners of a generated plan (and of ``fedsplit data split``)."""
    width = max(2, len(str(d - 1)))
    return [f"data-{i:0{width}d}" for i in range(d)]


def generate_plan(orgs: int, out_dir: str | Path, **options) -> Path:
    """Write ``out_dir/federation.yaml`` and ``out_dir/orgs/<org>.yaml``; return the former.

    ``options`` are those of :func:`render_plan`. ``model`` is a model YAML (relative to the
    working directory or absolute). ``data_owners`` defaults to a quarter of ``orgs`` (at least
    one), ``name`` to ``generated-<orgs>``, and ``seed`` is the training seed. Raises
    :class:`ValueError` on arguments no valid plan fits,
    or when ``out_dir/orgs`` holds other organisation files (the plan would pick them up).
    """
    out_dir = Path(out_dir)
    files = render_plan(orgs, out_dir, **options)
    stale = sorted(p.name for p in (out_dir / "orgs").glob("*.yaml") if f"orgs/{p.name}" not in files)
    if stale:
        raise ValueError(
            f"{out_dir / 'orgs'} holds organisation files this plan does not write ({', '.join(stale)}); "
            f"the federation file would pick them up: remove them or choose another directory"
        )
    for relative, text in files.items():
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return out_dir / "federation.yaml"


def render_plan(
    orgs: int,
    out_dir: str | Path,
    model: str | Path = DEFAULT_MODEL,
    data_owners: int | None = None,
    name: str | None = None,
    seed: int = 0,
    rounds: int = 1,
    steps_per_round: int = 2,
    batch_size: int = 2,
    seq_len: int = 32,
    split: CorpusSplit | None = None,
) -> dict[str, str]:
    """The files :func:`generate_plan` writes, by path relative to ``out_dir``, without writing
    them (``out_dir`` only decides the relative paths inside them). With a ``split`` (of the
    shipped corpora across :func:`data_owner_names`) its files go under ``data/`` and each data
    owner trains and evaluates on its own; without, every data owner trains on Shakespeare."""
    d = default_data_owners(orgs) if data_owners is None else data_owners
    if orgs < 2:
        raise ValueError(
            f"--orgs must be at least 2 (a data owner and an organisation hosting the middle layers), got {orgs}"
        )
    if not 1 <= d < orgs:
        raise ValueError(
            f"--data-owners must be between 1 and orgs - 1 = {orgs - 1} (someone must host the middle layers), got {d}"
        )
    model_file = Path(model).resolve()
    try:
        cfg = ModelConfig.from_yaml(model_file)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the model file {model}: {e}") from e
    middle = _middle_orgs(cfg, orgs - d, d)

    out = Path(out_dir).resolve()
    plan_name = name or f"generated-{orgs}"
    training = {
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "micro_batches": 1,
        "optimizer": {"name": "adamw", "lr": 3.0e-4},
        "seed": seed,
    }
    settings = {k: training[k] for k in ("seed", "rounds", "steps_per_round", "batch_size", "seq_len")}
    TrainingConfig.model_validate(training)  # a ValueError now rather than an invalid plan on disk
    per_kind = Counter(org.rsplit("-", 1)[0] for org, _, _ in middle)
    if split is not None and list(split.train) != data_owner_names(d):
        raise ValueError(
            f"the data split is for {', '.join(split.train)}, the plan's data owners are "
            f"{', '.join(data_owner_names(d))}"
        )
    header = (
        f"# Generated by `{_command(orgs, out, model_file, d, plan_name, settings, split)}` (from the "
        "repository root): "
        f"regenerate, do not edit.\n"
        f"# {orgs} organisations: {d} data owners holding both ends of the model (U-shape), {orgs - d} hosting "
        f"the middle layers ({', '.join(f'{per_kind[k]} {k}' for k in KINDS)}).\n"
    )
    federation = {
        "name": plan_name,
        "model": _relative(model_file, out),
        "training": training,
        "aggregation": {"strategy": "fedavg"},
        "orgs": ["orgs/*.yaml"],
    }
    files = {"federation.yaml": header + _dump(federation)}
    for org in data_owner_names(d):
        data = (
            {"train": f"../data/{org}/train.jsonl", "eval": f"../data/{org}/eval.jsonl"}
            if split is not None
            else {"train": _relative(TRAIN_DATA, out / "orgs")}
        )
        files[f"orgs/{org}.yaml"] = _dump(
            {"org": org, "data": data, "holds": ["embed", "layers.0", "final_norm", "lm_head"]}
        )
    if split is not None:
        files.update(split.files(prefix="data"))
    for org, holds, replica_of in middle:
        comment = (
            f"# a replica of {replica_of}: replicas serve different data owners and are averaged after each round\n"
            if replica_of
            else ""
        )
        files[f"orgs/{org}.yaml"] = comment + _dump({"org": org, "holds": holds})
    return files


def _command(
    orgs: int, out: Path, model: Path, d: int, name: str, settings: dict[str, int], split: CorpusSplit | None
) -> str:
    """The shortest ``fedsplit plan generate`` command line that writes this plan again."""
    args = ["fedsplit", "plan", "generate", "--orgs", str(orgs), "--out", _shown(out)]
    args += ["--data-owners", str(d)] if d != default_data_owners(orgs) else []
    args += ["--model", _shown(model)] if model != DEFAULT_MODEL else []
    args += ["--name", name] if name != f"generated-{orgs}" else []
    defaults = inspect.signature(render_plan).parameters
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)] if value != defaults[key].default else []
    if split is not None:
        args += ["--split", split.by] + (["--alpha", f"{split.alpha:g}"] if split.by == "dirichlet" else [])
    return shlex.join(args)


def _middle_orgs(cfg: ModelConfig, m: int, d: int) -> list[tuple[str, list[str], str | None]]:
    """The ``m`` organisations hosting layers 1.. as (name, holds, name of the org it replicates)."""
    layers = range(1, cfg.num_layers)
    units = {
        "compute": [(i, 0) for i in layers],
        "heads": [(i, g) for i in layers for g in range(cfg.num_kv_heads)],
        "experts": [(i, e) for i in layers for e in range(cfg.num_experts)],
    }
    total = sum(len(u) for u in units.values())
    if not total:
        raise ValueError(
            "the model has a single layer: with layer 0 at the data owners, there is nothing to host in the middle"
        )
    if m > total * d:
        raise ValueError(
            f"the {m} organisations besides the data owners cannot all host a piece: "
            f"{_span('layers ', 1, cfg.num_layers - 1)} "
            f"cut into at most {total} pieces, and a piece is useful to at most {d} holders, one per data "
            "owner (a replica "
            f"beyond that would serve no batch and never train); use fewer organisations or more data owners"
        )
    counts = _org_counts(min(m, total), [len(units[k]) for k in KINDS])
    pieces = [(k, run) for k, n in zip(KINDS, counts) for run in _runs(units[k], n)]
    width = max(2, len(str(m - 1)))
    orgs: list[tuple[str, list[str], str | None]] = []
    named = dict.fromkeys(KINDS, 0)
    for i in range(m):
        kind, run = pieces[i % len(pieces)]
        org = f"{kind}-{named[kind]:0{width}d}"
        named[kind] += 1
        orgs.append((org, _selectors(kind, run, cfg), orgs[i % len(pieces)][0] if i >= len(pieces) else None))
    return orgs


def _org_counts(m: int, sizes: list[int]) -> list[int]:
    """How many organisations each kind gets, ``m <= sum(sizes)``: the first always goes to the
    layer ranges (someone must run the middle layers); then every kind gets one, largest first;
    then each next organisation goes to the kind with the most units per organisation."""
    counts = [1] + [0] * (len(sizes) - 1)
    for _ in range(m - 1):
        open_kinds = [k for k in range(len(sizes)) if counts[k] < sizes[k]]
        chosen = max(open_kinds, key=lambda k: (counts[k] == 0, sizes[k] / max(counts[k], 1)))
        counts[chosen] += 1
    return counts


def _runs(units: list[tuple[int, int]], n: int) -> list[list[tuple[int, int]]]:
    """``units`` cut into ``n`` contiguous runs whose sizes differ by at most one."""
    return [units[len(units) * i // n : len(units) * (i + 1) // n] for i in range(n)]


def _selectors(kind: str, run: list[tuple[int, int]], cfg: ModelConfig) -> list[str]:
    if kind == "compute":
        return [_span("layers.", run[0][0], run[-1][0])]
    by_layer: dict[int, list[int]] = {}
    for layer, index in run:
        by_layer.setdefault(layer, []).append(index)
    if kind == "experts":
        return [_span(f"layers.{i}.experts.", idx[0], idx[-1]) for i, idx in by_layer.items()]
    per = cfg.heads_per_kv_head  # a head group holds whole KV groups
    return [_span(f"layers.{i}.attention.heads.", idx[0] * per, idx[-1] * per + per - 1) for i, idx in by_layer.items()]


def _span(prefix: str, a: int, b: int) -> str:
    return f"{prefix}{a}" if a == b else f"{prefix}{a}-{b}"


def _relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def _shown(path: Path) -> str:
    """A path as the regenerating command names it: from the repository root if inside it."""
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def _dump(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
