"""What the analysis reads from the tracking store: the figures it draws (``FIGURES``), a reader of run
artifacts and metric histories (``MlflowReader``, or any ``StoreReader``), and every table built from the
selected runs (``frame_tables``), with what was missing recorded."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import mlflow
import pandas as pd

from analysis import categories, sweeps, tables
from analysis.context import Context, build
from analysis.runs import Missing, model_of, model_sizes, order_models
from core import artifacts


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
               "baseline dashed; where measured, what each point costs (kl_neutral, right axis, dashed squares).",
               "evaluate runs of one variant at two or more scales of a layer, or tune trials"),
    FigureSpec(artifacts.ANALYSIS_RELATIVE_SCALE, "Truthfulness against relative steering scale, across models",
               "Per steered variant: each model's metric against the relative scale (the added vector's norm as a "
               "fraction of the steering layer's mean residual norm, which transfers across model sizes), one line "
               "per model (evaluate runs: solid; tune trials: dotted), with its interval as a band.",
               "evaluate runs or tune trials that logged steering_scale_relative (extractions with residual norms)"),
    FigureSpec(artifacts.ANALYSIS_LAYER_SCALE, "Tuning objective over layer and scale",
               "Per tune study: the mean objective of the trials at each layer and scale (blank: not tried).",
               "tune studies with trials"),
    FigureSpec(artifacts.ANALYSIS_CROSS_MODEL, "Models compared",
               "Per model (smallest first): each variant's truthfulness (and informativeness) in the model's "
               "latest evaluation, with intervals as error bars.",
               "evaluate.variant runs with judge metrics"),
    FigureSpec(artifacts.ANALYSIS_JUDGE_AGREEMENT, "Two judges on the same answers",
               "Per model and variant: counts of the first judge's truthfulness verdict (the trained judge, else the "
               "LLM judge; rows) against the semantic judge's (columns) over the same answers, shaded by share of "
               "answers on one scale for all panels, with Cohen's kappa and its bootstrap interval.",
               f"an evaluation's {artifacts.GENERATIONS} with trained or LLM and semantic verdicts"),
    FigureSpec(artifacts.ANALYSIS_CATEGORY_DELTA, "Change per category",
               "Per model: the change of its steered variant (the best on the val split; every steered variant "
               "where no val evaluation chose one) against baseline in each TruthfulQA category with enough "
               "questions, with paired bootstrap intervals.",
               f"an evaluation with a baseline, a steered variant and {artifacts.PER_CATEGORY}"),
    FigureSpec(artifacts.ANALYSIS_PARETO, "What tuning buys against what steering costs",
               "Per tune study with a measured cost (a constraint or two directions): each trial's objective "
               "against its cost of steering on neutral text (kl_neutral), the Pareto front joined, the chosen "
               "(best feasible, or best on the front) trial starred.",
               "tune studies run with --constraint or --directions"),
    FigureSpec(artifacts.ANALYSIS_TRAINING_CURVES, "MLP training curves",
               "Per model and branch (each on its own axis: the MC hinge loss and the generation NLL are not comparable): "
               "the train loss of each step's batch (solid), the val loss over the whole val set (dashed) and the "
               "whole train set's loss after training (diamond), from the latest train run.",
               "train runs (mc or gen) with train_loss and val_loss histories"),
)
# A sweep's figures (analysis.ablations draws their tables, analysis.ablation_figures the figures)
ABLATION_FIGURES = (
    FigureSpec(artifacts.ANALYSIS_SWEEP_SCALE, "Sweep: truthfulness against steering scale",
               "Per model, sweep and metric: each steered variant against the steering scale, the other knobs at the "
               "sweep's reference point (MLP arms at the reference layer and width, CAA at the reference layer); "
               "points are means over seeds, error bars the per-question bootstrap interval averaged over seeds, "
               "the band ± the standard deviation across seeds where there are several; variants without a scale "
               "(baseline dashed, ITI dotted) as levels with their interval.",
               "a sweep that varied scale at its reference point"),
    FigureSpec(artifacts.ANALYSIS_SWEEP_LAYER, "Sweep: truthfulness against steering layer",
               "Per model, sweep and metric: each steered variant against the steering layer at the reference "
               "scale and MLP width; error bars, bands and levels as in the scale figure.",
               "a sweep that varied layer at its reference point"),
    FigureSpec(artifacts.ANALYSIS_SWEEP_MLP_ARMS, "Sweep: MLP width and branch",
               "Per model, sweep and metric: the MLP arms at the reference scale and layer, grouped by width "
               "(expansion), one bar per branch (mc, gen, joint), means over seeds with the bootstrap interval "
               "averaged over seeds; baseline, CAA (and ITI) as levels.",
               "a sweep that varied mlp_expansion or branch at its reference point"),
    FigureSpec(artifacts.ANALYSIS_SWEEP_SEEDS, "Sweep: spread over seeds",
               "Per model, sweep and metric, at the reference point: each variant's runs, one dot per seed, their "
               "mean ± the standard deviation across seeds (black), and beside it the per-question bootstrap "
               "interval averaged over seeds (coloured).",
               "a sweep with two or more seeds at its reference point"),
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
        trials: ``sweeps.tune_trials``.
        variant_metrics: ``tables.variant_metrics_table``.
        chosen: model -> the steered variants its per-category figure shows and how they were chosen
            (``categories.chosen_variants``).
        cross_model: ``tables.cross_model_table``.
        scale_sweep: ``sweeps.scale_sweep_table``.
        relative_scale: ``sweeps.relative_scale_table``.
        layer_scale: ``sweeps.layer_scale_table``.
        best_settings: ``sweeps.best_settings_table``.
        pareto: ``sweeps.pareto_table``.
        trained: ``tables.train_runs``.
        context: what the figures' titles say per model (split, n, judge agreement).
    """

    models: list[str]
    sizes: dict[str, float]
    metric: str | None
    metric_names: list[str]
    evaluations: dict[str, str]
    variants: pd.DataFrame
    trials: pd.DataFrame
    variant_metrics: pd.DataFrame
    chosen: dict[str, tuple[list[str], str]]
    cross_model: pd.DataFrame
    scale_sweep: pd.DataFrame
    relative_scale: pd.DataFrame
    layer_scale: pd.DataFrame
    best_settings: pd.DataFrame
    pareto: pd.DataFrame
    trained: pd.DataFrame
    context: Context


