"""``fedsplit plan new``: a commented starting plan for a model, written to be edited by hand.

Unlike ``plan generate`` (many organisations, regenerated rather than edited), it writes three
organisations in a U-shape and explains, in comments, the model's shape (its layers, query
heads and the KV heads they share, experts) and how each kind of piece is selected:

* ``data-owner`` holds both ends (``embed``, ``layers.0``, ``final_norm``, ``lm_head``), so its
  tokens and labels never leave it;
* ``compute`` holds the middle layers;
* ``experts`` holds the second half of the middle layers' routed experts, carved out of the
  compute organisation's layers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..interop import is_model_directory, open_checkpoint
from ..model import ModelConfig
from .templates import DEFAULT_MODEL, REPO, TRAIN_DATA

ORGS = ("data-owner", "compute", "experts")


def read_model(path: Path) -> ModelConfig:
    """The configuration of a model YAML or a model directory (Hugging Face or fedsplit)."""
    return open_checkpoint(path).config if is_model_directory(path) else ModelConfig.from_yaml(path)


def router_description(cfg: ModelConfig) -> str:
    """The router in a few words, as ``plan show`` and the starter plan's comments state it."""
    router = cfg.router
    if router.kind == "soft":
        words = "soft: every expert, weighted"
    elif router.kind == "hard":
        words = f"hard: one expert by Gumbel-softmax at temperature {router.gumbel_temperature:g}"
    elif router.kind == "hierarchical":
        size = cfg.group_size
        words = (
            f"hierarchical: top-{router.groups_kept} of {router.groups} groups of {size} "
            f"(group G is experts G*{size}-G*{size}+{size - 1}), then top-{cfg.top_k} inside"
        )
    else:
        words = f"top-{cfg.top_k}"
    if router.capacity_factor is not None:
        words += f", capacity factor {router.capacity_factor:g}"
    return words


def model_shape(cfg: ModelConfig) -> list[str]:
    """The model's shape as a plan selects it, one comment line each."""
    last = cfg.num_layers - 1
    per = cfg.heads_per_kv_head
    lines = [
        f"layers 0-{last} ({cfg.num_layers}); hidden size {cfg.hidden_size}; vocabulary {cfg.vocab_size}",
        f"attention: {cfg.num_heads} query heads sharing {cfg.num_kv_heads} KV heads, {per} query heads each; "
        f"a head group is layers.N.attention.heads.H-K of whole KV heads (H and K + 1 multiples of {per})",
        f"experts: {cfg.num_experts} routed ({router_description(cfg)}), layers.N.experts.E-F with E, F in 0-"
        f"{cfg.num_experts - 1}",
    ]
    if cfg.num_shared_experts:
        lines.append(f"shared experts: {cfg.num_shared_experts} per layer, always active: layers.N.shared_experts")
    lines.append(
        "the other pieces: embed, final_norm, lm_head, and layers.N.router (the layer's norms and router: "
        "whoever holds it runs the layer)"
    )
    return lines


