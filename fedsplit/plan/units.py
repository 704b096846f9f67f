"""Units: the smallest pieces of the model a plan can place, and the selector grammar over them.

A *unit* is one of

* ``embed``, ``final_norm``, ``lm_head``;
* ``layers.N.router``: the layer's owner part (its two RMSNorms and its router). Whoever holds
  it runs the layer and calls the holders of the layer's heads and experts;
* ``layers.N.attention.kv.G``: KV head ``G`` with every query head that reads it (grouped-query
  attention never splits a KV head);
* ``layers.N.experts.E``: routed expert ``E``;
* ``layers.N.shared_experts``: the always-active shared experts;
* ``tasks.NAME``: a task's classification head (the plan's ``tasks`` section).

Selectors name sets of units:

    embed | final_norm | lm_head | tasks.NAME
    layers.A[-B]                              every unit of layers A..B (inclusive)
    layers.A[-B].router
    layers.A[-B].attention                    all heads
    layers.A[-B].attention.heads.H[-K]        query heads H..K, aligned to whole KV heads
    layers.A[-B].experts[.E[-F]]
    layers.A[-B].experts.group.G[-H]          a hierarchical router's groups G..H, every expert of each
    layers.A[-B].shared_experts
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..model import ModelConfig


class Unit(NamedTuple):
    kind: str  # embed | final_norm | lm_head | task | router | kv | expert | shared_experts
    layer: int = -1
    index: int = -1
    name: str = ""  # a task head's

    @property
    def position(self) -> tuple[int, int, int, str]:
        """Sort key in model order: embed, then each layer (router, heads, experts, shared), then
        final_norm, lm_head and the task heads by name."""
        ends = {"embed": (-1, 0), "final_norm": (1 << 30, 0), "lm_head": (1 << 30, 1), "task": (1 << 30, 2)}
        if self.kind in ends:
            return (*ends[self.kind], 0, self.name)
        rank = ("router", "kv", "expert", "shared_experts").index(self.kind)
        return (self.layer, rank, self.index, "")

    def __str__(self) -> str:
        if self.kind == "task":
            return f"tasks.{self.name}"
        if self.layer < 0:
            return self.kind
        if self.kind == "router":
            return f"layers.{self.layer}.router"
        if self.kind == "kv":
            return f"layers.{self.layer}.attention.kv.{self.index}"
        if self.kind == "expert":
            return f"layers.{self.layer}.experts.{self.index}"
        return f"layers.{self.layer}.shared_experts"


class SelectorError(ValueError):
    """A selector that does not parse or does not fit the model; the message says why."""


GRAMMAR = (
    "expected embed, final_norm, lm_head, tasks.NAME, or layers.A-B optionally followed by .router, "
    ".attention, .attention.heads.H-K, .experts, .experts.E-F, .experts.group.G-H (a hierarchical router's "
    "groups) or .shared_experts"
)

_SELECTOR = re.compile(
    r"^layers\.(?P<l0>\d+)(?:-(?P<l1>\d+))?"
    r"(?:\.(?P<part>router|shared_experts"
    r"|attention(?:\.heads\.(?P<h0>\d+)(?:-(?P<h1>\d+))?)?"
    r"|experts(?:\.group\.(?P<g0>\d+)(?:-(?P<g1>\d+))?|\.(?P<e0>\d+)(?:-(?P<e1>\d+))?)?))?$"
)


def _range(lo: str, hi: str | None, what: str, count: int) -> range:
    a, b = int(lo), int(hi) if hi is not None else int(lo)
    if b < a:
        raise SelectorError(f"{what} range {a}-{b} is empty (the first number must not exceed the second)")
    if b >= count:
        raise SelectorError(f"{what} {a}-{b} is outside the model: it has {count} {what}s, 0-{count - 1}")
    return range(a, b + 1)


def all_units(cfg: ModelConfig) -> frozenset[Unit]:
    units = {Unit("embed"), Unit("final_norm"), Unit("lm_head")} | set(task_units(cfg))
    for i in range(cfg.num_layers):
        units |= layer_units(cfg, i)
    return frozenset(units)


def task_units(cfg: ModelConfig) -> list[Unit]:
    """The model's task heads, one unit each."""
    return [Unit("task", name=t.name) for t in cfg.tasks]


def layer_units(cfg: ModelConfig, layer: int) -> set[Unit]:
    units = {Unit("router", layer)}
    units |= {Unit("kv", layer, g) for g in range(cfg.num_kv_heads)}
    units |= {Unit("expert", layer, e) for e in range(cfg.num_experts)}
    if cfg.num_shared_experts:
        units.add(Unit("shared_experts", layer))
    return units


