"""The ``analyze`` stage: figures, tables and ``report.md`` from any set of runs in the tracking store.

``analyze(runs, out_dir)`` computes every table of ``analysis.tables`` from a run frame, reading
metric histories and artifacts through a ``StoreReader``, draws the figures of ``FIGURES`` from
them and writes, into ``out_dir``:

- per figure ``<stem>.png`` (300 dpi), ``<stem>.pdf`` and ``<stem>.csv`` (the table it plots);
- ``variant_metrics.csv`` and ``best_settings.csv``, the report's other tables;
- for the sweep variant runs selected (``analysis.ablations``): the ablation figures of ``ABLATION_FIGURES``
  (``sweep_scale``, ``sweep_layer``, ``sweep_mlp_arms``, ``sweep_seeds``), each drawn where a sweep varied its
  knob, and ``sweep_runs.csv`` (one row per run and metric) and ``sweep_points.csv`` (averaged over seeds);
- ``runs.csv`` (the selected runs) and ``missing.csv`` (what was looked for and not found);
- ``report.md``, which embeds the figures and the tables behind them by relative links, and ``report.html``,
  the same page with the images embedded, which MLflow's artifact viewer renders (``analysis.html_report``).

A figure whose table is empty is not drawn, and says why in the missing list; nothing that is
missing from a run raises. ``run`` does the same and logs every file under ``analysis/`` of the
active run; ``analysis_run`` starts that run (stage ``analyze``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from matplotlib.figure import Figure

from analysis import ablation_figures, categories, figures, sweep_figures, tables
from analysis.ablations import AblationTables, ablation_tables
from analysis.agreement import agreement_table
from analysis.frames import (
    ABLATION_FIGURES,
    FIGURES,
    MlflowReader,
    StoreReader,
    _categories,
    _generations,
    frame_tables,
    registered_directions,
)
from analysis.html_report import HTML_REPORT, render
from analysis.markdown import markdown_table, report_markdown
from analysis.runs import Missing, Selection, model_of, of_stage, run_listing, tag
from core import artifacts
from core.artifacts import (
    ANALYSIS_SWEEP_LAYER,
    ANALYSIS_SWEEP_MLP_ARMS,
    ANALYSIS_SWEEP_POINTS,
    ANALYSIS_SWEEP_RUNS,
    ANALYSIS_SWEEP_SCALE,
    ANALYSIS_SWEEP_SEEDS,
    ANALYZE_STAGE,
    TAG_MODELS,
    TAG_STAGE,
)
from core.tracking import log_params_once, tracked_run


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What an analysis wrote.

    Args:
        out_dir: the folder.
        report: ``report.md``.
        files: every file written (figures, tables, report), in the order written.
        tables: figure stem or table name -> its table.
        drawn: the stems of the figures drawn.
        missing: ``model``, ``run_id``, ``what``.
        metric: the truthfulness metric of the figures.
    """

    out_dir: Path
    report: Path
    files: list[Path]
    tables: dict[str, pd.DataFrame]
    drawn: list[str]
    missing: pd.DataFrame
    metric: str | None


def _calibration(runs: pd.DataFrame, reader: StoreReader, missing: Missing) -> tuple[str, str]:
    """The agreement table (markdown) of the latest selected calibrate run, and its run id."""
    found = of_stage(runs, "calibrate")
    if found.empty:
        missing.add("no calibrate run selected: the judges' agreement with human labels is not reported "
                    "(mlflow run . -e calibrate, or full with the trained judge)")
        return "", ""
    latest = found.sort_values("start_time").iloc[-1]
    run_id = str(latest["run_id"])
    text = reader.artifact_text(run_id, artifacts.CALIBRATION_MARKDOWN)
    if text is None:
        missing.add(f"no artifact {artifacts.CALIBRATION_MARKDOWN}", run_id=run_id)
        return "", run_id
    return text, run_id


def _stale_files(out_dir: Path) -> list[Path]:
    names = [artifacts.ANALYSIS_REPORT, artifacts.ANALYSIS_RUNS, artifacts.ANALYSIS_MISSING,
             artifacts.ANALYSIS_VARIANT_METRICS, artifacts.ANALYSIS_BEST_SETTINGS, ANALYSIS_SWEEP_RUNS,
             ANALYSIS_SWEEP_POINTS]
    names += [f"{spec.stem}{ext}" for spec in (*FIGURES, *ABLATION_FIGURES) for ext in figures.EXTENSIONS]
    return [out_dir / n for n in names if (out_dir / n).exists()]


