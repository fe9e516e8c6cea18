"""The evaluate run's own comparison: which variant is better, by how much, how sure.

``comparison_table`` is variants x headline metrics, long: each value with its interval and its delta against
baseline with the delta's interval (McNemar's p for 0/1 metrics). ``comparison_figure`` draws it: one panel per
headline metric, a point per variant with its interval, baseline's value as a dashed line, and each steered
variant's delta written under it. ``log_comparison`` logs both to the active run (``evaluate/comparison.png``
and the MLflow table ``evaluate/comparison.json``), beside the summary.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from core import artifacts
from evaluation.metric_names import axis_label

# The metrics that answer "is it more truthful", most trusted first (the trained judge agrees best with people).
HEADLINE = ("judge_truthful_informative", "judge_truthful", "llm_logprob_truthful", "llm_truthful",
            "semantic_acc", "mc2", "mc1", "bleu_acc", "rougeL_acc")
MAX_PANELS = 4
COLUMNS = ["variant", "metric", "value", "ci_low", "ci_high", "delta", "delta_ci_low", "delta_ci_high", "mcnemar_p",
           "n_questions"]


def headline_metrics(metric_names: Sequence[str]) -> list[str]:
    """Up to MAX_PANELS of the judged metrics: HEADLINE's order first, then the others as judged."""
    known = [m for m in HEADLINE if m in metric_names]
    return (known + [m for m in metric_names if m not in known])[:MAX_PANELS]


def comparison_table(summary: pd.DataFrame, metric_names: Sequence[str]) -> pd.DataFrame:
    """Variants x headline metrics, one row each (``COLUMNS``), from ``variant_metrics.summary_frame``."""
    records = []
    for row in summary.to_dict("records"):
        n = sum(float(row.get(k) or 0.0) for k in ("n_generated", "n_reused"))
        for metric in headline_metrics(metric_names):
            records.append({"variant": row["variant"], "metric": metric, "value": row.get(metric),
                            "ci_low": row.get(f"{metric}_ci_low"), "ci_high": row.get(f"{metric}_ci_high"),
                            "delta": row.get(f"{metric}_delta"), "delta_ci_low": row.get(f"{metric}_delta_ci_low"),
                            "delta_ci_high": row.get(f"{metric}_delta_ci_high"),
                            "mcnemar_p": row.get(f"{metric}_mcnemar_p"), "n_questions": int(n)})
    return pd.DataFrame(records, columns=COLUMNS).astype({c: float for c in COLUMNS[2:9]})


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def comparison_figure(table: pd.DataFrame, title: str, confidence: float = 0.95) -> Figure:
    """One panel per metric of ``comparison_table``'s output; `title` names model, split and n."""
    metrics = list(dict.fromkeys(table["metric"]))
    figure = Figure(figsize=(1.1 * max(len(set(table["variant"])), 3) * max(len(metrics), 1), 3.6),
                    layout="constrained")
    figure.suptitle(title)
    for ax, metric in zip(figure.subplots(1, max(len(metrics), 1), squeeze=False)[0], metrics, strict=False):
        mine = table[table["metric"] == metric].reset_index(drop=True)
        x = np.arange(len(mine))
        values = mine["value"].to_numpy(float)
        below = np.clip(values - mine["ci_low"].to_numpy(float), 0, None)
        above = np.clip(mine["ci_high"].to_numpy(float) - values, 0, None)
        ax.errorbar(x, values, yerr=np.nan_to_num(np.vstack([below, above])), fmt="o", capsize=4)
        base = mine[mine["variant"] == "baseline"]
        if not base.empty:
            ax.axhline(float(base["value"].iloc[0]), linestyle="--", color="grey", linewidth=1, label="baseline")
        labels = []
        for row in mine.to_dict("records"):
            delta = row["delta"]
            if row["variant"] == "baseline" or delta is None or np.isnan(delta):
                labels.append(str(row["variant"]))
            else:
                labels.append(f"{row['variant']}\nΔ {_signed(delta)}\n[{_signed(row['delta_ci_low'])}, "
                              f"{_signed(row['delta_ci_high'])}]")
        ax.set_xticks(x, labels, fontsize=6.5)
        ax.set_xlim(-0.5, len(mine) - 0.5)
        ax.set_title(axis_label(metric), fontsize=9)
        ax.set_ylabel(f"mean over questions ({confidence:.0%} interval)" if ax is figure.axes[0] else "")
    return figure


def log_comparison(summary: pd.DataFrame, metric_names: Sequence[str], *, model: str, split: str,
                   confidence: float = 0.95) -> pd.DataFrame:
    """Log the comparison table and figure to the active run; returns the table."""
    table = comparison_table(summary, metric_names)
    if table.empty:
        return table
    n = int(table["n_questions"].max())
    mlflow.log_table(data=table, artifact_file=artifacts.COMPARISON_TABLE)
    title = f"{model}: {split} split, n = {n} questions; delta against baseline below each variant"
    mlflow.log_figure(comparison_figure(table, title, confidence), artifacts.COMPARISON_FIGURE)
    return table


__all__ = ['COLUMNS', 'HEADLINE', 'comparison_figure', 'comparison_table', 'headline_metrics', 'log_comparison']
