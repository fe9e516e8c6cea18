"""The figures of sweeps and tuning: a metric against the steering scale (absolute and relative), the tuning
objective over layer and scale, and tuning's gain against its cost. Drawn like every figure of
``analysis.figures`` (which saves them)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.context import Context, axis_label, words
from analysis.figures import NO_CONTEXT, PANEL, _band, _panels, _styled, color, fitted, wrapped


def short(name: str) -> str:
    """A metric's name for a legend: its words up to the first colon (``MC2``, ``True×Info rate``)."""
    return words(name).split(":")[0]


@_styled
def scale_sweep_figure(table: pd.DataFrame, models: Sequence[str] | None = None,
                       context: Context = NO_CONTEXT) -> Figure:
    """Metric against steering scale: one panel per model and metric (an evaluation's judge metric and a tune
    study's objective never share an axis), one line per (source, variant) with its interval as a band, the
    baseline as a dashed line with its band; where the points' ``kl_neutral`` was measured, it is drawn against a
    second axis (dashed, square markers).

    Args:
        table: ``tables.scale_sweep_table`` output.
        models: panel order; default the table's.
        context: split, n and judge of each model, for the titles.
    """
    order = list(models or dict.fromkeys(table["model"]))
    order = [m for m in order if m in set(table["model"])]
    panels = [(m, metric) for m in order for metric in dict.fromkeys(table[table["model"] == m]["metric"].astype(str))]
    fig, axes = _panels(len(panels))
    for ax, (model, metric_name) in zip(axes, panels, strict=True):
        mine = table[(table["model"] == model) & (table["metric"].astype(str) == metric_name)]
        base = mine[mine["variant"] == "baseline"]
        for row in base.to_dict("records"):
            ax.axhline(row["value"], color=color("baseline"), linestyle="--", label=f"baseline ({short(row['metric'])})")
            if np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"]):
                ax.axhspan(row["ci_low"], row["ci_high"], color=color("baseline"), alpha=0.12, linewidth=0)
        lines = mine[mine["variant"] != "baseline"]
        for (source, variant, layer), group in lines.groupby(["source", "variant", "layer"], sort=True):
            group = group.sort_values("scale")
            x = group["scale"].to_numpy(float)
            colour = color(str(variant))
            style = "-" if source == "evaluate" else ":"
            ax.plot(x, group["value"].to_numpy(float), style, marker="o", color=colour,
                    label=f"{variant}, layer {layer:g} ({source}: {short(group['metric'].iloc[0])})")
            _band(ax, x, group["ci_low"].to_numpy(float), group["ci_high"].to_numpy(float), colour)
        sources = set(mine["source"])
        about = context.about(model, metric_name) if "evaluate" in sources else "tune: val split"
        ax.set(title=fitted(f"{model}\n{about}; {len(lines)} points"), xlabel="steering scale (multiplier of the vector)",
               ylabel=textwrap.fill(axis_label(metric_name), 32))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize="x-small")
        costed = lines[np.isfinite(lines["kl_neutral"].to_numpy(float))] if "kl_neutral" in lines else lines.iloc[0:0]
        if not costed.empty:  # what the same points cost, on a second axis
            cost_ax = ax.twinx()
            for (_, variant, _), group in costed.groupby(["source", "variant", "layer"], sort=True):
                group = group.sort_values("scale")
                cost_ax.plot(group["scale"].to_numpy(float), group["kl_neutral"].to_numpy(float), "--", marker="s",
                             markersize=3, color=color(str(variant)), alpha=0.7)
            cost_ax.set_ylabel(textwrap.fill(f"{words('kl_neutral')}, dashed squares", 32))
    return fig