def _ablation_plots(sweep: AblationTables) -> dict[str, tuple[pd.DataFrame, Callable[[], Figure]]]:
    """Each ablation figure's table and how to draw it."""
    tables_of = sweep.figures
    return {
        ANALYSIS_SWEEP_SCALE: (tables_of[ANALYSIS_SWEEP_SCALE],
                               lambda: ablation_figures.sweep_scale_figure(tables_of[ANALYSIS_SWEEP_SCALE])),
        ANALYSIS_SWEEP_LAYER: (tables_of[ANALYSIS_SWEEP_LAYER],
                               lambda: ablation_figures.sweep_layer_figure(tables_of[ANALYSIS_SWEEP_LAYER])),
        ANALYSIS_SWEEP_MLP_ARMS: (tables_of[ANALYSIS_SWEEP_MLP_ARMS],
                                  lambda: ablation_figures.mlp_arms_figure(tables_of[ANALYSIS_SWEEP_MLP_ARMS])),
        ANALYSIS_SWEEP_SEEDS: (tables_of[ANALYSIS_SWEEP_SEEDS],
                               lambda: ablation_figures.seed_spread_figure(tables_of[ANALYSIS_SWEEP_SEEDS])),
    }


def ablation_markdown(sweep: AblationTables, drawn: list[str]) -> list[str]:
    """The report's section on the sweeps: the tables behind it, then each ablation figure with its table, or why
    it is not drawn.

    Args:
        sweep: the ablation tables.
        drawn: the figures drawn.
    """
    n_runs = sweep.runs["run_id"].nunique()
    names = ", ".join(f"{s} ({m})" for m, s in sweep.references) or "none"
    lines = ["## Sweep ablations", "",
             f"{n_runs} sweep variant run{'' if n_runs == 1 else 's'} (the latest FINISHED per model, sweep, variant "
             f"and knobs) of sweeps {names}: one row per run and metric in "
             f"[{ANALYSIS_SWEEP_RUNS}]({ANALYSIS_SWEEP_RUNS}); averaged over seeds (seed_mean, seed_sd across "
             f"seeds, n_seeds, and the bootstrap interval averaged over seeds) in "
             f"[{ANALYSIS_SWEEP_POINTS}]({ANALYSIS_SWEEP_POINTS}). Each figure holds the knobs it does not vary at "
             "the sweep's reference point:", ""]
    lines += [f"- {m}, sweep {s}: " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v or '–'}"
                                                 for k, v in ref.items()) for (m, s), ref in sweep.references.items()]
    lines += [""]
    for spec in ABLATION_FIGURES:
        lines += [f"### {spec.title}", ""]
        if spec.stem not in drawn:
            lines += [f"Not drawn: {sweep.reasons[spec.stem] or 'it needs ' + spec.needs}.", ""]
            continue
        lines += [f"![{spec.title}]({spec.stem}.png)", "", spec.caption,
                  f"PDF: [{spec.stem}.pdf]({spec.stem}.pdf); table: [{spec.stem}.csv]({spec.stem}.csv).", "",
                  markdown_table(sweep.figures[spec.stem], csv_name=f"{spec.stem}.csv")]
    return lines


def _with_section(markdown: str, section: list[str]) -> str:
    """``markdown`` with ``section`` before its missing list."""
    head, marker, tail = markdown.rpartition("\n## Missing\n")
    text = "\n".join(section)
    return f"{head}\n{text}{marker}{tail}" if marker else f"{markdown}\n{text}"


