"""Paper-style figures, each drawn from one table of ``analysis.tables`` and saved beside it.

Figures are ``matplotlib.figure.Figure`` objects rendered by the Agg (PNG) and PDF canvases, never
through pyplot, so nothing opens a window or keeps global figure state. ``save_figure`` writes
``<stem>.png`` (300 dpi), ``<stem>.pdf`` and ``<stem>.csv``, the table the figure plots.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.typing import RcKeyType

from analysis.tables import variant_order
from steering.methods import methods

DPI = 300
PANEL = (3.3, 2.5)  # inches per panel: two panels fit a two-column paper's text width
MAX_COLUMNS = 3
PAPER_STYLE: dict[RcKeyType, Any] = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.5, "lines.linewidth": 1.2, "lines.markersize": 3.5,
    "legend.frameon": False, "pdf.fonttype": 42, "ps.fonttype": 42,  # embed TrueType: editable text in the PDF
    "savefig.dpi": DPI,
}
BASELINE_COLOR = "0.45"
BRANCH_COLORS = {"mc": "C1", "gen": "C2"}
EXTENSIONS = (".png", ".pdf", ".csv")
P = ParamSpec("P")


@contextmanager
def paper_style() -> Iterator[None]:
    """``PAPER_STYLE`` for the figures drawn and saved inside the block."""
    with matplotlib.rc_context(PAPER_STYLE):
        yield


def _styled(draw: Callable[P, Figure]) -> Callable[P, Figure]:
    """Draw under ``PAPER_STYLE``: font sizes and line widths are fixed when artists are created."""
    @functools.wraps(draw)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Figure:
        with paper_style():
            return draw(*args, **kwargs)

    return wrapper


def color(variant: str) -> str:
    """The fixed colour of a variant in every figure: grey for baseline, then the colour cycle in the
    steering methods' registration order (caa C0, mlp_mc C1, mlp_gen C2, ...); unknown names after them."""
    if variant == "baseline":
        return BASELINE_COLOR
    steered = [name for name in methods() if name != "baseline"]
    if variant in steered:
        return f"C{steered.index(variant) % 10}"
    return f"C{(len(steered) + sum(map(ord, variant))) % 10}"


