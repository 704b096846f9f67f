"""``fedsplit report RUN_DIR``: plots and a Markdown summary of a run's ``metrics.jsonl``.

Reads the ``"event": "round"`` records (other events are skipped) of a federated run or of a
``fedsplit baseline`` run and writes into ``RUN_DIR/report/``:

* ``loss.png``: train loss and held-out perplexity per round, per data owner and overall;
* ``baseline.png`` (with a baseline run): overall held-out perplexity and train loss, federated
  vs centralised, round by round, with the last round's gap;
* ``wire.png``: megabytes each organisation sent per round, stacked;
* ``expert_load.png``: fraction of routed tokens per expert and layer in the last round, dead
  experts (under a tenth of a uniform share) marked; ``expert_load_rounds.png``: the same per
  round, one panel per layer;
* ``summary.md``: a table per round, dead experts and links to the plots.

Every figure is titled with the plan and the run.

Older runs lack some keys (``eval``, ``expert_load``, bytes): their plots are skipped and the
summary says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPORT_DIR = "report"


class ReportError(ValueError):
    """A run directory with nothing to report; the message says what is missing."""


@dataclass
class Report:
    directory: Path
    summary: Path
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_rounds(run_dir: str | Path) -> list[dict]:
    """The run's round records in round order (the last record of a round wins, as after a resume),
    each with its ``eval`` line (the held-out evaluation of the model after that round) under
    ``"eval"``; the initial model's evaluation is a record of round 0 with no training."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ReportError(
            f"{path} does not exist: give the run directory that `fedsplit simulate` or `fedsplit baseline` printed"
        )
    rounds: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{number}: not JSON ({e.msg})") from None
        if record.get("event") == "round" and "round" in record:
            rounds[int(record["round"])] = record
        elif record.get("event") == "eval" and "round" in record:
            evals[int(record["round"])] = record
    for r, ev in evals.items():
        rounds.setdefault(r, {"round": r})["eval"] = ev
    return [rounds[r] for r in sorted(rounds)]


def write_report(run_dir: str | Path, baseline: str | Path | None = None, out: str | Path | None = None) -> Report:
    """Plots and ``summary.md`` of ``run_dir`` into ``out`` (default ``run_dir/report``)."""
    import matplotlib

    matplotlib.use("Agg")

    run_dir = Path(run_dir)
    rounds = read_rounds(run_dir)
    if not rounds:
        raise ReportError(f"{run_dir / 'metrics.jsonl'} has no completed round yet: nothing to plot")
    base = read_rounds(baseline) if baseline is not None else []
    if baseline is not None and not base:
        raise ReportError(f"the baseline {Path(baseline) / 'metrics.jsonl'} has no completed round")
    directory = Path(out) if out is not None else run_dir / REPORT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    report = Report(directory, directory / "summary.md")
    title = figure_title(run_dir)
    groups = expert_groups(run_dir)

    def expert_load(rounds: list[dict], base: list[dict], directory: Path, title: str):
        return _plot_expert_load(rounds, base, directory, title, groups)

    for plot in (_plot_loss, _plot_baseline, _plot_wire, expert_load, _plot_expert_load_rounds):
        path, note = plot(rounds, base, directory, title)
        if path is not None:
            report.plots.append(path)
        if note:
            report.notes.append(note)
    report.summary.write_text(_summary(run_dir, rounds, base, baseline, report), encoding="utf-8")
    return report


DEAD_SHARE = 0.1  # an expert with less than this fraction of a uniform share of the tokens is dead


