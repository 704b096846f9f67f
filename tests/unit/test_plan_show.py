"""``fedsplit plan show``: the partition map as a PNG, or as text, layer by layer."""

from __future__ import annotations

import random
import subprocess
import sys

from fedsplit.cli import main
from fedsplit.plan import load_plan, parse_selector
from fedsplit.plan.partition_map import partition_map
from fedsplit.plan.units import all_units, describe

from ..conftest import PLANS

U_SHAPE = PLANS / "u-shape-3" / "federation.yaml"


def test_map_rows_are_the_ends_and_every_layer_with_each_units_holders():
    plan = load_plan(U_SHAPE)
    columns, rows = partition_map(plan)
    assert [r.label for r in rows] == ["embed", "layer 0", "layer 1", "layer 2", "layer 3", "final_norm", "lm_head"]
    assert len(columns) == 1 + plan.model.num_kv_heads + plan.model.num_experts + 1
    assert columns[1:3] == ["heads 0-1", "heads 2-3"]  # KV heads named by the query heads plans select
    layer2 = dict(zip(columns, rows[3].cells))
    assert layer2["expert 4"] == ("hospital-b",) and layer2["expert 0"] == ("compute-c",)
    assert rows[0].cells == [("hospital-a", "hospital-b")]


def test_png_is_written(tmp_path, capsys):
    out = tmp_path / "maps" / "u-shape.png"
    assert main(["plan", "show", str(U_SHAPE), "--png", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert str(out) in capsys.readouterr().out


def test_png_of_a_many_org_plan_is_written(tmp_path):
    out = tmp_path / "g64.png"
    assert main(["plan", "show", str(PLANS / "generated-64" / "federation.yaml"), "--png", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_text_map_names_pieces_and_holders(capsys):
    assert main(["plan", "show", str(U_SHAPE)]) == 0
    out = capsys.readouterr().out
    assert "layers.2.experts.4-7" in out and "hospital-b" in out and "replicated" in out
    assert "what each organisation receives" in out  # and who sees whose batches


def test_every_piece_fedsplit_prints_is_a_selector_that_holds_exactly_those_units():
    cfg = load_plan(U_SHAPE).model
    units = sorted(all_units(cfg), key=lambda u: u.position)
    rng = random.Random(0)
    for size in [1, 2, 5, 20, len(units) - 3, len(units)] * 20:
        chosen = frozenset(rng.sample(units, size))
        text = describe(chosen, cfg)
        named = frozenset().union(*(parse_selector(part, cfg) for part in text.split(", ")))
        assert named == chosen, text


def test_a_table_written_to_a_file_or_pipe_keeps_every_cell_whole(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fedsplit.cli", "plan", "check", str(U_SHAPE)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout
    assert "layers.2.shared_experts, layers.3.router, layers.3.attention.heads.0-3" in out.stdout


def test_owned_experts_are_marked_with_their_owner_in_show_and_check(capsys):
    fed = str(PLANS / "owned-experts" / "federation.yaml")
    assert main(["plan", "show", fed]) == 0
    shown = capsys.readouterr().out
    assert main(["plan", "check", fed]) == 0
    checked = capsys.readouterr().out
    for out in (shown, checked):
        assert "owned by hospital-a" in out and "owned by hospital-b" in out