def _panels(n: int, panel: tuple[float, float] = PANEL, columns: int = MAX_COLUMNS) -> tuple[Figure, list[Axes]]:
    """A figure of ``n`` panels, ``columns`` to a row; unused slots are hidden."""
    ncols = max(1, min(columns, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _size_label(model: str, size: Any) -> str:
    value = float(size) if size is not None else math.nan
    return f"{model}\n(size unknown)" if math.isnan(value) else f"{model}\n({value:g}B)"


def _band(ax: Axes, x: np.ndarray, low: np.ndarray, high: np.ndarray, colour: str) -> None:
    finite = np.isfinite(low) & np.isfinite(high)
    if finite.sum() >= 2:
        ax.fill_between(x[finite], low[finite], high[finite], color=colour, alpha=0.18, linewidth=0)
    elif finite.any():
        ax.vlines(x[finite], low[finite], high[finite], color=colour, alpha=0.5)


@_styled
def scale_sweep_figure(table: pd.DataFrame, models: Sequence[str] | None = None) -> Figure:
    """Metric against steering scale: one panel per model, one line per (source, variant) with its
    interval as a band, the baseline as a dashed line with its band; where the points' ``kl_neutral`` was
    measured, it is drawn against a second axis (dashed, square markers).

    Args:
        table: ``tables.scale_sweep_table`` output.
        models: panel order; default the table's.
    """
    order = list(models or dict.fromkeys(table["model"]))
    order = [m for m in order if m in set(table["model"])]
    fig, axes = _panels(len(order))
    for ax, model in zip(axes, order, strict=True):
        mine = table[table["model"] == model]
        base = mine[mine["variant"] == "baseline"]
        for row in base.to_dict("records"):
            ax.axhline(row["value"], color=color("baseline"), linestyle="--", label=f"baseline ({row['metric']})")
            if np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"]):
                ax.axhspan(row["ci_low"], row["ci_high"], color=color("baseline"), alpha=0.12, linewidth=0)
        lines = mine[mine["variant"] != "baseline"]
        for (source, variant, layer), group in lines.groupby(["source", "variant", "layer"], sort=True):
            group = group.sort_values("scale")
            x = group["scale"].to_numpy(float)
            colour = color(str(variant))
            style = "-" if source == "evaluate" else ":"
            ax.plot(x, group["value"].to_numpy(float), style, marker="o", color=colour,
                    label=f"{variant}, layer {layer:g} ({source}: {group['metric'].iloc[0]})")
            _band(ax, x, group["ci_low"].to_numpy(float), group["ci_high"].to_numpy(float), colour)
        metrics = sorted(set(mine["metric"].astype(str)))
        ax.set(title=model, xlabel="steering scale", ylabel=metrics[0] if len(metrics) == 1 else "metric value")
        ax.legend(loc="best")
        costed = lines[np.isfinite(lines["kl_neutral"].to_numpy(float))] if "kl_neutral" in lines else lines.iloc[0:0]
        if not costed.empty:  # what the same points cost, on a second axis
            cost_ax = ax.twinx()
            for (_, variant, _), group in costed.groupby(["source", "variant", "layer"], sort=True):
                group = group.sort_values("scale")
                cost_ax.plot(group["scale"].to_numpy(float), group["kl_neutral"].to_numpy(float), "--", marker="s",
                             markersize=3, color=color(str(variant)), alpha=0.7)
            cost_ax.set_ylabel("kl_neutral (dashed, squares)")
    return fig


@_styled
def relative_scale_figure(table: pd.DataFrame, models: Sequence[str] | None = None) -> Figure:
    """Metric against the relative steering scale: one panel per steered variant, one line per model (and
    source: evaluate solid, tune dotted), with its interval as a band; models of any size share the x axis.

    Args:
        table: ``sweeps.relative_scale_table`` output.
        models: the legend's model order (smallest first); default the table's.
    """
    variants = list(dict.fromkeys(table["variant"]))
    order = [m for m in (models or dict.fromkeys(table["model"])) if m in set(table["model"])]
    fig, axes = _panels(len(variants))
    shades = matplotlib.colormaps["tab10"]
    cmap = [matplotlib.colors.to_hex(shades(i % 10)) for i in range(len(order))]
    for ax, variant in zip(axes, variants, strict=True):
        mine = table[table["variant"] == variant]
        for index, model in enumerate(order):
            for (source, layer), group in mine[mine["model"] == model].groupby(["source", "layer"], sort=True):
                group = group.sort_values("relative_scale")
                x = group["relative_scale"].to_numpy(float)
                depth = group["depth"].iloc[0]
                where = f"layer {layer:g}" + (f" = {depth:.2f} of depth" if np.isfinite(depth) else "")
                ax.plot(x, group["value"].to_numpy(float), "-" if source == "evaluate" else ":", marker="o",
                        color=cmap[index], label=f"{model}, {where} ({source}: {group['metric'].iloc[0]})")
                _band(ax, x, group["ci_low"].to_numpy(float), group["ci_high"].to_numpy(float), cmap[index])
        metrics = sorted(set(mine["metric"].astype(str)))
        ax.set(title=f"{variant}: across models", xlabel="relative scale (x mean residual norm)",
               ylabel=metrics[0] if len(metrics) == 1 else "metric value")
        ax.legend(loc="best", fontsize="x-small")
    return fig


def layer_scale_figure(table: pd.DataFrame, models: Sequence[str] | None = None) -> Figure:
    """The tuning objective over layer (rows) and scale (columns): one heatmap per study, cells
    annotated with the value and blank where no trial ran.

    Args:
        table: ``tables.layer_scale_table`` output.
        models: panel order; default the table's.
    """
    keys = list(dict.fromkeys(zip(table["model"], table["study"], strict=True)))
    if models:
        keys.sort(key=lambda k: list(models).index(k[0]) if k[0] in models else len(models))
    fig, axes = _panels(len(keys), panel=(PANEL[0] + 0.6, PANEL[1] + 0.4))
    for ax, (model, study) in zip(axes, keys, strict=True):
        mine = table[(table["model"] == model) & (table["study"] == study)]
        grid = mine.pivot_table(index="layer", columns="scale", values="value", aggfunc="mean")
        values = np.ma.masked_invalid(grid.to_numpy(float))
        image = ax.imshow(values, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(grid.columns)), [f"{s:g}" for s in grid.columns], rotation=45 if len(grid.columns) > 6 else 0)
        ax.set_yticks(range(len(grid.index)), [f"{int(layer)}" for layer in grid.index])
        ax.grid(False)
        if grid.size <= 150:
            span = float(values.max() - values.min()) if values.count() else 0.0
            for (i, j), value in np.ndenumerate(grid.to_numpy(float)):
                if np.isfinite(value):
                    light = span == 0 or value < float(values.min()) + 0.6 * span
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=5.5,
                            color="white" if light else "black")
        metric_name = str(mine["metric"].iloc[0])
        fig.colorbar(image, ax=ax, label=metric_name, shrink=0.9)
        name = str(study)
        label = f"tune run {name[:8]}" if re.fullmatch(r"[0-9a-f]{32}", name) else name  # a worker's run id
        ax.set(title=f"{model}: {label}", xlabel="steering scale", ylabel="layer")
    return fig


