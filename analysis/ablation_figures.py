"""The figures of a sweep's ablations, drawn from the tables of ``analysis.ablations`` and saved like every figure
of ``analysis.figures``: one panel per (model, sweep, metric), the variants in their fixed colours, points the
mean over seeds with the per-question bootstrap interval averaged over seeds."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.ablations import BRANCH_ORDER, POINT_KNOBS
from analysis.context import axis_label
from analysis.figures import PANEL, _band, _panels, _styled, color, fitted, wrapped
from analysis.tables import variant_order

KNOB_WORDS = {"scale": "steering scale (multiplier)", "layer": "steering layer", "mlp_expansion": "MLP width",
              "branch": "MLP branch", "seed": "seed"}
INTERVAL_NOTE = "error bars: 95% bootstrap interval over questions, averaged over seeds"


def _panel_keys(table: pd.DataFrame) -> list[tuple[str, str, str]]:
    return list(dict.fromkeys(zip(table["model"].astype(str), table["sweep"].astype(str),
                                  table["metric"].astype(str), strict=True)))


def _held(rows: pd.DataFrame, free: Sequence[str]) -> str:
    """The knobs a panel holds, in words, from the values its rows have (``layer 15, width 2x``)."""
    parts = []
    for knob in (k for k in POINT_KNOBS if k not in free and k != "branch"):
        values = sorted(rows[knob].dropna().astype(float).unique())
        if len(values) == 1:
            value = f"{values[0]:g}x" if knob == "mlp_expansion" else f"{values[0]:g}"
            parts.append(f"{'width' if knob == 'mlp_expansion' else knob} {value}")
    return ", ".join(parts)


def _title(model: str, sweep: str, rows: pd.DataFrame, free: Sequence[str]) -> str:
    """Model and sweep, the knobs held and the questions (the metric is the y axis's label)."""
    n = rows["n_questions"].astype(float).max()
    held = _held(rows, free)
    return fitted(f"{model}, sweep {sweep}\n{'at ' + held + '; ' if held else ''}"
                  f"n={'?' if np.isnan(n) else int(n)} questions", 50)


def _legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend under every panel, each label once (the panels share variants and marks)."""
    entries: dict[str, Artist] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside lower center", ncols=min(4, len(entries)),
                   fontsize="x-small")


def _yerr(value: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return np.vstack([np.nan_to_num(value - low, nan=0.0), np.nan_to_num(high - value, nan=0.0)])


def _levels(ax: Axes, rows: pd.DataFrame) -> None:
    """Variants without the panel's knob as horizontal levels with their interval (baseline dashed)."""
    for row in rows.to_dict("records"):
        variant = str(row["variant"])
        ax.axhline(row["seed_mean"], color=color(variant), linestyle="--" if variant == "baseline" else ":",
                   label=f"{variant} (level)")
        if np.isfinite(row["ci_low_seed_mean"]) and np.isfinite(row["ci_high_seed_mean"]):
            ax.axhspan(row["ci_low_seed_mean"], row["ci_high_seed_mean"], color=color(variant), alpha=0.1, linewidth=0)


def _knob_figure(table: pd.DataFrame, knob: str) -> Figure:
    panels = _panel_keys(table)
    fig, axes = _panels(len(panels))
    for ax, (model, sweep, metric_name) in zip(axes, panels, strict=True):
        mine = table[(table["model"] == model) & (table["sweep"] == sweep) & (table["metric"] == metric_name)]
        lines = mine[mine["role"] == "line"]
        _levels(ax, mine[mine["role"] == "reference"].sort_values("variant"))
        for variant in variant_order(lines["variant"]):
            group = lines[lines["variant"] == variant].sort_values(knob)
            x, value = group[knob].to_numpy(float), group["seed_mean"].to_numpy(float)
            colour = color(variant)
            ax.errorbar(x, value, yerr=_yerr(value, group["ci_low_seed_mean"].to_numpy(float),
                                             group["ci_high_seed_mean"].to_numpy(float)),
                        fmt="-o", color=colour, capsize=2, elinewidth=0.8, label=variant)
            sd, several = group["seed_sd"].to_numpy(float), group["n_seeds"].to_numpy(int) > 1
            if several.any():  # ± the spread across seeds, where there is one
                _band(ax, x[several], (value - sd)[several], (value + sd)[several], colour)
        ax.set(title=_title(model, sweep, mine, (knob,)), xlabel=KNOB_WORDS[knob],
               ylabel=textwrap.fill(axis_label(metric_name), 32))
        if knob == "layer":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(fig, axes)
    fig.suptitle(wrapped(f"{INTERVAL_NOTE}; band: ± SD across seeds, where several", fig), fontsize=7)
    return fig


@_styled
def sweep_scale_figure(table: pd.DataFrame) -> Figure:
    """Metric against steering scale at the sweep's reference layer and width: one panel per (model, sweep,
    metric), one line per steered variant (mean over seeds, bootstrap interval averaged over seeds as error bars,
    ± the SD across seeds as a band where there are several), baseline (dashed) and ITI (dotted) as levels.

    Args:
        table: ``ablations.knob_table(..., "scale", ...)`` output.
    """
    return _knob_figure(table, "scale")


@_styled
def sweep_layer_figure(table: pd.DataFrame) -> Figure:
    """Metric against steering layer at the sweep's reference scale and width, drawn as ``sweep_scale_figure``.

    Args:
        table: ``ablations.knob_table(..., "layer", ...)`` output.
    """
    return _knob_figure(table, "layer")


def _once(labelled: set[str], label: str) -> str | None:
    """``label`` the first time a panel uses it, then None (one legend entry per kind of mark)."""
    if label in labelled:
        return None
    labelled.add(label)
    return label


def _branch_key(branch: str) -> tuple[int, str]:
    return (BRANCH_ORDER.index(branch) if branch in BRANCH_ORDER else len(BRANCH_ORDER), branch)


@_styled
def mlp_arms_figure(table: pd.DataFrame) -> Figure:
    """The MLP arms side by side at the reference scale and layer: one panel per (model, sweep, metric), grouped
    bars, x the width (expansion), one bar per branch (in its ``mlp_<branch>`` colour) with the bootstrap interval
    averaged over seeds; baseline, CAA and ITI as levels.

    Args:
        table: ``ablations.mlp_arms_table`` output.
    """
    panels = _panel_keys(table)
    widest = int(table[table["role"] == "bar"].groupby(["model", "sweep"])["mlp_expansion"].nunique().max()) \
        if not table.empty else 1
    fig, axes = _panels(len(panels), panel=(max(PANEL[0], 1.2 * widest + 0.8), PANEL[1]))
    for ax, (model, sweep, metric_name) in zip(axes, panels, strict=True):
        mine = table[(table["model"] == model) & (table["sweep"] == sweep) & (table["metric"] == metric_name)]
        bars = mine[mine["role"] == "bar"].assign(arm=lambda f: f["branch"].where(f["branch"] != "", f["variant"]))
        _levels(ax, mine[mine["role"] == "reference"].sort_values("variant"))
        widths = sorted(bars["mlp_expansion"].astype(float).unique())
        arms = sorted(bars["arm"].unique(), key=_branch_key)
        width = 0.8 / max(1, len(arms))
        for k, arm in enumerate(arms):
            rows = bars[bars["arm"] == arm].groupby("mlp_expansion").first().reindex(widths)
            value = rows["seed_mean"].to_numpy(float)
            x = np.arange(len(widths)) + (k - (len(arms) - 1) / 2) * width
            variant = str(rows["variant"].dropna().iloc[0])
            ax.bar(x, np.nan_to_num(value), width, color=color(variant), label=f"{arm} branch",
                   yerr=_yerr(value, rows["ci_low_seed_mean"].to_numpy(float), rows["ci_high_seed_mean"].to_numpy(float)),
                   error_kw={"elinewidth": 0.8, "capsize": 1.5})
        ax.set_xticks(range(len(widths)), [f"{w:g}x" for w in widths])
        ax.set(title=_title(model, sweep, bars, ("mlp_expansion",)),
               xlabel="MLP width (hidden units per residual dimension)", ylabel=textwrap.fill(axis_label(metric_name), 32))
    _legend(fig, axes)
    fig.suptitle(wrapped(INTERVAL_NOTE, fig), fontsize=7)
    return fig


@_styled
def seed_spread_figure(table: pd.DataFrame) -> Figure:
    """The spread over seeds at the reference point: one panel per (model, sweep, metric), per variant each seed's
    value as a dot, the mean ± the SD across seeds in black, and beside it the bootstrap interval averaged over
    seeds in the variant's colour.

    Args:
        table: ``ablations.seeds_table`` output.
    """
    panels = _panel_keys(table)
    n_variants = int(table.groupby(["model", "sweep", "metric"])["variant"].nunique().max()) if not table.empty else 1
    fig, axes = _panels(len(panels), panel=(max(PANEL[0], 0.7 * n_variants + 0.8), PANEL[1]))
    for ax, (model, sweep, metric_name) in zip(axes, panels, strict=True):
        mine = table[(table["model"] == model) & (table["sweep"] == sweep) & (table["metric"] == metric_name)]
        variants = variant_order(mine["variant"])
        labelled: set[str] = set()
        for i, variant in enumerate(variants):
            rows = mine[mine["variant"] == variant]
            first = rows.iloc[0]
            colour = color(variant)
            spread = np.linspace(-0.06, 0.06, len(rows)) if len(rows) > 1 else np.zeros(1)
            ax.scatter(i - 0.15 + spread, rows["value"].to_numpy(float), s=12, color=colour, alpha=0.8,
                       edgecolor="k", linewidth=0.3, zorder=3, label=_once(labelled, "one seed"))
            sd = float(first["seed_sd"]) if int(first["n_seeds"]) > 1 else 0.0
            ax.errorbar([i - 0.15], [first["seed_mean"]], yerr=[[sd], [sd]], fmt="_", color="k", markersize=10,
                        capsize=3, elinewidth=1.0, label=_once(labelled, "mean ± SD across seeds"))
            mean = np.array([first["seed_mean"]], float)
            ax.errorbar([i + 0.15], mean, yerr=_yerr(mean, np.array([first["ci_low_seed_mean"]], float),
                                                     np.array([first["ci_high_seed_mean"]], float)),
                        fmt="o", color=colour, capsize=2, elinewidth=0.8,
                        label=_once(labelled, "bootstrap interval, mean over seeds"))
        counts = [int(mine[mine["variant"] == v]["n_seeds"].iloc[0]) for v in variants]
        ax.set_xticks(range(len(variants)), [f"{v}\n{n} seed{'s' if n > 1 else ''}"
                                             for v, n in zip(variants, counts, strict=True)])
        ax.set_xlim(-0.6, len(variants) - 0.4)
        ax.set(title=_title(model, sweep, mine, ("seed",)), xlabel="variant (seeds at the reference point)",
               ylabel=textwrap.fill(axis_label(metric_name), 32))
    _legend(fig, axes)
    return fig


__all__ = ["mlp_arms_figure", "seed_spread_figure", "sweep_layer_figure", "sweep_scale_figure"]
