"""Paper-style figures, each drawn from one table of ``analysis.tables`` and saved beside it.

Figures are ``matplotlib.figure.Figure`` objects rendered by the Agg (PNG) and PDF canvases, never
through pyplot, so nothing opens a window or keeps global figure state. ``save_figure`` writes
``<stem>.png`` (300 dpi), ``<stem>.pdf`` and ``<stem>.csv``, the table the figure plots.
"""

from __future__ import annotations

import functools
import math
import textwrap
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

from analysis.context import Context, axis_label, judge_of, words
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
LOSS_NAMES = {"mc": "MC hinge loss", "gen": "generation NLL (nats/token)"}  # what each branch minimises
NO_CONTEXT = Context()
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


def fitted(text: str, width: int = 58) -> str:
    """A panel's title wrapped to about its width (one panel of ``PANEL`` at 8 points), each line on its own."""
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


def wrapped(text: str, fig: Figure, points: float = 7) -> str:
    """``fitted`` to the width of ``fig`` (about 0.55 em per character at ``points``)."""
    return fitted(text, max(30, int(fig.get_figwidth() * 72 / (0.55 * points))))


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
def cross_model_figure(table: pd.DataFrame, context: Context = NO_CONTEXT) -> Figure:
    """Per metric a panel of grouped bars: one group per model (smallest first) that has the metric,
    one bar per variant, error bars from the interval; one legend above all panels, and per model a line
    under it with its split, n and judge agreement.

    Args:
        table: ``tables.cross_model_table`` output (already in model-size order).
        context: split, n and judge of each model.
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
        ax.set(title=axis_label(metric_name), xlabel="model (parameters)",
               ylabel=textwrap.fill(words(metric_name), 28))
        if (mine["value"] >= 0).all():
            ax.set_ylim(bottom=0)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=len(handles))
    if metrics:
        lines = [f"{m}: {context.about(m, metrics[0])}" for m in dict.fromkeys(table["model"])]
        fig.suptitle(wrapped("Variants compared (error bars: 95% bootstrap intervals)\n" + "\n".join(lines), fig),
                     fontsize=7)
    return fig


@_styled
def judge_agreement_figure(table: pd.DataFrame, models: Sequence[str] | None = None,
                           context: Context = NO_CONTEXT) -> Figure:
    """The first judge (trained or LLM) against the semantic judge: per model (row) and variant (column) the 2x2
    table of verdict counts, shaded by their share of the panel's answers on one colour scale for every
    panel, titled with Cohen's kappa and its bootstrap interval.

    Args:
        table: ``agreement.agreement_table`` output.
        models: row order; default the table's.
        context: split and n of each model.
    """
    order = [m for m in (models or dict.fromkeys(table["model"])) if m in set(table["model"])]
    variants = variant_order(table["variant"])
    fig = Figure(figsize=(2.3 * len(variants) + 0.6, 2.1 * len(order) + 0.3), layout="constrained")
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
            shares = counts / max(1.0, counts.sum())
            image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)  # one scale for every panel
            for (a, b), value in np.ndenumerate(counts):
                ax.text(b, a, f"{int(value)}", ha="center", va="center",
                        color="white" if shares[a, b] > 0.5 else "black")
            ax.grid(False)
            ax.set_xticks([0, 1], ["1", "0"])
            ax.set_yticks([0, 1], ["1", "0"])
            ax.set_xlabel(f"truthful? {judge_of(str(row['semantic_metric']))[1]}")
            first = f"truthful? {judge_of(str(row['llm_metric']))[1]}"
            ax.set_ylabel(f"{model} ({context.about(model)})\n{first}" if j == 0 else "")
            kappa = "n/a" if not np.isfinite(row["kappa"]) else f"{row['kappa']:.2f}"
            low, high = row.get("kappa_ci_low", math.nan), row.get("kappa_ci_high", math.nan)
            interval = f" [{low:.2f}, {high:.2f}]" if np.isfinite(low) and np.isfinite(high) else ""
            ax.set_title(f"{variant}: κ={kappa}{interval}\nn={int(row['n'])} answers")
            if j == len(variants) - 1:
                fig.colorbar(image, ax=ax, shrink=0.7, label="share of answers")
    return fig


@_styled
def category_delta_figure(table: pd.DataFrame, models: Sequence[str] | None = None,
                          context: Context = NO_CONTEXT) -> Figure:
    """Per model and shown variant the change against baseline in each category with enough questions, with
    its paired interval as an error bar, largest gain on top.

    Args:
        table: ``categories.category_delta_table`` output.
        models: panel order; default the table's.
        context: split, n and judge of each model.
    """
    order = [m for m in (models or dict.fromkeys(table["model"])) if m in set(table["model"])]
    panels = [(m, v) for m in order for v in dict.fromkeys(table[table["model"] == m]["variant"])]
    n_categories = int(table.groupby(["model", "variant"])["category"].nunique().max()) if not table.empty else 1
    fig, axes = _panels(len(panels), panel=(PANEL[0] + 1.2, 1.2 + 0.16 * n_categories), columns=2)
    for ax, (model, variant) in zip(axes, panels, strict=True):
        mine = table[(table["model"] == model) & (table["variant"] == variant)].sort_values("delta", kind="stable")
        delta = mine["delta"].to_numpy(float)
        low = np.nan_to_num(delta - mine["delta_ci_low"].to_numpy(float), nan=0.0)
        high = np.nan_to_num(mine["delta_ci_high"].to_numpy(float) - delta, nan=0.0)
        ax.barh(range(len(mine)), np.nan_to_num(delta), color=np.where(delta >= 0, "C0", "C3"),
                xerr=np.vstack([low, high]), error_kw={"elinewidth": 0.8, "capsize": 1.5})
        ax.set_yticks(range(len(mine)), [f"{c} (n={n})" for c, n in zip(mine["category"], mine["n"], strict=True)])
        ax.axvline(0, color="0.3", linewidth=0.6)
        metric_name, how = str(mine["metric"].iloc[0]), str(mine["chosen_on"].iloc[0])
        ax.set(title=fitted(f"{model}: {variant} minus baseline, {how}\n{context.about(model, metric_name)}", 75),
               xlabel=f"change in {axis_label(metric_name)}\n(bars: 95% paired bootstrap intervals)",
               ylabel="category (questions)")
    return fig


@_styled
def training_curves_figure(table: pd.DataFrame, models: Sequence[str] | None = None,
                           context: Context = NO_CONTEXT) -> Figure:
    """MLP training: per model and branch, on its own axis (the branches minimise different losses), the
    train loss of each step's batch (solid), the val loss (dashed) and the whole train set's loss after
    training (a diamond at the last step).

    Args:
        table: ``tables.training_curves_table`` output.
        models: panel order; default the table's.
        context: unused (training reads the train and val splits).
    """
    del context
    order = [m for m in (models or dict.fromkeys(table["model"])) if m in set(table["model"])]
    panels = [(m, b) for m in order for b in sorted(set(table[table["model"] == m]["branch"].astype(str)))]
    fig, axes = _panels(len(panels), columns=2)
    words = {"train_loss": "train, this step's batch", "val_loss": "val, whole set"}
    for ax, (model, branch) in zip(axes, panels, strict=True):
        mine = table[(table["model"] == model) & (table["branch"] == branch)]
        colour = BRANCH_COLORS.get(branch, "C4")
        for name, style in (("train_loss", "-"), ("val_loss", "--")):
            group = mine[mine["metric"] == name].sort_values("step")
            if not group.empty:
                ax.plot(group["step"], group["value"], style, color=colour, label=words[name])
        final = mine[mine["metric"] == "final_train_loss"]
        if not final.empty:
            ax.plot(final["step"], final["value"], "D", color=colour, markeredgecolor="k",
                    label="train, whole set after training")
        ax.set(title=f"{model}: {branch} branch (run {str(mine['run_id'].iloc[0])[:8]})", xlabel="optimizer step",
               ylabel=LOSS_NAMES.get(branch, "loss"))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    "paper_style", "save_figure", "training_curves_figure",
]
