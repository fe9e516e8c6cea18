"""The ``analyze`` stage: figures, tables and ``report.md`` from any set of runs in the tracking store.

``analyze(runs, out_dir)`` computes every table of ``analysis.tables`` from a run frame, reading
metric histories and artifacts through a ``StoreReader``, draws the figures of ``FIGURES`` from
them and writes, into ``out_dir``:

- per figure ``<stem>.png`` (300 dpi), ``<stem>.pdf`` and ``<stem>.csv`` (the table it plots);
- ``variant_metrics.csv`` and ``best_settings.csv``, the report's other tables;
- ``runs.csv`` (the selected runs) and ``missing.csv`` (what was looked for and not found);
- ``report.md``, which embeds the figures and the tables behind them by relative links.

A figure whose table is empty is not drawn, and says why in the missing list; nothing that is
missing from a run raises. ``run`` does the same and logs every file under ``analysis/`` of the
active run; ``analysis_run`` starts that run (stage ``analyze``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import mlflow
import pandas as pd
from matplotlib.figure import Figure

from analysis import figures, tables
from analysis.runs import Missing, Selection, model_of, model_sizes, of_stage, order_models, run_listing, tag
from core import artifacts
from core.artifacts import ANALYZE_STAGE, TAG_MODELS, TAG_STAGE
from core.tracking import code_version, log_params_once, tracked_run

MAX_REPORT_ROWS = 60  # longer tables are cut in report.md (the CSV beside it has every row)


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    """One figure of the report.

    Args:
        stem: file name without extension (an ``artifacts.ANALYSIS_*`` constant).
        title: the report's heading for it.
        caption: what it shows.
        needs: why it can be empty (said in the missing list when it is).
    """

    stem: str
    title: str
    caption: str
    needs: str


FIGURES = (
    FigureSpec(artifacts.ANALYSIS_SCALE_SWEEP, "Truthfulness against steering scale",
               "Per model: each steered variant's metric against the steering scale at one layer (evaluate "
               "runs: solid; tune trials at the best layer: dotted), with its interval as a band; the "
               "baseline dashed.",
               "evaluate runs of one variant at two or more scales of a layer, or tune trials"),
    FigureSpec(artifacts.ANALYSIS_LAYER_SCALE, "Tuning objective over layer and scale",
               "Per tune study: the mean objective of the trials at each layer and scale (blank: not tried).",
               "tune studies with trials"),
    FigureSpec(artifacts.ANALYSIS_CROSS_MODEL, "Models compared",
               "Per model (smallest first): each variant's truthfulness (and informativeness) in the model's "
               "latest evaluation, with intervals as error bars.",
               "evaluate.variant runs with judge metrics"),
    FigureSpec(artifacts.ANALYSIS_JUDGE_AGREEMENT, "LLM judge against semantic judge",
               "Per model and variant: counts of the LLM judge's truthfulness verdict (rows) against the "
               "semantic judge's (columns) over the same answers, with Cohen's kappa.",
               f"an evaluation's {artifacts.GENERATIONS} with LLM and semantic verdicts"),
    FigureSpec(artifacts.ANALYSIS_CATEGORY_DELTA, "Change per category, best variant",
               "Per model: the change of its best steered variant against baseline in each TruthfulQA category.",
               f"an evaluation with a baseline, a steered variant and {artifacts.PER_CATEGORY}"),
    FigureSpec(artifacts.ANALYSIS_TRAINING_CURVES, "MLP training curves",
               "Per model: train (solid) and val (dashed) loss per step of each branch's latest train run.",
               "train runs (mc or gen) with train_loss and val_loss histories"),
)


class StoreReader(Protocol):
    """What the analysis reads besides the run frame (a fake in tests, ``MlflowReader`` otherwise)."""

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``[(step, value), ...]`` of a metric; empty when it was never logged."""
        ...

    def artifact_text(self, run_id: str, path: str) -> str | None:
        """An artifact's text; None when the run has no such artifact."""
        ...

    def run_tags(self, run_id: str) -> dict[str, str]:
        """A run's tags; empty when the run is not there."""
        ...

    def has_artifact(self, run_id: str, path: str) -> bool:
        """Whether a run has an artifact, without downloading it."""
        ...


