"""Slicing the model by plan and putting it back together is exact.

Property tests generate random valid plans (layer ranges, expert and head-group carve-outs,
nested carve-outs, replicas), load them through :func:`load_plan`, slice a monolithic state dict
by each partition, reassemble, and require every tensor back bit for bit.
"""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsplit.model import ModelConfig, MoETransformer
from fedsplit.plan import ReassemblyError, TensorSlice, load_plan, reassemble, select, unit_slices
from fedsplit.plan.slicing import parameter_shapes, unit_parameter_count
from fedsplit.plan.units import all_units, parse_selector

from ..conftest import MODELS, PLANS

TINY = ModelConfig.from_yaml(MODELS / "tiny.yaml")
CONFIGS = {
    "tiny": TINY,
    # tied embeddings (no lm_head tensor), no shared experts, 4 query heads per KV head
    "tied": TINY.model_copy(update={"tie_embeddings": True, "num_shared_experts": 0, "num_kv_heads": 2}),
}
ORGS = ["hospital-a", "org-b", "org-c", "org-d"]


@cache
def monolithic(name: str) -> dict[str, torch.Tensor]:
    """A state dict with every element random (norm weights too, which init to ones), so a
    misplaced slice cannot go unnoticed."""
    gen = torch.Generator().manual_seed(1234)
    sd = MoETransformer(CONFIGS[name]).state_dict()
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in sd.items()}


@cache
def empty_model(name: str) -> MoETransformer:
    """A model to load reassembled state dicts into (built once: construction dominates)."""
    return MoETransformer(CONFIGS[name])


def _span(draw, count: int) -> tuple[int, int]:
    a = draw(st.integers(0, count - 1))
    return a, draw(st.integers(a, count - 1))


def _fmt(prefix: str, a: int, b: int, draw) -> str:
    """``prefix.a-b``, written ``prefix.a`` or ``prefix.a-a`` at random when a == b."""
    if a == b and draw(st.booleans()):
        return f"{prefix}.{a}"
    return f"{prefix}.{a}-{b}"


@st.composite
def plans(draw):
    """(model name, {org: [selector, ...]}) for a random valid plan: hospital-a holds the ends of
    the model and has the data; the layers are cut into ranges given to random orgs; then random
    carve-outs, kept only when nested in or disjoint from every entry so far; then replicas."""
    name = draw(st.sampled_from(sorted(CONFIGS)))
    cfg = CONFIGS[name]
    entries: list[tuple[str, str]] = [("hospital-a", s) for s in ("embed", "final_norm", "lm_head")]

    cuts = draw(st.sets(st.integers(1, cfg.num_layers - 1)))
    bounds = [0, *sorted(cuts), cfg.num_layers]
    for a, b in zip(bounds, bounds[1:]):
        entries.append((draw(st.sampled_from(ORGS)), _fmt("layers", a, b - 1, draw)))

    unit_sets = [parse_selector(s, cfg) for _, s in entries]
    parts = ["router", "attention", "heads", "experts", "expert_range", "whole"]
    if cfg.num_shared_experts:
        parts.append("shared_experts")
    chunks = list(zip(bounds, bounds[1:]))
    for _ in range(draw(st.integers(0, 8))):
        # mostly inside one layer range (so nested in it), sometimes anywhere (often rejected)
        lo, hi = draw(st.sampled_from(chunks)) if draw(st.integers(0, 3)) else (0, cfg.num_layers)
        a, b = _span(draw, hi - lo)
        layers = _fmt("layers", lo + a, lo + b, draw)
        part = draw(st.sampled_from(parts))
        if part == "heads":
            g0, g1 = _span(draw, cfg.num_kv_heads)
            per = cfg.heads_per_kv_head
            selector = f"{layers}.attention.heads.{g0 * per}-{(g1 + 1) * per - 1}"
        elif part == "expert_range":
            selector = _fmt(f"{layers}.experts", *_span(draw, cfg.num_experts), draw)
        elif part == "whole":
            selector = layers
        else:
            selector = f"{layers}.{part}"
        units = parse_selector(selector, cfg)
        if all(not (units & other) or units <= other or other <= units for other in unit_sets):
            entries.append((draw(st.sampled_from(ORGS)), selector))
            unit_sets.append(units)

    layer_entries = [e for e in entries if e[1].startswith("layers.")]
    for _ in range(draw(st.integers(0, 3))):
        _, selector = draw(st.sampled_from(layer_entries))
        entries.append((draw(st.sampled_from(ORGS)), selector))

    holds: dict[str, list[str]] = {}
    for org, selector in entries:
        holds.setdefault(org, []).append(selector)
    return name, holds