@_styled
def relative_scale_figure(table: pd.DataFrame, models: Sequence[str] | None = None,
                          context: Context = NO_CONTEXT) -> Figure:
    """Metric against the relative steering scale: one panel per steered variant, one line per model (and
    source: evaluate solid, tune dotted), with its interval as a band; models of any size share the x axis.

    Args:
        table: ``sweeps.relative_scale_table`` output.
        models: the legend's model order (smallest first); default the table's.
        context: split, n and judge of each model, for the title.
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
                        color=cmap[index], label=f"{model}, {where} ({source}: {short(group['metric'].iloc[0])})")
                _band(ax, x, group["ci_low"].to_numpy(float), group["ci_high"].to_numpy(float), cmap[index])
        metrics = sorted(set(mine["metric"].astype(str)))
        ax.set(title=f"{variant}: across models", xlabel="relative scale (added norm / mean residual norm)",
               ylabel=textwrap.fill(axis_label(metrics[0]), 32) if len(metrics) == 1 else "metric value (see legend)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize="x-small")
    sources = set(table["source"])
    lines = [f"{m}: {context.about(m, str(table['metric'].iloc[0]))}" for m in order] if "evaluate" in sources else []
    tuned = int((table["source"] == "tune").sum())
    fig.suptitle(wrapped("\n".join([*lines, *([f"tune: val split, {tuned} trials"] if tuned else [])]), fig), fontsize=7)
    return fig


@_styled
def layer_scale_figure(table: pd.DataFrame, models: Sequence[str] | None = None,
                       context: Context = NO_CONTEXT) -> Figure:
    """The tuning objective over layer (rows) and scale (columns): one heatmap per study, cells
    annotated with the value and blank where no trial ran; studies of the same metric share one colour range.

    Args:
        table: ``tables.layer_scale_table`` output.
        models: panel order; default the table's.
        context: unused (tune scores on the val split, said in the title).
    """
    del context
    keys = list(dict.fromkeys(zip(table["model"], table["study"], strict=True)))
    if models:
        keys.sort(key=lambda k: list(models).index(k[0]) if k[0] in models else len(models))
    fig, axes = _panels(len(keys), panel=(PANEL[0] + 0.6, PANEL[1] + 0.4))
    for ax, (model, study) in zip(axes, keys, strict=True):
        mine = table[(table["model"] == model) & (table["study"] == study)]
        grid = mine.pivot_table(index="layer", columns="scale", values="value", aggfunc="mean")
        values = np.ma.masked_invalid(grid.to_numpy(float))
        same = table[table["metric"] == mine["metric"].iloc[0]]["value"].to_numpy(float)  # one range per metric
        image = ax.imshow(values, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest",
                          vmin=float(np.nanmin(same)), vmax=float(np.nanmax(same)))
        ax.set_xticks(range(len(grid.columns)), [f"{s:g}" for s in grid.columns], rotation=45 if len(grid.columns) > 6 else 0)
        ax.set_yticks(range(len(grid.index)), [f"{int(layer)}" for layer in grid.index])
        ax.grid(False)
        if grid.size <= 150:
            low, high = float(np.nanmin(same)), float(np.nanmax(same))  # the shared range decides the text colour
            span = high - low
            for (i, j), value in np.ndenumerate(grid.to_numpy(float)):
                if np.isfinite(value):
                    light = span == 0 or value < low + 0.6 * span
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=5.5,
                            color="white" if light else "black")
        metric_name = str(mine["metric"].iloc[0])
        fig.colorbar(image, ax=ax, label=textwrap.fill(f"{axis_label(metric_name)}, mean over trials", 32), shrink=0.9)
        name = str(study)
        label = f"tune run {name[:8]}" if re.fullmatch(r"[0-9a-f]{32}", name) else name  # a worker's run id
        trials = int(mine["n_trials"].sum()) if "n_trials" in mine else len(mine)
        ax.set(title=f"{model}: {label}\nval split, {trials} trials", xlabel="steering scale", ylabel="layer")
    return fig


@_styled
def pareto_figure(table: pd.DataFrame, models: Sequence[str] | None = None,
                  context: Context = NO_CONTEXT) -> Figure:
    """What tuning buys against what it costs: one panel per study with a measured cost, each trial a point
    (its objective against its cost of steering), the Pareto front joined, the chosen trial starred, a
    constraint's bound as a dashed line.

    Args:
        table: ``sweeps.pareto_table`` output.
        models: panel order (by model, then study); default the table's.
        context: unused (tune scores on the val split, said in the title).
    """
    del context
    order = [m for m in (models or dict.fromkeys(table["model"])) if m in set(table["model"])]
    studies = [(m, s) for m in order for s in dict.fromkeys(table[table["model"] == m]["study"])]
    fig, axes = _panels(len(studies))
    for ax, (model, study) in zip(axes, studies, strict=True):
        mine = table[(table["model"] == model) & (table["study"] == study)]
        colour = color(str(mine["variant"].iloc[0]))
        ax.scatter(mine["cost"], mine["value"], s=14, color="0.6", label="trial")
        if {"ci_low", "ci_high"} <= set(mine) and np.isfinite(mine["ci_low"].to_numpy(float)).any():
            value = mine["value"].to_numpy(float)
            ax.errorbar(mine["cost"], value, yerr=np.vstack([np.nan_to_num(value - mine["ci_low"].to_numpy(float)),
                                                           np.nan_to_num(mine["ci_high"].to_numpy(float) - value)]),
                        fmt="none", ecolor="0.6", elinewidth=0.6, label="95% interval")
        front = mine[mine["on_front"].astype(bool)].sort_values("cost")
        ax.plot(front["cost"], front["value"], "-o", color=colour, markersize=4, label="Pareto front")
        chosen = mine[mine["chosen"].astype(bool)]
        ax.scatter(chosen["cost"], chosen["value"], marker="*", s=120, color=colour, edgecolor="k", zorder=3,
                   label="chosen")
        bounds = mine["bound"].dropna() if "bound" in mine else mine.iloc[0:0]
        if len(bounds):  # the constraint: trials beyond this line are infeasible
            ax.axvline(float(bounds.iloc[0]), color="0.3", linestyle="--", linewidth=1,
                       label=f"bound {float(bounds.iloc[0]):g}")
        ax.set(title=f"{model}: {str(study).removeprefix(f'truthsteer-{model}-')}\nval split, {len(mine)} trials",
               xlabel=textwrap.fill(f"cost: {axis_label(str(mine['cost_metric'].iloc[0]))}", 48),
               ylabel=textwrap.fill(f"gain: {axis_label(str(mine['metric'].iloc[0]))}", 32))
        ax.legend(loc="best")
    return fig


__all__ = ["layer_scale_figure", "pareto_figure", "relative_scale_figure", "scale_sweep_figure"]