class MlflowReader:
    """``StoreReader`` over the current MLflow tracking store."""

    def __init__(self, client: mlflow.MlflowClient | None = None) -> None:
        self.client = client or mlflow.MlflowClient()

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``[(step, value), ...]`` of a metric; empty when it was never logged.

        Args:
            run_id: the run.
            key: the metric name.
        """
        try:
            return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]
        except mlflow.exceptions.MlflowException:
            return []

    def artifact_text(self, run_id: str, path: str) -> str | None:
        """An artifact's text; None when the run has no such artifact.

        Args:
            run_id: the run.
            path: the artifact path, e.g. ``evaluate/generations.jsonl``.
        """
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
                return Path(local).read_text(encoding="utf-8")
            except (mlflow.exceptions.MlflowException, OSError):
                return None

    def run_tags(self, run_id: str) -> dict[str, str]:
        """A run's tags; empty when the run is not there.

        Args:
            run_id: the run.
        """
        try:
            return dict(self.client.get_run(run_id).data.tags)
        except mlflow.exceptions.MlflowException:
            return {}

    def has_artifact(self, run_id: str, path: str) -> bool:
        """Whether a run has an artifact (one listing of its folder, no download).

        Args:
            run_id: the run.
            path: the artifact path.
        """
        folder = str(Path(path).parent) if "/" in path else None
        try:
            return any(f.path == path for f in self.client.list_artifacts(run_id, folder))
        except (mlflow.exceptions.MlflowException, OSError):
            return False


@functools.cache
def registered_directions() -> dict[str, bool]:
    """Every registered judge metric -> higher_is_better (imports the judge registry once)."""
    from evaluation.judges import metric_directions

    return metric_directions()


@dataclasses.dataclass(frozen=True)
class FrameTables:
    """The tables computed from the run frame alone (no artifacts, no histories).

    Args:
        models: every model of the frame, smallest first.
        sizes: model -> billions of parameters.
        metric: the truthfulness metric of the figures (None: no judge metric anywhere).
        metric_names: the judge metrics of the variant runs.
        evaluations: model -> its latest evaluation run.
        variants: ``tables.variant_runs``.
        trials: ``tables.tune_trials``.
        variant_metrics: ``tables.variant_metrics_table``.
        best_variants: model -> its best steered variant.
        cross_model: ``tables.cross_model_table``.
        scale_sweep: ``tables.scale_sweep_table``.
        layer_scale: ``tables.layer_scale_table``.
        best_settings: ``tables.best_settings_table``.
        trained: ``tables.train_runs``.
    """

    models: list[str]
    sizes: dict[str, float]
    metric: str | None
    metric_names: list[str]
    evaluations: dict[str, str]
    variants: pd.DataFrame
    trials: pd.DataFrame
    variant_metrics: pd.DataFrame
    best_variants: dict[str, str]
    cross_model: pd.DataFrame
    scale_sweep: pd.DataFrame
    layer_scale: pd.DataFrame
    best_settings: pd.DataFrame
    trained: pd.DataFrame


def frame_tables(runs: pd.DataFrame, missing: Missing, directions: Mapping[str, bool],
                 study_tags: Callable[[str], Mapping[str, str]] | None = None) -> FrameTables:
    """Every table that needs only the run frame.

    Args:
        runs: the run frame (``runs.select_runs``).
        missing: collects what is missing.
        directions: metric -> higher_is_better.
        study_tags: the tags of a tune study that is not in ``runs``.
    """
    sizes = model_sizes(runs, missing)
    models = order_models(model_of(runs).dropna(), sizes)
    trials = tables.tune_trials(runs, missing, directions, study_tags)
    variants = tables.variant_runs(runs, exclude_parents=set(trials["run_id"]))
    names = tables.judge_metric_names(variants)
    metric = tables.primary_metric(names)
    evaluations = tables.latest_evaluations(variants)
    vtable = tables.variant_metrics_table(variants, evaluations, names, missing, models)
    best = tables.best_variants(vtable, metric, tables.higher_is_better(metric, directions)) if metric else {}
    shown = [m for m in (metric, tables.INFORMATIVE_METRIC) if m in names]
    return FrameTables(
        models=models, sizes=sizes, metric=metric, metric_names=names, evaluations=evaluations, variants=variants,
        trials=trials, variant_metrics=vtable, best_variants=best,
        cross_model=tables.cross_model_table(vtable, list(dict.fromkeys(shown)), sizes),
        scale_sweep=tables.scale_sweep_table(variants, trials, evaluations, metric),
        layer_scale=tables.layer_scale_table(trials),
        best_settings=tables.best_settings_table(variants, trials, metric, directions, sizes),
        trained=tables.train_runs(runs, missing),
    )


def read_jsonl(text: str) -> list[dict[str, Any]]:
    """The rows of a JSONL text (blank lines skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _generations(found: FrameTables, reader: StoreReader, missing: Missing) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for model, evaluation in found.evaluations.items():
        text = reader.artifact_text(evaluation, artifacts.GENERATIONS) if evaluation else None
        if text is None:
            missing.add(f"no artifact {artifacts.GENERATIONS}: no judge agreement", model=model, run_id=evaluation)
            continue
        out[model] = read_jsonl(text)
    return out


def _categories(found: FrameTables, reader: StoreReader, missing: Missing) -> dict[str, pd.DataFrame]:
    """Per model its evaluation's per-category table, else the best variant run's own."""
    out: dict[str, pd.DataFrame] = {}
    for model, variant in found.best_variants.items():
        rows = found.variant_metrics[(found.variant_metrics["model"] == model)
                                     & (found.variant_metrics["variant"] == variant)]
        candidates = [found.evaluations.get(model, ""), *rows["run_id"].head(1)]
        text = next((t for t in (reader.artifact_text(r, artifacts.PER_CATEGORY) for r in candidates if r)
                     if t is not None), None)
        if text is None:
            missing.add(f"no artifact {artifacts.PER_CATEGORY}: no per-category figure", model=model,
                        run_id=found.evaluations.get(model, ""))
            continue
        out[model] = pd.read_csv(io.StringIO(text))
    return out


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
             artifacts.ANALYSIS_VARIANT_METRICS, artifacts.ANALYSIS_BEST_SETTINGS]
    names += [f"{spec.stem}{ext}" for spec in FIGURES for ext in figures.EXTENSIONS]
    return [out_dir / n for n in names if (out_dir / n).exists()]


