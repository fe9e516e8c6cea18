"""What a variant's judged rows add up to: each judge metric with its bootstrap interval, the paired delta
against baseline (McNemar p for 0/1 metrics), per-category tables and the summary in Markdown, and the
steered-token check that fails a steered variant that steered nothing."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from core import profile
from evaluation.judges import Judge, JudgeItem
from evaluation.side_effects import EFFECT_DIRECTIONS
from evaluation.statistics import bootstrap_ci, mcnemar, paired_difference, per_category
from steering.hooks import SteeringNotApplied

# Metrics whose per-question values are 0/1, so that McNemar's test applies to their deltas.
BINARY_METRIC = re.compile(r"^mc1$|_acc$|_truthful$|_informative$")


# Per-row counts of tokens produced under steering -> the variant metric of their mean per answer.
STEERED_FIELDS = {"steered_tokens": "steered_tokens_per_answer", "mc_steered_tokens": "mc_steered_tokens_per_answer"}


def judge_item(row: Mapping[str, Any]) -> JudgeItem:
    """The judge's view of a generations-table row.

    Args:
        row: a row with ``BASE_COLUMNS``.
    """
    return JudgeItem(qid=str(row["qid"]), question=str(row["question"]), answer=str(row["answer"]),
                     best_answer=str(row["best_answer"]), correct_answers=tuple(row["correct_answers"]),
                     incorrect_answers=tuple(row["incorrect_answers"]))


def score_rows(judges: Sequence[Judge], rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with every judge's fields added (``rows`` themselves are not changed).

    Args:
        judges: the judges (``mc`` bound to the rows' variant).
        rows: generations-table rows of one variant.
    """
    items = [judge_item(r) for r in rows]
    scored = [dict(r) for r in rows]
    for judge in judges:
        with profile.step(f"judge.{judge.name}"):
            fields = judge.score(items)
        if len(fields) != len(items):
            raise RuntimeError(f"judge {judge.name!r} returned {len(fields)} rows for {len(items)} items")
        for row, extra in zip(scored, fields, strict=True):
            row.update(extra)
    return scored


def judge_values(judge: Judge, rows: Sequence[Mapping[str, Any]], metric: str) -> list[float | None]:
    """Per row the metric's value, or None where the judge could not score the row.

    Args:
        judge: the judge that scored ``rows``.
        rows: judged rows.
        metric: one of the judge's metrics.
    """
    out: list[float | None] = []
    rate_key = f"{judge.name}_invalid_rate"
    names = [m for m in judge.metrics if m != rate_key]
    for row in rows:
        flag = row.get(f"{judge.name}_valid")
        valid = bool(flag) if flag is not None else all(_present(row.get(m)) for m in names)
        value = row.get(metric)
        out.append(float(value) if valid and value is not None and _present(value) else None)
    return out


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def judge_metric_names(judges: Sequence[Judge]) -> list[str]:
    """Every judge metric that gets an interval (not the invalid rates), in judge order.

    Args:
        judges: the run's judges.
    """
    return [m for j in judges for m in j.metrics if m != f"{j.name}_invalid_rate"]


