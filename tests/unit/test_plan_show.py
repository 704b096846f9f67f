"""``fedsplit plan show``: the partition map as a PNG, or as text, layer by layer."""

from __future__ import annotations

from fedsplit.cli import main
from fedsplit.plan import load_plan
from fedsplit.plan.partition_map import partition_map

from ..conftest import PLANS

U_SHAPE = PLANS / "u-shape-3" / "federation.yaml"


def test_map_rows_are_the_ends_and_every_layer_with_each_units_holders():
    plan = load_plan(U_SHAPE)
    columns, rows = partition_map(plan)
    assert [r.label for r in rows] == ["embed", "layer 0", "layer 1", "layer 2", "layer 3", "final_norm", "lm_head"]
    assert len(columns) == 1 + plan.model.num_kv_heads + plan.model.num_experts + 1
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