@_styled
def cross_model_figure(table: pd.DataFrame) -> Figure:
    """Per metric a panel of grouped bars: one group per model (smallest first) that has the metric,
    one bar per variant, error bars from the interval; one legend above all panels.

    Args:
        table: ``tables.cross_model_table`` output (already in model-size order).
    """
    metrics = list(dict.fromkeys(table["metric"]))
    variants = variant_order(table["variant"])
    width = 0.8 / max(1, len(variants))
    n_models = table.groupby("metric")["model"].nunique().max() if not table.empty else 1
    panel = (max(PANEL[0], 0.3 * n_models * max(1, len(variants)) + 0.8), PANEL[1])
    fig, axes = _panels(len(metrics), panel=panel, columns=1 if n_models > 4 else 2)
    sizes = dict(zip(table["model"], table["n_params_b"], strict=True))
    handles: dict[str, Any] = {}
    for ax, metric_name in zip(axes, metrics, strict=True):
        mine = table[table["metric"] == metric_name]
        models = list(dict.fromkeys(mine["model"]))
        for k, variant in enumerate(variants):
            rows = mine[mine["variant"] == variant].set_index("model").reindex(models)
            x = np.arange(len(models)) + (k - (len(variants) - 1) / 2) * width
            value = rows["value"].to_numpy(float)
            low = np.nan_to_num(value - rows["ci_low"].to_numpy(float), nan=0.0)
            high = np.nan_to_num(rows["ci_high"].to_numpy(float) - value, nan=0.0)
            handles[variant] = ax.bar(x, value, width, color=color(variant), label=variant,
                                      yerr=np.vstack([low, high]), error_kw={"elinewidth": 0.8, "capsize": 1.5})
        ax.set_xticks(range(len(models)), [_size_label(m, sizes.get(m)) for m in models])
        slots = max(len(models), 3)  # a lone model keeps the bar width of three
        ax.set_xlim((len(models) - 1) / 2 - slots / 2, (len(models) - 1) / 2 + slots / 2)
        ax.set(xlabel="model (parameters)", ylabel=metric_name)
        if (mine["value"] >= 0).all():
            ax.set_ylim(bottom=0)
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=len(handles))
    return fig


@_styled
def judge_agreement_figure(table: pd.DataFrame, models: Sequence[str] | None = None) -> Figure:
    """The LLM judge against the semantic judge: per model (row) and variant (column) the 2x2
    table of verdict counts, titled with Cohen's kappa.

    Args:
        table: ``tables.agreement_table`` output.
        models: row order; default the table's.
    """
    order = [m for m in (models or dict.fromkeys(table["model"])) if m in set(table["model"])]
    variants = variant_order(table["variant"])
    fig = Figure(figsize=(1.9 * len(variants) + 0.4, 1.9 * len(order) + 0.3), layout="constrained")
    grid = np.atleast_2d(fig.subplots(len(order), len(variants), squeeze=False))
    for i, model in enumerate(order):
        for j, variant in enumerate(variants):
            ax = grid[i, j]
            rows = table[(table["model"] == model) & (table["variant"] == variant)]
            if rows.empty:
                ax.set_visible(False)
                continue
            row = rows.iloc[0]
            counts = np.array([[row["both_true"], row["llm_only"]], [row["semantic_only"], row["both_false"]]], float)
            ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(1.0, counts.max()))
            for (a, b), value in np.ndenumerate(counts):
                ax.text(b, a, f"{int(value)}", ha="center", va="center",
                        color="white" if value > counts.max() / 2 else "black")
            ax.grid(False)
            ax.set_xticks([0, 1], ["1", "0"])
            ax.set_yticks([0, 1], ["1", "0"])
            ax.set_xlabel(str(row["semantic_metric"]))
            ax.set_ylabel(f"{model}\n{row['llm_metric']}" if j == 0 else str(row["llm_metric"]))
            kappa = "n/a" if not np.isfinite(row["kappa"]) else f"{row['kappa']:.2f}"
            ax.set_title(f"{variant}: κ={kappa}, n={int(row['n'])}")
    return fig