def expert_groups(run_dir: Path) -> int | None:
    """The number of expert groups of the run's hierarchical router (None for another router, or
    when the run's plan.json does not say), read from the plan without loading it."""
    try:
        model = json.loads((Path(run_dir) / "plan.json").read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    router = model.get("router") or {} if isinstance(model, dict) else {}
    return router.get("groups") if router.get("kind") == "hierarchical" else None


def figure_title(run_dir: Path) -> str:
    """``plan NAME, run RUN``: what every figure is titled with (the run alone without a plan.json)."""
    try:
        name = json.loads((run_dir / "plan.json").read_text(encoding="utf-8"))["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"run {run_dir.name}"
    return f"plan {name}, run {run_dir.name}"


def dead_experts(rounds: Sequence[dict]) -> tuple[int | None, dict[str, list[int]]]:
    """(the last round with an expert load, the experts of each layer that got less than
    :data:`DEAD_SHARE` of a uniform share of its routed tokens in it)."""
    last = next((r for r in reversed(rounds) if r.get("expert_load")), None)
    if last is None:
        return None, {}
    dead = {}
    for layer, load in sorted(last["expert_load"].items(), key=lambda kv: int(kv[0])):
        few = [e for e, share in enumerate(load) if float(share) < DEAD_SHARE / len(load)]
        if few:
            dead[layer] = few
    return last["round"], dead


def _data_owners(rounds: Sequence[dict]) -> list[str]:
    owners: dict[str, None] = {}
    for r in rounds:
        owners.update((org, None) for org, m in (r.get("orgs") or {}).items() if m.get("tokens", 0) > 0)
        owners.update((org, None) for org in ((r.get("eval") or {}).get("orgs") or {}))
    return list(owners)


def _eval(record: dict, org: str | None = None, key: str = "ppl") -> float:
    """A held-out metric of a round (overall, or of ``org``); NaN where the record has none."""
    ev = record.get("eval") or {}
    if org is not None:
        ev = (ev.get("orgs") or {}).get(org) or {}
    if key in ev:
        return float(ev[key])
    if key == "ppl" and "loss" in ev and "task" not in ev:  # a task's loss is no perplexity
        return math.exp(float(ev["loss"]))
    return math.nan


def _has_eval(rounds: Sequence[dict]) -> bool:
    return any(r.get("eval") for r in rounds)


def _mb_sent(record: dict) -> float:
    return sum(float(m.get("bytes_sent", 0)) for m in (record.get("orgs") or {}).values()) / 1e6


def _save(fig, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_loss(rounds: list[dict], base: list[dict], directory: Path, title: str) -> tuple[Path | None, str | None]:
    import matplotlib.pyplot as plt

    with_eval = _has_eval(rounds)
    fig, axes = plt.subplots(
        1, 2 if with_eval else 1, figsize=(12 if with_eval else 6.5, 4.4), squeeze=False, sharex=True
    )
    trained = [r for r in rounds if "loss" in r]
    xs = [r["round"] for r in trained]
    train = axes[0][0]
    _overall(train, xs, [float(r["loss"]) for r in trained])
    for org in _data_owners(rounds):
        train.plot(
            xs,
            [float(((r.get("orgs") or {}).get(org) or {}).get("loss", math.nan)) for r in trained],
            marker="o",
            label=f"{org}'s data",
        )
    _style(train, "train loss (token-weighted)", "loss")
    if with_eval:
        ppl = axes[0][1]
        evaluated = [r for r in rounds if r.get("eval")]
        ex = [r["round"] for r in evaluated]
        _overall(ppl, ex, [_eval(r) for r in evaluated])
        for org in _data_owners(rounds):
            ppl.plot(ex, [_eval(r, org) for r in evaluated], marker="o", label=f"{org}'s data")
        _style(ppl, "held-out perplexity", "perplexity (log scale)")
        _log_axis(ppl)
    _round_axis(axes[0][0], rounds)
    _save(fig, directory / "loss.png", title)
    return (
        directory / "loss.png",
        None
        if with_eval
        else "no held-out evaluation in the metrics (a run from before evaluation existed): perplexity not plotted",
    )


def _overall(ax, xs: list[int], ys: list[float]) -> None:
    """The overall line, under the per-owner ones (dashed, so that none hides behind it), with its
    last value written beside its last point."""
    ax.plot(xs, ys, color="black", linestyle="--", linewidth=1.5, marker="s", markersize=7, label="overall", zorder=1)
    if xs and not math.isnan(ys[-1]):
        ax.annotate(f"{ys[-1]:.3g}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(6, 4), fontsize=8)


def _log_axis(ax) -> None:
    """A log axis labelled with plain numbers at 1, 2 and 5 of every decade (not one lone 10^k)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _round_axis(ax, rounds: Sequence[dict]) -> None:
    """Every panel over the same rounds, 0 (the initial model) included, with room around a single one."""
    numbers = [r["round"] for r in rounds]
    ax.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)


def _plot_baseline(rounds: list[dict], base: list[dict], directory: Path, title: str) -> tuple[Path | None, str | None]:
    if not base:
        return None, None
    import matplotlib.pyplot as plt

    with_eval = _has_eval(rounds) and _has_eval(base)
    fig, axes = plt.subplots(
        1, 2 if with_eval else 1, figsize=(12 if with_eval else 6.5, 4.4), squeeze=False, sharex=True
    )
    # The baseline underneath in grey, the federated run on top: neither hides the other.
    series = (
        ("centralised baseline", base, {"color": "0.45", "linestyle": "--", "marker": "s", "zorder": 1}),
        ("federated", rounds, {"color": "tab:blue", "linestyle": "-", "marker": "o", "zorder": 2}),
    )
    for name, records, style in series:
        trained = [r for r in records if "loss" in r]
        axes[0][0].plot([r["round"] for r in trained], [float(r["loss"]) for r in trained], label=name, **style)
    _style(axes[0][0], "train loss, federated vs centralised", "loss")
    if with_eval:
        ax = axes[0][1]
        for name, records, style in series:
            evaluated = [r for r in records if r.get("eval")]
            ax.plot([r["round"] for r in evaluated], [_eval(r) for r in evaluated], label=name, **style)
        _style(ax, "held-out perplexity, federated vs centralised", "perplexity (log scale)")
        _log_axis(ax)
        _annotate_gap(ax, rounds, base)
    _round_axis(axes[0][0], rounds + base)
    _save(fig, directory / "baseline.png", title)
    return (
        directory / "baseline.png",
        None if with_eval else "the run or the baseline has no held-out evaluation: only train loss compared",
    )


def _annotate_gap(ax, rounds: list[dict], base: list[dict]) -> None:
    """``gap +x.x%`` (federated / centralised - 1) at the last round both evaluated."""
    centralised = {r["round"]: _eval(r) for r in base if r.get("eval")}
    common = [r for r in rounds if r.get("eval") and r["round"] in centralised]
    if not common:
        return
    last = common[-1]
    fed, cen = _eval(last), centralised[last["round"]]
    ax.annotate(
        f"gap {100 * (fed / cen - 1):+.1f}%",
        (last["round"], fed),
        textcoords="offset points",
        xytext=(-60, 14),
        fontsize=9,
        arrowprops={"arrowstyle": "-", "color": "0.5"},
    )


def _plot_wire(rounds: list[dict], base: list[dict], directory: Path, title: str) -> tuple[Path | None, str | None]:
    trained = [r for r in rounds if r.get("orgs")]  # round 0 (the initial evaluation) moves no training traffic
    orgs = [
        org
        for org in dict.fromkeys(o for r in trained for o in r["orgs"])
        if any("bytes_sent" in (r["orgs"].get(org) or {}) for r in trained)
    ]
    if not orgs:
        return None, "no bytes_sent per organisation in the metrics: traffic not plotted"
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.4))
    xs = [r["round"] for r in trained]
    bottom = [0.0] * len(trained)
    for org in orgs:
        mb = [float((r["orgs"].get(org) or {}).get("bytes_sent", 0)) / 1e6 for r in trained]
        ax.bar(xs, mb, bottom=bottom, label=org)
        bottom = [b + m for b, m in zip(bottom, mb)]
    _style(ax, "data-plane traffic per round (sent, stacked by organisation)", "MB")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=8)  # top to bottom, as the stack reads
    _save(fig, directory / "wire.png", title)
    return directory / "wire.png", None


def _plot_expert_load(
    rounds: list[dict], base: list[dict], directory: Path, title: str, groups: int | None = None
) -> tuple[Path | None, str | None]:
    """The last round's expert load, layers by experts; a hierarchical router's groups are
    separated by white lines and labelled with their share of the layer's tokens."""
    last = next((r for r in reversed(rounds) if r.get("expert_load")), None)
    if last is None:
        return None, "no expert_load in the metrics: expert load not plotted"
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    layers = sorted(last["expert_load"], key=int)
    load = [last["expert_load"][layer] for layer in layers]
    experts = max(len(row) for row in load)
    grid = [[float(row[e]) if e < len(row) else math.nan for e in range(experts)] for row in load]
    dead = dead_experts(rounds)[1]
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * experts, 1.6 + 0.45 * len(layers)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            if not math.isnan(value):
                ax.text(
                    x,
                    y,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value < max(map(max, grid)) * 0.6 else "black",
                )
            if x in dead.get(layers[y], ()):
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(experts), [str(e) for e in range(experts)])
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_xlabel("expert")
    if groups and experts % groups == 0:
        size = experts // groups
        for g in range(1, groups):
            ax.axvline(g * size - 0.5, color="white", linewidth=3)
        per_expert = _column_sums(grid)
        share = [sum(per_expert[g * size : (g + 1) * size]) / len(grid) for g in range(groups)]
        top = ax.secondary_xaxis("top")
        top.set_xticks(
            [g * size + (size - 1) / 2 for g in range(groups)],
            [f"group {g}: {s:.2f}" for g, s in enumerate(share)],
            fontsize=7,
        )
    note = f"; red: dead (< {DEAD_SHARE:g} of uniform)" if dead else ""
    ax.set_title(
        f"fraction of routed tokens per expert, round {last['round']} (uniform = {1 / experts:.3g}){note}", fontsize=10
    )
    fig.colorbar(image, ax=ax)
    _save(fig, directory / "expert_load.png", title)
    return directory / "expert_load.png", None


def _column_sums(grid: list[list[float]]) -> list[float]:
    return [sum(row[e] for row in grid if not math.isnan(row[e])) for e in range(len(grid[0]))]


def _plot_expert_load_rounds(
    rounds: list[dict], base: list[dict], directory: Path, title: str
) -> tuple[Path | None, str | None]:
    loaded = [r for r in rounds if r.get("expert_load")]
    if not loaded:
        return None, None  # _plot_expert_load says so
    import matplotlib.pyplot as plt

    layers = sorted(loaded[-1]["expert_load"], key=int)
    columns = min(4, len(layers))
    rows = math.ceil(len(layers) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False, sharey=True)
    xs = [r["round"] for r in loaded]
    for i, layer in enumerate(layers):
        ax = axes[i // columns][i % columns]
        experts = len(loaded[-1]["expert_load"][layer])
        for e in range(experts):
            ax.plot(xs, [float((r["expert_load"].get(layer) or [math.nan] * experts)[e]) for r in loaded], marker=".")
        ax.axhline(1 / experts, color="black", linestyle=":", linewidth=1)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for j in range(len(layers), rows * columns):
        axes[j // columns][j % columns].axis("off")
    axes[0][0].set_ylabel("fraction of routed tokens")
    handles = axes[0][0].get_lines()[:-1]
    fig.legend(
        handles, [f"expert {e}" for e in range(len(handles))], fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5)
    )
    _save(fig, directory / "expert_load_rounds.png", f"{title}: expert load by round (dotted: uniform)")
    return directory / "expert_load_rounds.png", None


def _style(ax, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)


def _num(value: float, fmt: str) -> str:
    return "–" if value is None or math.isnan(value) else format(value, fmt)


def _summary(run_dir: Path, rounds: list[dict], base: list[dict], baseline: str | Path | None, report: Report) -> str:
    by_round = {r["round"]: r for r in base}
    lines = [f"# Report: {figure_title(run_dir)}", ""]
    if baseline is not None:
        lines += [f"Baseline (centralised, same token budget): `{baseline}`", ""]
    header = (
        ["round", "train loss", "eval loss", "eval ppl"]
        + (["baseline eval ppl", "gap"] if base else [])
        + ["tokens", "seconds", "MB sent"]
    )
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rounds:
        ppl = _eval(r)
        row = [
            str(r["round"]),
            _num(float(r.get("loss", math.nan)), ".4f"),
            _num(_eval(r, key="loss"), ".4f"),
            _num(ppl, ".2f"),
        ]
        if base:
            b = _eval(by_round[r["round"]]) if r["round"] in by_round else math.nan
            row += [_num(b, ".2f"), _num(100 * (ppl / b - 1), "+.1f") + ("%" if not math.isnan(ppl / b) else "")]
        row += [
            f"{int(r.get('tokens', 0)):,}",
            _num(float(r.get("seconds", math.nan)), ".1f"),
            _num(_mb_sent(r), ".2f"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    owners = [o for o in _data_owners(rounds) if not math.isnan(_eval(rounds[-1], o))]
    if owners:
        lines += [
            "",
            f"Held-out perplexity per data owner, round {rounds[-1]['round']}:",
            "",
            "| data owner | eval ppl | eval tokens |",
            "|---|---|---|",
        ]
        for org in owners:
            tokens = (((rounds[-1].get("eval") or {}).get("orgs") or {}).get(org) or {}).get("tokens")
            lines.append(
                f"| {org} | {_num(_eval(rounds[-1], org), '.2f')} | {'–' if tokens is None else f'{int(tokens):,}'} |"
            )
    tasks = ((rounds[-1].get("eval") or {}).get("tasks")) or {}
    if tasks:
        lines += [
            "",
            f"Held-out tasks, round {rounds[-1]['round']}:",
            "",
            "| task | accuracy | loss | examples |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {t['accuracy']:.1%} | {t['loss']:.4f} | {int(t['examples']):,} |" for name, t in tasks.items()
        ]
    spent = next((r["privacy"] for r in reversed(rounds) if r.get("privacy")), None)
    if spent and spent.get("epsilon"):
        lines += [
            "",
            f"Privacy spent (privacy's noise, ε at δ = {spent['delta']:g}, per data owner's training text): "
            + ", ".join(f"{d} {eps:.3g}" for d, eps in spent["epsilon"].items()),
        ]
    dropped = next((r for r in reversed(rounds) if r.get("capacity_dropped")), None)
    if dropped:
        lines += [
            "",
            f"Expert capacity dropped in round {dropped['round']} (fraction of (token, slot) assignments, per layer): "
            + ", ".join(f"layer {layer} {f:.1%}" for layer, f in dropped["capacity_dropped"].items()),
        ]
    at, dead = dead_experts(rounds)
    if dead:
        lines += [
            "",
            f"Dead experts in round {at} (under {DEAD_SHARE:g} of a uniform share of their layer's routed tokens): "
            + "; ".join(f"layer {layer}: {', '.join(map(str, experts))}" for layer, experts in dead.items()),
        ]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in report.plots]
    if report.notes:
        lines += ["", "## Not plotted", ""] + [f"* {n}" for n in report.notes]
    return "\n".join(lines) + "\n"