def parse_selector(selector: str, cfg: ModelConfig) -> frozenset[Unit]:
    """The units a selector names, or a :class:`SelectorError` saying what is wrong."""
    text = selector.strip()
    if text in ("embed", "final_norm", "lm_head"):
        return frozenset({Unit(text)})
    if text.startswith("tasks."):
        name = text.removeprefix("tasks.")
        if Unit("task", name=name) not in task_units(cfg):
            declared = ", ".join(t.name for t in cfg.tasks) or "none"
            raise SelectorError(f"no task named {name!r} (the federation file's 'tasks' declares {declared})")
        return frozenset({Unit("task", name=name)})
    m = _SELECTOR.match(text)
    if not m:
        raise SelectorError(f"cannot parse selector: {GRAMMAR}")
    layers = _range(m["l0"], m["l1"], "layer", cfg.num_layers)
    part = m.group("part")
    units: set[Unit] = set()
    for i in layers:
        if part is None:
            units |= layer_units(cfg, i)
        elif part == "router":
            units.add(Unit("router", i))
        elif part == "shared_experts":
            if not cfg.num_shared_experts:
                raise SelectorError("the model has no shared experts (num_shared_experts is 0)")
            units.add(Unit("shared_experts", i))
        elif part.startswith("attention"):
            units |= {Unit("kv", i, g) for g in _kv_groups(m["h0"], m["h1"], cfg)}
        elif m["g0"] is not None:
            units |= {Unit("expert", i, e) for e in _group_experts(m["g0"], m["g1"], cfg)}
        else:
            experts = range(cfg.num_experts) if m["e0"] is None else _range(m["e0"], m["e1"], "expert", cfg.num_experts)
            units |= {Unit("expert", i, e) for e in experts}
    return frozenset(units)


def _group_experts(lo: str, hi: str | None, cfg: ModelConfig) -> range:
    """The experts of a hierarchical router's groups ``lo``-``hi``: group G is experts G*S to G*S+S-1."""
    if cfg.router.kind != "hierarchical":
        raise SelectorError(
            f"experts.group selects a hierarchical router's groups, and this model's router is '{cfg.router.kind}'"
        )
    groups = _range(lo, hi, "group", cfg.num_experts // cfg.group_size)
    return range(groups.start * cfg.group_size, groups.stop * cfg.group_size)


def _kv_groups(lo: str | None, hi: str | None, cfg: ModelConfig) -> range:
    if lo is None:
        return range(cfg.num_kv_heads)
    heads = _range(lo, hi, "head", cfg.num_heads)
    per = cfg.heads_per_kv_head
    if heads.start % per or heads.stop % per:
        kv = (heads.start // per) if heads.start % per else ((heads.stop - 1) // per)
        raise SelectorError(
            f"heads {heads.start}-{heads.stop - 1} split KV head {kv}: with {cfg.num_heads} query heads and "
            f"{cfg.num_kv_heads} KV heads each KV head serves {per} query heads "
            f"({kv * per}-{kv * per + per - 1}), so a head group must start at a multiple of {per} "
            f"and end just before one"
        )
    return range(heads.start // per, heads.stop // per)


def describe(units: frozenset[Unit] | set[Unit], cfg: ModelConfig) -> str:
    """A unit set in model order as selectors a plan can hold: whole layers fold into
    ``layers.A-B``, consecutive experts into ``layers.N.experts.E-F`` and KV heads into the query
    heads that read them, ``layers.N.attention.heads.H-K`` (plans select query heads)."""
    whole = [i for i in range(cfg.num_layers) if layer_units(cfg, i) <= set(units)]
    rest = [u for u in units if u.layer not in whole and u.kind != "task"]
    groups: dict[tuple[str, int], list[int]] = {}
    for u in sorted(rest, key=lambda u: u.position):
        groups.setdefault((u.kind, u.layer), []).append(u.index)
    parts: list[tuple[tuple, str]] = [((a, -1, 0, ""), f"layers.{_span(a, b)}") for a, b in _runs(whole)]
    parts += [(u.position, str(u)) for u in units if u.kind == "task"]
    per = cfg.heads_per_kv_head
    for (kind, layer), idx in groups.items():
        if layer < 0 or kind in ("router", "shared_experts"):
            parts.append((Unit(kind, layer, idx[0]).position, str(Unit(kind, layer))))
            continue
        every = cfg.num_experts if kind == "expert" else cfg.num_kv_heads
        for a, b in _runs(idx):
            if kind == "expert":
                name = "experts" if b - a + 1 == every else f"experts.{_span(a, b)}"
            else:
                name = "attention" if b - a + 1 == every else f"attention.heads.{_span(a * per, b * per + per - 1)}"
            parts.append((Unit(kind, layer, a).position, f"layers.{layer}.{name}"))
    return ", ".join(text for _, text in sorted(parts))


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Sorted values as (first, last) of each run of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs


def _span(a: int, b: int) -> str:
    return f"{a}" if a == b else f"{a}-{b}"