def _n_layers(runs: pd.DataFrame) -> dict[str, int]:
    """model -> its decoder layers, from the runs' ``model.n_layers`` param."""
    if "params.model.n_layers" not in runs:
        return {}
    known = pd.DataFrame({"model": model_of(runs), "n": pd.to_numeric(runs["params.model.n_layers"], errors="coerce")})
    return {str(m): int(n) for m, n in known.dropna().groupby("model")["n"].max().items()}


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
    trials = sweeps.tune_trials(runs, missing, directions, study_tags)
    variants = tables.variant_runs(runs, exclude_parents=set(trials["run_id"]))
    names = tables.judge_metric_names(variants)
    metric = tables.primary_metric(names)
    evaluations = tables.latest_evaluations(variants)
    vtable = tables.variant_metrics_table(variants, evaluations, names, missing, models)
    chosen = categories.chosen_variants(variants, evaluations, metric, tables.higher_is_better(metric, directions),
                                        missing) if metric else {}
    informative = next((m for m in tables.INFORMATIVE_METRICS if m in names), None)
    shown = [m for m in (metric, informative, "kl_neutral") if m and m in names]
    reported_runs = tables.reported(variants)  # val evaluations choose; their points are not plotted beside test ones
    sweep = sweeps.scale_sweep_table(reported_runs, trials, evaluations, metric)
    return FrameTables(
        models=models, sizes=sizes, metric=metric, metric_names=names, evaluations=evaluations, variants=variants,
        trials=trials, variant_metrics=vtable, chosen=chosen,
        cross_model=tables.cross_model_table(vtable, list(dict.fromkeys(shown)), sizes),
        scale_sweep=sweep,
        relative_scale=sweeps.relative_scale_table(sweep, _n_layers(runs)),
        layer_scale=sweeps.layer_scale_table(trials),
        best_settings=sweeps.best_settings_table(reported_runs, trials, metric, directions, sizes),
        pareto=sweeps.pareto_table(trials),
        trained=tables.train_runs(runs, missing),
        context=build(runs, variants, evaluations),
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
    """Per model its evaluation's per-category table, else its first chosen variant run's own."""
    out: dict[str, pd.DataFrame] = {}
    for model, (variants, _) in found.chosen.items():
        rows = found.variant_metrics[(found.variant_metrics["model"] == model)
                                     & (found.variant_metrics["variant"].isin(variants))]
        candidates = [found.evaluations.get(model, ""), *rows["run_id"].head(1)]
        text = next((t for t in (reader.artifact_text(r, artifacts.PER_CATEGORY) for r in candidates if r)
                     if t is not None), None)
        if text is None:
            missing.add(f"no artifact {artifacts.PER_CATEGORY}: no per-category figure", model=model,
                        run_id=found.evaluations.get(model, ""))
            continue
        out[model] = pd.read_csv(io.StringIO(text))
    return out


__all__ = ['FIGURES', 'FigureSpec', 'FrameTables', 'MlflowReader', 'StoreReader', 'frame_tables', 'read_jsonl', 'registered_directions']