def write_and_load(directory: Path, name: str, holds: dict[str, list[str]]):
    (directory / "orgs").mkdir()
    (directory / "train.txt").write_text("data\n")
    (directory / "model.yaml").write_text(yaml.safe_dump(CONFIGS[name].model_dump()))
    (directory / "federation.yaml").write_text("name: random\nmodel: model.yaml\norgs: [orgs/*.yaml]\n")
    for org, selectors in holds.items():
        spec = {"org": org, "holds": selectors}
        if org == "hospital-a":
            spec["data"] = {"train": "../train.txt"}
        (directory / "orgs" / f"{org}.yaml").write_text(yaml.safe_dump(spec))
    return load_plan(directory / "federation.yaml")


@settings(max_examples=30, deadline=None)
@given(plans(), st.randoms(use_true_random=False))
def test_random_plans_slice_and_reassemble_bit_exactly(spec, rng):
    name, holds = spec
    cfg = CONFIGS[name]
    with tempfile.TemporaryDirectory() as d:
        plan = write_and_load(Path(d), name, holds)
    assert plan.model == cfg

    # the partitions are disjoint and cover the model
    units = [u for p in plan.partitions for u in p.units]
    assert len(units) == len(set(units))
    assert set(units) == all_units(cfg)

    # each holder of a partition holds an entry naming all of its units
    for p in plan.partitions:
        for org in p.holders:
            assert any(p.units <= e.units for e in plan.orgs[org].entries), (p, org)
    # every org's replicas line up: an org holds every unit of an entry it lists, unless a
    # strictly smaller entry carved that unit out
    for org in plan.orgs.values():
        for e in org.entries:
            for u in e.units - plan.units_of(org.name):
                assert any(
                    u in other.units and other.units < e.units for o in plan.orgs.values() for other in o.entries
                )

    # slice, one state dict per holder (replicas carry equal copies), in random order
    full = monolithic(name)
    pieces = [select(full, unit_slices(cfg, p.units)) for p in plan.partitions for _ in p.holders]
    rng.shuffle(pieces)
    back = reassemble(cfg, pieces)

    assert back.keys() == full.keys()
    for key, tensor in full.items():
        assert back[key].dtype == tensor.dtype
        assert torch.equal(back[key], tensor), key
    empty_model(name).load_state_dict(back, strict=True)

    # partitions share no element: their sizes add up to the model's
    assert sum(unit_parameter_count(cfg, p.units) for p in plan.partitions) == sum(t.numel() for t in full.values())


@pytest.mark.parametrize("fed", sorted(PLANS.glob("*/federation.yaml")), ids=lambda p: p.parent.name)
def test_example_plans_slice_and_reassemble_bit_exactly(fed):
    plan = load_plan(fed)
    cfg = plan.model
    torch.manual_seed(0)
    full = {k: torch.randn_like(v) for k, v in MoETransformer(cfg).state_dict().items()}
    back = reassemble(cfg, [select(full, unit_slices(cfg, p.units)) for p in plan.partitions])
    assert back.keys() == full.keys()
    assert all(torch.equal(back[k], full[k]) for k in full)
    assert {u for p in plan.partitions for u in p.units} == all_units(cfg)


# -- unit tests ---------------------------------------------------------------------------------


def whole_model_pieces(cfg: ModelConfig = TINY) -> dict[str, torch.Tensor]:
    """The tiny model cut into its unit slices (head groups as one row/column run per layer)."""
    return select(monolithic("tiny"), unit_slices(cfg, all_units(cfg)))


def test_whole_model_reassembles_and_all_keys_are_monolithic_names_or_slices():
    pieces = whole_model_pieces()
    back = reassemble(TINY, [pieces])
    assert all(torch.equal(back[k], v) for k, v in monolithic("tiny").items())
    assert "layers.0.attention.q_proj.weight[0:64]" in pieces
    assert "layers.0.attention.o_proj.weight[:, 0:64]" in pieces


def test_reassembly_names_a_missing_parameter():
    pieces = whole_model_pieces()
    del pieces["layers.1.moe.experts.3.w2.weight"]
    with pytest.raises(ReassemblyError, match=r"no partition holds \(all of\) layers\.1\.moe\.experts\.3\.w2\.weight$"):
        reassemble(TINY, [pieces])