@_styled
def category_delta_figure(table: pd.DataFrame, models: Sequence[str] | None = None) -> Figure:
    """Per model the change of its best variant against baseline in each TruthfulQA category,
    largest gain on top.

    Args:
        table: ``tables.category_delta_table`` output.
        models: panel order; default the table's.
    """
    order = [m for m in (models or dict.fromkeys(table["model"])) if m in set(table["model"])]
    n_categories = int(table.groupby("model")["category"].nunique().max()) if not table.empty else 1
    fig, axes = _panels(len(order), panel=(PANEL[0] + 0.7, 0.6 + 0.14 * n_categories), columns=2)
    for ax, model in zip(axes, order, strict=True):
        mine = table[table["model"] == model].sort_values("delta", kind="stable")
        delta = mine["delta"].to_numpy(float)
        ax.barh(range(len(mine)), np.nan_to_num(delta), color=np.where(delta >= 0, "C0", "C3"))
        ax.set_yticks(range(len(mine)), [f"{c} (n={n})" for c, n in zip(mine["category"], mine["n"], strict=True)])
        ax.axvline(0, color="0.3", linewidth=0.6)
        variant, metric_name = mine["variant"].iloc[0], mine["metric"].iloc[0]
        ax.set(title=f"{model}: {variant} vs baseline", xlabel=f"change in {metric_name}", ylabel="category")
    return fig


@_styled
def training_curves_figure(table: pd.DataFrame, models: Sequence[str] | None = None) -> Figure:
    """MLP training: per model the train (solid) and val (dashed) loss of each branch per step.

    Args:
        table: ``tables.training_curves_table`` output.
        models: panel order; default the table's.
    """
    order = [m for m in (models or dict.fromkeys(table["model"])) if m in set(table["model"])]
    fig, axes = _panels(len(order))
    for ax, model in zip(axes, order, strict=True):
        mine = table[table["model"] == model]
        for (branch, name), group in mine.groupby(["branch", "metric"], sort=True):
            group = group.sort_values("step")
            ax.plot(group["step"], group["value"], "-" if name == "train_loss" else "--",
                    color=BRANCH_COLORS.get(str(branch), "C4"), label=f"{branch} {str(name).replace('_', ' ')}")
        ax.set(title=model, xlabel="step", ylabel="loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best")
    return fig


@_styled
def pareto_figure(table: pd.DataFrame, models: Sequence[str] | None = None) -> Figure:
    """What tuning buys against what it costs: one panel per study with a measured cost, each trial a point
    (its objective against its cost of steering), the Pareto front joined, the chosen trial starred, a
    constraint's bound as a dashed line.

    Args:
        table: ``sweeps.pareto_table`` output.
        models: panel order (by model, then study); default the table's.
    """
    order = [m for m in (models or dict.fromkeys(table["model"])) if m in set(table["model"])]
    studies = [(m, s) for m in order for s in dict.fromkeys(table[table["model"] == m]["study"])]
    fig, axes = _panels(len(studies))
    for ax, (model, study) in zip(axes, studies, strict=True):
        mine = table[(table["model"] == model) & (table["study"] == study)]
        colour = color(str(mine["variant"].iloc[0]))
        ax.scatter(mine["cost"], mine["value"], s=14, color="0.6", label="trial")
        front = mine[mine["on_front"].astype(bool)].sort_values("cost")
        ax.plot(front["cost"], front["value"], "-o", color=colour, markersize=4, label="Pareto front")
        chosen = mine[mine["chosen"].astype(bool)]
        ax.scatter(chosen["cost"], chosen["value"], marker="*", s=120, color=colour, edgecolor="k", zorder=3,
                   label="chosen")
        bounds = mine["bound"].dropna() if "bound" in mine else mine.iloc[0:0]
        if len(bounds):  # the constraint: trials beyond this line are infeasible
            ax.axvline(float(bounds.iloc[0]), color="0.3", linestyle="--", linewidth=1,
                       label=f"bound {float(bounds.iloc[0]):g}")
        ax.set(title=f"{model}\n{str(study).removeprefix(f'truthsteer-{model}-')}",
               xlabel=f"{mine['cost_metric'].iloc[0]} (cost)",
               ylabel=f"{mine['metric'].iloc[0]} (gain)")
        ax.legend(loc="best")
    return fig


def save_figure(fig: Figure, table: pd.DataFrame, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.png`` (``DPI``), ``<stem>.pdf`` and the table as ``<stem>.csv``.

    Args:
        fig: the figure.
        table: the table it plots.
        out_dir: the folder (created if needed).
        stem: the file name without extension (an ``artifacts.ANALYSIS_*`` constant).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}{ext}" for ext in EXTENSIONS]
    with paper_style():
        fig.savefig(paths[0], dpi=DPI)
        fig.savefig(paths[1])
    table.to_csv(paths[2], index=False)
    return paths


__all__ = [
    "DPI", "PAPER_STYLE", "category_delta_figure", "color", "cross_model_figure", "judge_agreement_figure",
    "layer_scale_figure", "paper_style", "pareto_figure", "relative_scale_figure", "save_figure", "scale_sweep_figure", "training_curves_figure",
]