def analyze(runs: pd.DataFrame, out_dir: str | Path, *, reader: StoreReader | None = None,
            directions: Mapping[str, bool] | None = None, title: str = "",
            min_category_n: int = categories.MIN_CATEGORY_N) -> Analysis:
    """Compute the tables, draw the figures and write the report into ``out_dir``.

    Files of an earlier analysis in ``out_dir`` are replaced, so that a figure not drawn this time
    does not linger.

    Args:
        runs: the run frame (``runs.select_runs``); any number of runs and models.
        out_dir: the folder (created if needed).
        reader: metric histories and artifacts; default the current MLflow store.
        directions: metric -> higher_is_better; default the judge registry's.
        title: the selection in words, for the report's header.
        min_category_n: the fewest questions a category needs to be drawn in the per-category figure.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in _stale_files(out):
        path.unlink()
    reader = reader if reader is not None else MlflowReader()
    directions = directions if directions is not None else registered_directions()
    missing = Missing()
    found = frame_tables(runs, missing, directions, reader.run_tags)
    if found.variants.empty:
        missing.add("no evaluate.variant runs selected: no variant metrics, models compared, judge agreement "
                    "or per-category figure")
    agreement = agreement_table(_generations(found, reader, missing), missing, found.models)
    per_category = categories.category_delta_table(_categories(found, reader, missing), found.chosen,
                                                   found.metric or "", missing, found.models, min_n=min_category_n)
    curves = tables.training_curves_table(found.trained, reader.metric_history, missing)
    calibration = _calibration(runs, reader, missing)
    sweep = ablation_tables(runs, missing)
    context = found.context
    plotted: dict[str, tuple[pd.DataFrame, Callable[[], Figure]]] = {
        artifacts.ANALYSIS_SCALE_SWEEP: (found.scale_sweep, lambda: sweep_figures.scale_sweep_figure(
            found.scale_sweep, found.models, context)),
        artifacts.ANALYSIS_RELATIVE_SCALE: (found.relative_scale, lambda: sweep_figures.relative_scale_figure(
            found.relative_scale, found.models, context)),
        artifacts.ANALYSIS_LAYER_SCALE: (found.layer_scale, lambda: sweep_figures.layer_scale_figure(
            found.layer_scale, found.models, context)),
        artifacts.ANALYSIS_CROSS_MODEL: (found.cross_model, lambda: figures.cross_model_figure(found.cross_model, context)),
        artifacts.ANALYSIS_JUDGE_AGREEMENT: (agreement, lambda: figures.judge_agreement_figure(
            agreement, found.models, context)),
        artifacts.ANALYSIS_CATEGORY_DELTA: (per_category, lambda: figures.category_delta_figure(
            per_category, found.models, context)),
        artifacts.ANALYSIS_PARETO: (found.pareto, lambda: sweep_figures.pareto_figure(found.pareto, found.models, context)),
        artifacts.ANALYSIS_TRAINING_CURVES: (curves, lambda: figures.training_curves_figure(curves, found.models, context)),
    }
    files: list[Path] = []
    drawn: list[str] = []
    for spec in FIGURES:
        table, draw = plotted[spec.stem]
        if table.empty:
            missing.add(f"figure {spec.stem} not drawn: it needs {spec.needs}")
            continue
        files += figures.save_figure(draw(), table, out, spec.stem)
        drawn.append(spec.stem)
    ablations = _ablation_plots(sweep)
    for spec in ABLATION_FIGURES:
        table, draw = ablations[spec.stem]
        if table.empty:
            missing.add(f"figure {spec.stem} not drawn: {sweep.reasons[spec.stem]}")
            continue
        files += figures.save_figure(draw(), table, out, spec.stem)
        drawn.append(spec.stem)
    named = {artifacts.ANALYSIS_VARIANT_METRICS: found.variant_metrics,
             artifacts.ANALYSIS_BEST_SETTINGS: found.best_settings, artifacts.ANALYSIS_RUNS: run_listing(runs),
             ANALYSIS_SWEEP_RUNS: sweep.runs, ANALYSIS_SWEEP_POINTS: sweep.points}
    for name, table in named.items():
        table.to_csv(out / name, index=False)
        files.append(out / name)
    report_path = out / artifacts.ANALYSIS_REPORT
    missing_frame = missing.frame()
    missing_frame.to_csv(out / artifacts.ANALYSIS_MISSING, index=False)
    files.append(out / artifacts.ANALYSIS_MISSING)
    all_tables = {**{stem: table for stem, (table, _) in plotted.items()}, **sweep.figures, **named,
                  artifacts.ANALYSIS_MISSING: missing_frame}
    markdown = _with_section(report_markdown(runs, found, all_tables, drawn, missing_frame, title, calibration),
                             ablation_markdown(sweep, drawn))
    report_path.write_text(markdown, encoding="utf-8")
    (out / HTML_REPORT).write_text(render(markdown, out, title or "truthsteer analysis"), encoding="utf-8")
    files += [report_path, out / HTML_REPORT]
    return Analysis(out_dir=out, report=report_path, files=files, tables=all_tables, drawn=drawn,
                    missing=missing_frame, metric=found.metric)


def run(runs: pd.DataFrame, out_dir: str | Path, *, reader: StoreReader | None = None,
        directions: Mapping[str, bool] | None = None, title: str = "",
        min_category_n: int = categories.MIN_CATEGORY_N) -> Analysis:
    """``analyze``, then log every file it wrote under ``analysis/`` of the active run, with metrics
    ``n_runs``, ``n_models``, ``n_figures`` and ``n_missing``.

    Args:
        runs: the run frame.
        out_dir: the folder.
        reader: metric histories and artifacts; default the current MLflow store.
        directions: metric -> higher_is_better; default the judge registry's.
        title: the selection in words.
        min_category_n: the fewest questions a category needs to be drawn.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("report.run needs an active MLflow run: call it inside `with analysis_run(selection):`")
    result = analyze(runs, out_dir, reader=reader, directions=directions, title=title,
                     min_category_n=min_category_n)
    for path in result.files:
        mlflow.log_artifact(str(path), artifacts.ANALYSIS_DIR)
    mlflow.log_metrics({"n_runs": float(len(runs)), "n_models": float(len(set(model_of(runs).dropna()))),
                        "n_figures": float(len(result.drawn)), "n_missing": float(len(result.missing))})
    mlflow.set_tag(TAG_MODELS, "|".join(sorted(set(model_of(runs).dropna()))))
    return result