def test_reassembly_names_a_parameter_with_a_missing_slice():
    pieces = whole_model_pieces()
    del pieces["layers.2.attention.o_proj.weight[:, 0:64]"]
    cfg = TINY
    hd, per = cfg.head_dim, cfg.heads_per_kv_head
    # KV heads 0 and 2-3 present, KV head 1 missing
    o = monolithic("tiny")["layers.2.attention.o_proj.weight"]
    pieces[f"layers.2.attention.o_proj.weight[:, 0:{per * hd}]"] = o[:, : per * hd].clone()
    pieces[f"layers.2.attention.o_proj.weight[:, {2 * per * hd}:{4 * per * hd}]"] = o[:, 2 * per * hd :].clone()
    with pytest.raises(ReassemblyError, match=r"no partition holds \(all of\) layers\.2\.attention\.o_proj\.weight$"):
        reassemble(cfg, [pieces])


def test_reassembly_lists_at_most_five_missing_parameters():
    pieces = {k: v for k, v in whole_model_pieces().items() if not k.startswith("layers.0.moe.experts.")}
    with pytest.raises(ReassemblyError, match=r"layers\.0\.moe\.experts\.0\.w1\.weight.* \.\.\.$") as exc:
        reassemble(TINY, [pieces])
    assert str(exc.value).count("layers.0.moe.experts.") == 5


def test_reassembly_rejects_overlapping_slices_that_disagree():
    pieces = whole_model_pieces()
    q = monolithic("tiny")["layers.3.attention.q_proj.weight"]
    other = {"layers.3.attention.q_proj.weight[16:48]": q[16:48].clone()}
    assert reassemble(TINY, [pieces, other])  # an equal overlap (a replica) is fine
    other["layers.3.attention.q_proj.weight[16:48]"][20, 5] += 1.0
    with pytest.raises(
        ReassemblyError,
        match=r"'layers\.3\.attention\.q_proj\.weight\[16:48\]' overlaps another partition with different values",
    ):
        reassemble(TINY, [pieces, other])


def test_reassembly_rejects_a_replica_that_disagrees():
    pieces = whole_model_pieces()
    w = pieces["layers.0.moe.router.weight"].clone()
    w[0, 0] = -w[0, 0] + 1.0
    with pytest.raises(ReassemblyError, match=r"'layers\.0\.moe\.router\.weight' overlaps another partition"):
        reassemble(TINY, [pieces, {"layers.0.moe.router.weight": w}])


def test_reassembly_rejects_unknown_names_and_wrong_shapes():
    pieces = whole_model_pieces()
    with pytest.raises(ReassemblyError, match=r"'layers\.9\.moe\.router\.weight' is not a parameter"):
        reassemble(TINY, [pieces, {"layers.9.moe.router.weight": torch.zeros(8, 64)}])
    with pytest.raises(
        ReassemblyError, match=r"'layers\.0\.attention\.k_proj\.weight\[0:8\]' has shape \(4, 64\), expected \(8, 64\)"
    ):
        reassemble(TINY, [pieces, {"layers.0.attention.k_proj.weight[0:8]": torch.zeros(4, 64)}])


@pytest.mark.parametrize(
    "key, expected",
    [
        ("embed.weight", TensorSlice("embed.weight")),
        ("layers.3.attention.q_proj.weight[0:32]", TensorSlice("layers.3.attention.q_proj.weight", 0, 0, 32)),
        ("layers.3.attention.o_proj.weight[:, 16:48]", TensorSlice("layers.3.attention.o_proj.weight", 1, 16, 48)),
    ],
)
def test_tensor_slice_parse_reads_whole_rows_and_columns(key, expected):
    assert TensorSlice.parse(key) == expected
    assert expected.key == key


@given(
    st.from_regex(r"[a-z_][a-z0-9_.]{0,30}", fullmatch=True),
    st.sampled_from([None, 0, 1]),
    st.integers(0, 10_000),
    st.integers(0, 10_000),
)
def test_tensor_slice_parse_round_trips_key(name, dim, start, length):
    s = TensorSlice(name) if dim is None else TensorSlice(name, dim, start, start + length)
    assert TensorSlice.parse(s.key) == s
    assert TensorSlice.parse(s.key).key == s.key


def test_every_slice_of_the_model_round_trips_and_takes_its_shape():
    for name, cfg in CONFIGS.items():
        shapes = parameter_shapes(cfg)
        slices = unit_slices(cfg, all_units(cfg))
        for s in slices:
            assert TensorSlice.parse(s.key) == s
            assert s.name in shapes
            expected = list(shapes[s.name])
            if s.dim is not None:
                assert 0 <= s.start < s.stop <= expected[s.dim]
                expected[s.dim] = s.stop - s.start
            assert list(s.take(torch.empty(shapes[s.name])).shape) == expected
        assert ("lm_head.weight" in {s.name for s in slices}) == (not cfg.tie_embeddings), name
