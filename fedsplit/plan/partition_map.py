"""The partition map of a plan: which organisations hold each piece of the model, as a grid of
rows (``embed``, each layer, ``final_norm``, ``lm_head``) by columns (the layer's router and
norms, each KV head group, each expert, the shared experts). Rendered as a PNG by
``fedsplit plan show --png`` and as a text table without it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .plan import Plan
from .units import Unit, task_units


@dataclass(frozen=True)
class MapRow:
    label: str
    units: list[Unit]  # one per column; one alone: the row is one unit (embed, final_norm, lm_head, a task head)
    cells: list[tuple[str, ...]]  # the holders of each unit

    def pieces(self) -> list[tuple[tuple[str, ...], list[Unit]]]:
        """The row's units grouped by their holders, in column order."""
        groups: dict[tuple[str, ...], list[Unit]] = {}
        for unit, holders in zip(self.units, self.cells):
            groups.setdefault(holders, []).append(unit)
        return list(groups.items())

    @property
    def whole(self) -> bool:
        return len(self.cells) == 1


def _heads_label(kv: int, per: int) -> str:
    """A KV head's column, named by the query heads that read it, as plans select them."""
    return f"head {kv}" if per == 1 else f"heads {kv * per}-{kv * per + per - 1}"


def partition_map(plan: Plan) -> tuple[list[str], list[MapRow]]:
    """(column labels, rows) of ``plan``'s partition map."""
    cfg = plan.model
    columns = (
        ["router"]
        + [_heads_label(g, cfg.heads_per_kv_head) for g in range(cfg.num_kv_heads)]
        + [f"expert {e}" for e in range(cfg.num_experts)]
        + (["shared"] if cfg.num_shared_experts else [])
    )

    def row(label: str, units: list[Unit]) -> MapRow:
        return MapRow(label, units, [plan.partition_of(u).holders for u in units])

    rows = [row("embed", [Unit("embed")])]
    for layer in range(cfg.num_layers):
        rows.append(
            row(
                f"layer {layer}",
                [Unit("router", layer)]
                + [Unit("kv", layer, g) for g in range(cfg.num_kv_heads)]
                + [Unit("expert", layer, e) for e in range(cfg.num_experts)]
                + ([Unit("shared_experts", layer)] if cfg.num_shared_experts else []),
            )
        )
    rows += [row("final_norm", [Unit("final_norm")]), row("lm_head", [Unit("lm_head")])]
    rows += [row(str(u), [u]) for u in task_units(cfg)]
    return columns, rows


def org_numbers(plan: Plan) -> dict[str, int]:
    """A short number per organisation (1, 2, ...) in plan order, for cell labels."""
    return {org: i for i, org in enumerate(plan.orgs, start=1)}


def cell_label(holders: tuple[str, ...], numbers: dict[str, int]) -> str:
    return ",".join(str(numbers[h]) for h in holders)


def draw_partition_map(plan: Plan, path: str | Path) -> Path:
    """Write the partition map as a PNG: cells coloured by their (first) holder, replicated
    cells hatched and labelled with every holder's number, a legend of the numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    columns, rows = partition_map(plan)
    numbers = org_numbers(plan)
    palette = matplotlib.colormaps["tab20" if len(numbers) <= 20 else "turbo"]
    colour = {
        org: palette(i % 20 if len(numbers) <= 20 else i / max(len(numbers) - 1, 1)) for i, org in enumerate(numbers)
    }
    width = len(columns)
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * width + 3.0, 1.2 + 0.45 * len(rows)))
    for y, row in enumerate(rows):
        cell_width = width if row.whole else 1
        for x, holders in enumerate(row.cells):
            replicated = len(holders) > 1
            ax.add_patch(
                Rectangle(
                    (x, y),
                    cell_width,
                    1,
                    facecolor=colour[holders[0]],
                    edgecolor="white",
                    linewidth=1.5,
                    hatch="///" if replicated else None,
                )
            )
            label = cell_label(holders, numbers)
            if row.whole:
                label = f"{row.label}: {', '.join(holders) if len(holders) <= 4 else label}"
            ax.text(
                x + cell_width / 2,
                y + 0.5,
                label,
                ha="center",
                va="center",
                fontsize=7 if replicated else 8,
                bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "linewidth": 0}
                if replicated or row.whole
                else None,
            )
    ax.set_xlim(0, width)
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([x + 0.5 for x in range(width)], columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks([y + 0.5 for y in range(len(rows))], [r.label for r in rows], fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    handles = [Patch(facecolor=colour[org], label=f"{n} {org}") for org, n in numbers.items()]
    handles.append(Patch(facecolor="white", edgecolor="grey", hatch="///", label="replicated (numbers: all holders)"))
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=8,
        frameon=False,
        ncol=1 if len(handles) <= 24 else 2,
    )
    ax.set_title(f"plan '{plan.name}': {len(plan.orgs)} organisations, {len(plan.partitions)} partitions", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