def variant_metrics(
    judges: Sequence[Judge],
    rows: Sequence[Mapping[str, Any]],
    baseline_rows: Sequence[Mapping[str, Any]] | None,
    *,
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> dict[str, float]:
    """The metrics of one variant's judged rows (see the module docstring for the names).

    Args:
        judges: the run's judges.
        rows: this variant's judged rows.
        baseline_rows: the baseline's judged rows in the same question order, or None without baseline.
        n_bootstrap: bootstrap resamples.
        confidence: interval coverage.
        seed: bootstrap seed.
    """
    if baseline_rows is not None and [r["qid"] for r in rows] != [r["qid"] for r in baseline_rows]:
        raise ValueError("variant and baseline rows must list the same questions in the same order")
    out: dict[str, float] = {}
    for judge in judges:
        aggregated = judge.aggregate(rows)
        rate_key = f"{judge.name}_invalid_rate"
        out[rate_key] = float(aggregated[rate_key])
        for metric in (m for m in judge.metrics if m != rate_key):
            values = judge_values(judge, rows, metric)
            _, low, high = bootstrap_ci(values, n_bootstrap, confidence, seed)
            out.update({metric: float(aggregated[metric]), f"{metric}_ci_low": low, f"{metric}_ci_high": high})
            if baseline_rows is None:
                continue
            base = judge_values(judge, baseline_rows, metric)
            diff, low, high = paired_difference(values, base, n_bootstrap, confidence, seed)
            out.update({f"{metric}_delta": diff, f"{metric}_delta_ci_low": low, f"{metric}_delta_ci_high": high})
            if BINARY_METRIC.search(metric):
                out[f"{metric}_mcnemar_p"] = mcnemar(values, base)[1]
    tokens = [float(r["n_new_tokens"]) for r in rows if r.get("n_new_tokens") is not None]
    truncated = [float(bool(r["truncated"])) for r in rows if r.get("truncated") is not None]
    out["n_questions"] = float(len(rows))
    out["mean_new_tokens"] = math.fsum(tokens) / len(tokens) if tokens else math.nan
    out["truncated_rate"] = math.fsum(truncated) / len(truncated) if truncated else math.nan
    for field, metric in STEERED_FIELDS.items():
        steered = [float(r[field]) for r in rows if r.get(field) is not None]
        if steered:
            out[metric] = math.fsum(steered) / len(steered)
    return out


def check_variant_steered(variant: str, metrics: Mapping[str, float], steers: bool) -> None:
    """Fail a steered variant whose answers or MC scores were produced without steering any token.

    Every generation and MC forward already checks its hook's count (``check_steered``); this is the
    last line, over what the variant's rows say (answers read back from the generation store included).

    Args:
        variant: the variant's name.
        metrics: its metrics (``steered_tokens_per_answer``, ``mc_steered_tokens_per_answer``).
        steers: whether the variant edits the model (all but baseline).
    """
    if not steers:
        return
    for metric in STEERED_FIELDS.values():
        if metric in metrics and not metrics[metric] > 0:
            raise SteeringNotApplied(
                f"variant {variant}: {metric}={metrics[metric]:g}: no generated or scored token was steered, so its "
                "metrics would be the unsteered model's; check steering.layer/scale and the transformers version "
                "(make setup installs the tested ones)"
            )


def category_table(
    judges: Sequence[Judge], variant: str, rows: Sequence[Mapping[str, Any]],
    baseline_rows: Sequence[Mapping[str, Any]] | None, *, n_bootstrap: int = 0, confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Per metric and category: ``n``, ``mean`` (and ``delta`` against baseline with its paired interval,
    ``delta_ci_low``/``delta_ci_high``, when ``n_bootstrap > 0``), long format.

    Args:
        judges: the run's judges.
        variant: the variant name (a column).
        rows: the variant's judged rows.
        baseline_rows: the baseline's judged rows (the same questions in the same order), or None.
        n_bootstrap: resamples of each category's paired interval (0: none).
        confidence: the intervals' coverage.
        seed: the resampling seed.
    """
    frames = []
    for judge in judges:
        for metric in (m for m in judge.metrics if m != f"{judge.name}_invalid_rate"):
            mine = [{"category": r["category"], metric: v} for r, v in zip(rows, judge_values(judge, rows, metric),
                                                                            strict=True)]
            base = None if baseline_rows is None else [
                {"category": r["category"], metric: v}
                for r, v in zip(baseline_rows, judge_values(judge, baseline_rows, metric), strict=True)]
            table = per_category(mine, metric, baseline=base, n_bootstrap=n_bootstrap, confidence=confidence,
                                 seed=seed)
            table.insert(0, "metric", metric)
            table.insert(0, "variant", variant)
            frames.append(table)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _cell(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return "; ".join(map(str, value))
    return value


def flat_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The generations table as a DataFrame with lists joined by ``"; "`` (for CSV and MLflow tables).

    Args:
        rows: generations-table rows.
    """
    columns = list(dict.fromkeys(c for r in rows for c in r))
    return pd.DataFrame([{c: _cell(r.get(c)) for c in columns} for r in rows], columns=columns)


def summary_frame(metrics: Mapping[str, Mapping[str, float]], info: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Variants x metrics: one row per variant with its tags and every metric (intervals included).

    Args:
        metrics: variant -> its metrics.
        info: variant -> ``model``, ``dtype``, ``layer``, ``scale``.
    """
    records = []
    for variant, values in metrics.items():
        records.append({"variant": variant, **{k: info[variant].get(k) for k in ("model", "dtype", "layer", "scale")},
                        **values})
    return pd.DataFrame(records)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


COST_METRICS = tuple(EFFECT_DIRECTIONS)  # kl_neutral, ce_neutral_delta, kl_answers, ce_neutral


def summary_markdown(summary: pd.DataFrame, metric_names: Sequence[str]) -> str:
    """The summary as markdown: metrics x variants, ``mean [low, high]``; then the deltas against
    baseline, ``delta [low, high]`` with McNemar's p for binary metrics; then what steering costs (the
    side-effect metrics), a note when no judge measures informativeness; then rates and counts.

    Args:
        summary: ``summary_frame`` output.
        metric_names: the judge metrics to show, in order.
    """
    variants = list(summary["variant"])
    by_variant = {v: summary[summary["variant"] == v].iloc[0].to_dict() for v in variants}

    def table(title: str, cells: Callable[[dict[str, Any], str], str | None],
              names: Sequence[str] = metric_names) -> list[str]:
        lines = [f"## {title}", "", "| metric | " + " | ".join(variants) + " |",
                 "| --- |" + " --- |" * len(variants)]
        body = []
        for metric in names:
            row = [cells(by_variant[v], metric) for v in variants]
            if any(c is not None for c in row):
                body.append(f"| {metric} | " + " | ".join(c or "" for c in row) + " |")
        return [*lines, *body, ""] if body else []

    def mean_cell(values: dict[str, Any], metric: str) -> str | None:
        if metric not in values:
            return None
        return f"{_fmt(values[metric])} [{_fmt(values.get(f'{metric}_ci_low'))}, {_fmt(values.get(f'{metric}_ci_high'))}]"

    def delta_cell(values: dict[str, Any], metric: str) -> str | None:
        if f"{metric}_delta" not in values or pd.isna(values.get(f"{metric}_delta")):
            return None
        text = (f"{_fmt(values[f'{metric}_delta'])} [{_fmt(values.get(f'{metric}_delta_ci_low'))}, "
                f"{_fmt(values.get(f'{metric}_delta_ci_high'))}]")
        p = values.get(f"{metric}_mcnemar_p")
        return text if p is None or pd.isna(p) else f"{text} p={_fmt(p)}"

    first = summary.iloc[0]
    header = [f"# {first['model']} ({first['dtype']}): {len(variants)} variants", ""]
    rates = [c for c in summary.columns if c.endswith("_invalid_rate")] + [
        "n_questions", "truncated_rate", "empty_answer_rate", "degenerate_answer_rate", "steering_scale",
        "steering_scale_relative"]
    plain = ["## Counts", "", "| metric | " + " | ".join(variants) + " |", "| --- |" + " --- |" * len(variants)]
    plain += [f"| {c} | " + " | ".join(_fmt(by_variant[v].get(c)) for v in variants) + " |" for c in rates
              if c in summary.columns]
    costs = [m for m in COST_METRICS if m in summary.columns]
    cost = table("What steering costs (mean [CI]; 0 for baseline)", mean_cell, costs)
    informative = [m for m in summary.columns if m.endswith("_informative") and not m.endswith("_truthful_informative")]
    note = ([] if informative else
            ["Informativeness and True*Info: not measured, no judge of this run gives them (add `judge`, the "
             "trained judge, to eval.judges).", ""])
    return "\n".join([*header, *table("Metrics (mean [CI])", mean_cell),
                      *table("Against baseline (delta [CI], McNemar p)", delta_cell), *cost, *note, *plain, ""])


__all__ = ['BINARY_METRIC', 'COST_METRICS', 'STEERED_FIELDS', 'category_table', 'check_variant_steered', 'flat_frame', 'judge_item', 'judge_metric_names', 'judge_values', 'score_rows', 'summary_frame', 'summary_markdown', 'variant_metrics']