@contextmanager
def analysis_run(selection: Selection, run_name: str = "analyze") -> Iterator[Any]:
    """Start (or join, under ``mlflow run``) the analysis run: stage ``analyze``, the selection as
    params ``selection.experiment``, ``selection.models``, ``selection.tags``, ``selection.parent_run``.

    The run goes to the analyzed experiment (the parent run's with ``--parent-run``) and ends
    FINISHED, FAILED on an exception or KILLED on Ctrl-C, like every stage run.

    Args:
        selection: what is analyzed.
        run_name: the run's name.
    """
    experiment_id = mlflow.get_run(selection.parent_run).info.experiment_id if selection.parent_run else ""
    with tracked_run(ANALYZE_STAGE, run_name=run_name, experiment=selection.experiment,
                     experiment_id=experiment_id) as active:
        # Prefixed: `mlflow run` logs the MLproject parameters (experiment, models, ...) under their own names.
        log_params_once({"selection.experiment": selection.experiment, "selection.models": "|".join(selection.models),
                         "selection.tags": ",".join(f"{k}={v}" for k, v in selection.tags),
                         "selection.parent_run": selection.parent_run})
        yield active


# ---------------------------------------------------------------- the dry run


def plan(runs: pd.DataFrame, selection: Selection, *, reader: StoreReader | None = None,
         directions: Mapping[str, bool] | None = None) -> list[str]:
    """What ``analyze`` would do, from the run frame alone: the runs, and each figure it would draw or skip.

    Args:
        runs: the run frame.
        selection: the selection, for the header.
        reader: for the tags of tune studies outside the selection; default the current store.
        directions: metric -> higher_is_better; default the judge registry's.
    """
    reader = reader if reader is not None else MlflowReader()
    missing = Missing()
    found = frame_tables(runs, missing, directions if directions is not None else registered_directions(),
                         reader.run_tags)
    stages = tag(runs, TAG_STAGE).fillna("(none)").value_counts().sort_index()
    listing = run_listing(runs).fillna("")
    lines = [f"selection: {selection.describe()}",
             f"{len(runs)} runs ({', '.join(f'{n} {s}' for s, n in stages.items())}); models: "
             f"{', '.join(found.models) or 'none'}",
             f"truthfulness metric: {found.metric or 'none (no judge metric with an interval)'}", "runs:"]
    lines += ["  " + "  ".join(f"{str(v):<{w}}" for v, w in zip(row, (32, 16, 20, 8, 32), strict=False)).rstrip()
              for row in listing[["run_id", "stage", "model", "variant", "run_name"]].itertuples(index=False)]
    with_generations = [e for e in found.evaluations.values() if e and reader.has_artifact(e, artifacts.GENERATIONS)]
    with_categories = [m for m in found.chosen if found.evaluations.get(m)
                       and reader.has_artifact(found.evaluations[m], artifacts.PER_CATEGORY)]
    available = {
        artifacts.ANALYSIS_SCALE_SWEEP: (len(found.scale_sweep), "rows"),
        artifacts.ANALYSIS_RELATIVE_SCALE: (len(found.relative_scale), "points with a relative scale"),
        artifacts.ANALYSIS_LAYER_SCALE: (len(found.layer_scale), "cells"),
        artifacts.ANALYSIS_CROSS_MODEL: (len(found.cross_model), "bars"),
        artifacts.ANALYSIS_JUDGE_AGREEMENT: (len(with_generations), f"evaluations' {artifacts.GENERATIONS}"),
        artifacts.ANALYSIS_CATEGORY_DELTA: (len(with_categories), f"evaluations' {artifacts.PER_CATEGORY}"),
        artifacts.ANALYSIS_PARETO: (len(found.pareto), "trials with a cost"),
        artifacts.ANALYSIS_TRAINING_CURVES: (len(found.trained), "train runs' loss histories"),
    }
    lines.append("figures (each as .png, .pdf and the .csv it plots), and report.md:")
    for spec in FIGURES:
        count, what = available[spec.stem]
        lines.append(f"  {spec.stem}: " + (f"would draw from {count} {what}" if count else
                                           f"would skip: it needs {spec.needs}"))
    sweep = ablation_tables(runs, missing)
    for spec in ABLATION_FIGURES:
        count = len(sweep.figures[spec.stem])
        lines.append(f"  {spec.stem}: " + (f"would draw from {count} rows" if count else
                                           f"would skip: {sweep.reasons[spec.stem]}"))
    if len(missing):
        lines.append(f"missing so far: {len(missing)} items (listed in the report)")
    return lines


__all__ = ['ANALYZE_STAGE', 'Analysis', 'ablation_markdown', 'analysis_run', 'analyze', 'plan', 'run']
