"""``report.md``: the selected runs, each variant's metrics with intervals and deltas, the judges'
agreement with people, and every figure with its table, as Markdown (long tables cut, the CSV beside them)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from analysis import tables
from analysis.frames import FIGURES, FrameTables
from analysis.runs import tag
from core import artifacts
from core.artifacts import TAG_STAGE
from core.tracking import code_version

MAX_REPORT_ROWS = 60  # longer tables are cut in report.md (the CSV beside it has every row)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, max_rows: int = MAX_REPORT_ROWS, csv_name: str = "") -> str:
    """A Markdown table of ``frame`` (floats to 4 significant digits, NaN as –), cut after ``max_rows``.

    Args:
        frame: the table.
        max_rows: rows shown; the rest are counted in a note.
        csv_name: the file holding every row, named in that note.
    """
    if frame.empty:
        return "(empty)\n"
    columns = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in frame.head(max_rows).itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    if len(frame) > max_rows:
        lines.append("")
        lines.append(f"… {len(frame) - max_rows} more rows" + (f" in [{csv_name}]({csv_name})" if csv_name else ""))
    return "\n".join(lines) + "\n"


def _three(value: float) -> str:
    return f"{round(value, 3) + 0.0:.3f}"  # + 0.0: no "-0.000" for a difference that rounds to zero


def _interval(value: float, low: float, high: float) -> str:
    if math.isnan(value):
        return "–"
    if math.isnan(low) or math.isnan(high):
        return _three(value)
    return f"{_three(value)} [{_three(low)}, {_three(high)}]"


def variant_sections(table: pd.DataFrame, metric_names: Sequence[str]) -> list[str]:
    """Per model two tables, variants x metrics: ``value [low, high]``, then against baseline
    ``delta [low, high]`` with McNemar's p.

    Args:
        table: ``tables.variant_metrics_table`` output.
        metric_names: the column order.
    """
    lines: list[str] = []
    for model in dict.fromkeys(table["model"]):
        mine = table[table["model"] == model]
        names = [m for m in metric_names if m in set(mine["metric"])]
        variants = tables.variant_order(mine["variant"])
        evaluation = mine["evaluation"].iloc[0] or "(no parent run)"
        lines += [f"### {model}", "", f"Evaluation run `{evaluation}`.", "",
                  "| variant | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
        deltas = ["| variant | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
        for variant in variants:
            cells, delta_cells = [], []
            for name in names:
                hit = mine[(mine["variant"] == variant) & (mine["metric"] == name)]
                if hit.empty:
                    cells.append("–")
                    delta_cells.append("–")
                    continue
                r = hit.iloc[0]
                cells.append(_interval(r["value"], r["ci_low"], r["ci_high"]))
                text = _interval(r["delta"], r["delta_ci_low"], r["delta_ci_high"])
                delta_cells.append(text if math.isnan(r["mcnemar_p"]) else f"{text} p={r['mcnemar_p']:.3g}")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
            if variant != "baseline":
                deltas.append(f"| {variant} | " + " | ".join(delta_cells) + " |")
        lines += ["", "Against baseline (delta [interval], McNemar p):", "", *deltas, ""]
    return lines


def _curve_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """Per run and loss: first, last and lowest value (the full curves are in the CSV)."""
    if curves.empty:
        return curves
    rows = []
    for (model, branch, run_id, name), group in curves.groupby(["model", "branch", "run_id", "metric"], sort=False):
        group = group.sort_values("step")
        rows.append({"model": model, "branch": branch, "metric": name, "steps": len(group),
                     "first": float(group["value"].iloc[0]), "last": float(group["value"].iloc[-1]),
                     "min": float(group["value"].min()), "run_id": run_id})
    return pd.DataFrame(rows)


def report_markdown(runs: pd.DataFrame, found: FrameTables, all_tables: Mapping[str, pd.DataFrame],
                    drawn: Sequence[str], missing: pd.DataFrame, title: str = "",
                    calibration: tuple[str, str] = ("", "")) -> str:
    """The text of ``report.md``: header, variant metrics, the judges' agreement with people, best
    settings, each figure with its table, and the missing list.

    Args:
        runs: the run frame.
        found: the frame tables.
        all_tables: figure stem or table name -> table.
        drawn: the figures drawn.
        missing: the missing list.
        title: the selection in words.
        calibration: the agreement table of a calibrate run (markdown) and its run id, or "".
    """
    stages = tag(runs, TAG_STAGE).fillna("(none)").value_counts().sort_index()
    sizes = [f"{m} ({found.sizes[m]:g}B)" if not math.isnan(found.sizes.get(m, math.nan)) else m
             for m in found.models]
    lines = ["# truthsteer analysis", ""]
    if title:
        lines += [f"Selection: {title}.", ""]
    lines += [f"{len(runs)} run{'' if len(runs) == 1 else 's'} ({', '.join(f'{n} {s}' for s, n in stages.items())}), listed in "
              f"[{artifacts.ANALYSIS_RUNS}]({artifacts.ANALYSIS_RUNS}). Models, smallest first: "
              f"{', '.join(sizes) or 'none'}.", "",
              f"Truthfulness metric of the figures: `{found.metric or 'none'}` (the first of "
              f"{', '.join(tables.PREFERRED_METRICS)} that the runs report). Code version `{code_version()}`.", ""]
    lines += ["## Variant metrics", "",
              "Per model, from its latest evaluation; cells are the mean and its interval. All rows: "
              f"[{artifacts.ANALYSIS_VARIANT_METRICS}]({artifacts.ANALYSIS_VARIANT_METRICS}).", ""]
    lines += variant_sections(found.variant_metrics, found.metric_names) or ["(no evaluate.variant runs)", ""]
    lines += ["## The judges' agreement with people", ""]
    text, run_id = calibration
    if text:
        lines += [f"Calibrate run `{run_id}`: each judge's verdicts against TruthfulQA's human labels of the "
                  "evaluated questions (held out from the trained judge); intervals resample questions. Read the "
                  "variant metrics of a judge with its agreement here.", "", text]
    else:
        lines += ["(no calibrate run selected)", ""]
    best = found.best_settings
    lines += ["## Best layer and scale per model", "",
              "The best trial of each tune study and the best steered variant run over all evaluations (an "
              "MLP variant's scale is the hook's 1.0: its module's output is the whole delta). "
              f"[{artifacts.ANALYSIS_BEST_SETTINGS}]({artifacts.ANALYSIS_BEST_SETTINGS})", "",
              markdown_table(best, csv_name=artifacts.ANALYSIS_BEST_SETTINGS)]
    lines += ["## Figures", ""]
    for spec in FIGURES:
        lines += [f"### {spec.title}", ""]
        if spec.stem not in drawn:
            lines += [f"Not drawn: it needs {spec.needs}.", ""]
            continue
        table = all_tables[spec.stem]
        shown = _curve_summary(table) if spec.stem == artifacts.ANALYSIS_TRAINING_CURVES else table
        lines += [f"![{spec.title}]({spec.stem}.png)", "", spec.caption,
                  f"PDF: [{spec.stem}.pdf]({spec.stem}.pdf); table: [{spec.stem}.csv]({spec.stem}.csv).", "",
                  markdown_table(shown, csv_name=f"{spec.stem}.csv")]
    lines += ["## Missing", ""]
    if missing.empty:
        lines += ["Nothing: every run had every metric and artifact looked for.", ""]
    else:
        lines += [f"{len(missing)} items, also in [{artifacts.ANALYSIS_MISSING}]({artifacts.ANALYSIS_MISSING}).", "",
                  markdown_table(missing, max_rows=len(missing))]
    return "\n".join(lines)


__all__ = ['MAX_REPORT_ROWS', 'markdown_table', 'report_markdown', 'variant_sections']