def starting_plan(out_dir: Path, model: Path = DEFAULT_MODEL, name: str | None = None) -> dict[str, str]:
    """The files of a starting plan by path relative to ``out_dir``. Raises :class:`ValueError`
    when the model cannot be read or has a single layer (nothing for the middle to hold)."""
    model = Path(model).resolve()
    try:
        cfg = read_model(model)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the model {model}: {e}") from e
    if cfg.num_layers < 2:
        raise ValueError(f"{model} has a single layer: with layer 0 at the data owner there is no middle to hold")
    out = Path(out_dir).resolve()
    last = cfg.num_layers - 1
    middle = "layers.1" if last == 1 else f"layers.1-{last}"
    half = cfg.num_experts // 2
    carved = f"{middle}.experts.{half}-{cfg.num_experts - 1}" if half else f"{middle}.experts"
    shape = "\n".join(f"#   {line}" for line in model_shape(cfg))
    federation = f"""\
# A starting plan: edit it, then check it with `fedsplit plan check {Path(out_dir) / "federation.yaml"}`
# and see the partition map with `fedsplit plan show` on the same file.
#
# The model ({_relative(model, out)}):
{shape}
name: {json.dumps(name or out.name)}
model: {json.dumps(_relative(model, out))}
training:
  rounds: 2                  # rounds of training; the coordinator averages replicas after each
  steps_per_round: 5         # optimizer steps per round on every data owner's batches
  batch_size: 4              # sequences per data owner per step
  seq_len: 64                # tokens per sequence
  micro_batches: 2           # a step's batch in micro-batches, pipelined through the organisations
  optimizer: {{name: adamw, lr: 1.0e-3}}
  seed: 0                    # initial weights and batch order: same seed, same run
  eval_tokens: 4096          # held-out tokens each data owner evaluates after each round (0: off)
aggregation:
  strategy: fedavg           # fedavg | fedprox | fedadam | diloco, for pieces held by several organisations
transport:
  timeout_s: 60              # deadline of one activation or gradient call between organisations
orgs: [orgs/*.yaml]          # one file per organisation
"""
    data_owner = f"""\
# The data owner: its batches start and end here, so both ends of the model are its own.
# A second data owner with the same 'holds' would hold replicas of them, averaged each round.
org: data-owner
data:
  train: {json.dumps(_relative(TRAIN_DATA, out / "orgs"))}   # text, or .jsonl with a "text" field; eval: held-out
holds:
  - embed
  - layers.0
  - final_norm
  - lm_head
"""
    compute = f"""\
# The middle layers: their attention, router, experts and shared experts, except what another
# organisation carves out of them (a selection inside another one is a carve-out).
org: compute
holds:
  - {middle}
# device: cuda:0             # where it trains (default: a GPU if there is one, else the CPU)
"""
    experts = f"""\
# Routed experts carved out of the compute organisation's layers: it receives only the tokens the
# router sends to them. A head group is carved out the same way, e.g.
#   - layers.{last}.attention.heads.0-{cfg.heads_per_kv_head - 1}
org: experts
holds:
  - {carved}
"""
    return {
        "federation.yaml": federation,
        "orgs/data-owner.yaml": data_owner,
        "orgs/compute.yaml": compute,
        "orgs/experts.yaml": experts,
    }


def write_starting_plan(out_dir: Path, model: Path = DEFAULT_MODEL, name: str | None = None) -> Path:
    """Write :func:`starting_plan` into ``out_dir`` and return its federation file; refuses
    (:class:`ValueError`) to overwrite a plan or to add organisations to an existing ``orgs/``."""
    out_dir = Path(out_dir)
    files = starting_plan(out_dir, model, name)
    taken = sorted(str(out_dir / f) for f in files if (out_dir / f).exists())
    taken += sorted(str(p) for p in (out_dir / "orgs").glob("*.yaml") if f"orgs/{p.name}" not in files)
    if taken:
        raise ValueError(f"{out_dir} already holds a plan ({', '.join(taken)}): choose an empty directory")
    try:
        for relative, text in files.items():
            path = out_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    except OSError as e:
        remove_starting_plan(out_dir)
        raise ValueError(f"cannot write into {out_dir}: {e.strerror or e}") from None
    return out_dir / "federation.yaml"


def remove_starting_plan(out_dir: Path) -> None:
    """Remove what :func:`write_starting_plan` wrote (a plan that did not validate)."""
    for relative in (*(f"orgs/{org}.yaml" for org in ORGS), "federation.yaml"):
        (Path(out_dir) / relative).unlink(missing_ok=True)
    for directory in (Path(out_dir) / "orgs", Path(out_dir)):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def _relative(target: Path, start: Path) -> str:
    """``target`` relative to ``start`` when both are in the repository (the plan moves with it),
    else absolute."""
    if target.is_relative_to(REPO) and start.is_relative_to(REPO):
        return Path(os.path.relpath(target, start)).as_posix()
    return target.as_posix()