def analyze(runs: pd.DataFrame, out_dir: str | Path, *, reader: StoreReader | None = None,
            directions: Mapping[str, bool] | None = None, title: str = "") -> Analysis:
    """Compute the tables, draw the figures and write the report into ``out_dir``.

    Files of an earlier analysis in ``out_dir`` are replaced, so that a figure not drawn this time
    does not linger.

    Args:
        runs: the run frame (``runs.select_runs``); any number of runs and models.
        out_dir: the folder (created if needed).
        reader: metric histories and artifacts; default the current MLflow store.
        directions: metric -> higher_is_better; default the judge registry's.
        title: the selection in words, for the report's header.
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
    agreement = tables.agreement_table(_generations(found, reader, missing), missing, found.models)
    categories = tables.category_delta_table(_categories(found, reader, missing), found.best_variants,
                                             found.metric or "", missing, found.models)
    curves = tables.training_curves_table(found.trained, reader.metric_history, missing)
    calibration = _calibration(runs, reader, missing)
    plotted: dict[str, tuple[pd.DataFrame, Callable[[], Figure]]] = {
        artifacts.ANALYSIS_SCALE_SWEEP: (found.scale_sweep, lambda: figures.scale_sweep_figure(
            found.scale_sweep, found.models)),
        artifacts.ANALYSIS_LAYER_SCALE: (found.layer_scale, lambda: figures.layer_scale_figure(
            found.layer_scale, found.models)),
        artifacts.ANALYSIS_CROSS_MODEL: (found.cross_model, lambda: figures.cross_model_figure(found.cross_model)),
        artifacts.ANALYSIS_JUDGE_AGREEMENT: (agreement, lambda: figures.judge_agreement_figure(
            agreement, found.models)),
        artifacts.ANALYSIS_CATEGORY_DELTA: (categories, lambda: figures.category_delta_figure(
            categories, found.models)),
        artifacts.ANALYSIS_TRAINING_CURVES: (curves, lambda: figures.training_curves_figure(curves, found.models)),
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
    named = {artifacts.ANALYSIS_VARIANT_METRICS: found.variant_metrics,
             artifacts.ANALYSIS_BEST_SETTINGS: found.best_settings, artifacts.ANALYSIS_RUNS: run_listing(runs)}
    for name, table in named.items():
        table.to_csv(out / name, index=False)
        files.append(out / name)
    report_path = out / artifacts.ANALYSIS_REPORT
    missing_frame = missing.frame()
    missing_frame.to_csv(out / artifacts.ANALYSIS_MISSING, index=False)
    files.append(out / artifacts.ANALYSIS_MISSING)
    all_tables = {**{stem: table for stem, (table, _) in plotted.items()}, **named,
                  artifacts.ANALYSIS_MISSING: missing_frame}
    report_path.write_text(report_markdown(runs, found, all_tables, drawn, missing_frame, title, calibration),
                           encoding="utf-8")
    files.append(report_path)
    return Analysis(out_dir=out, report=report_path, files=files, tables=all_tables, drawn=drawn,
                    missing=missing_frame, metric=found.metric)


def run(runs: pd.DataFrame, out_dir: str | Path, *, reader: StoreReader | None = None,
        directions: Mapping[str, bool] | None = None, title: str = "") -> Analysis:
    """``analyze``, then log every file it wrote under ``analysis/`` of the active run, with metrics
    ``n_runs``, ``n_models``, ``n_figures`` and ``n_missing``.

    Args:
        runs: the run frame.
        out_dir: the folder.
        reader: metric histories and artifacts; default the current MLflow store.
        directions: metric -> higher_is_better; default the judge registry's.
        title: the selection in words.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("report.run needs an active MLflow run: call it inside `with analysis_run(selection):`")
    result = analyze(runs, out_dir, reader=reader, directions=directions, title=title)
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
    with_categories = [m for m in found.best_variants if found.evaluations.get(m)
                       and reader.has_artifact(found.evaluations[m], artifacts.PER_CATEGORY)]
    available = {
        artifacts.ANALYSIS_SCALE_SWEEP: (len(found.scale_sweep), "rows"),
        artifacts.ANALYSIS_LAYER_SCALE: (len(found.layer_scale), "cells"),
        artifacts.ANALYSIS_CROSS_MODEL: (len(found.cross_model), "bars"),
        artifacts.ANALYSIS_JUDGE_AGREEMENT: (len(with_generations), f"evaluations' {artifacts.GENERATIONS}"),
        artifacts.ANALYSIS_CATEGORY_DELTA: (len(with_categories), f"evaluations' {artifacts.PER_CATEGORY}"),
        artifacts.ANALYSIS_TRAINING_CURVES: (len(found.trained), "train runs' loss histories"),
    }
    lines.append("figures (each as .png, .pdf and the .csv it plots), and report.md:")
    for spec in FIGURES:
        count, what = available[spec.stem]
        lines.append(f"  {spec.stem}: " + (f"would draw from {count} {what}" if count else
                                           f"would skip: it needs {spec.needs}"))
    if len(missing):
        lines.append(f"missing so far: {len(missing)} items (listed in the report)")
    return lines


# ---------------------------------------------------------------- report.md


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


__all__ = ['ANALYZE_STAGE', 'Analysis', 'FIGURES', 'FigureSpec', 'FrameTables', 'MlflowReader', 'StoreReader', 'analysis_run', 'analyze', 'frame_tables', 'markdown_table', 'plan', 'read_jsonl', 'report_markdown', 'run']
