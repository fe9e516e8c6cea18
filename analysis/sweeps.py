"""The analysis tables of settings: tune trials by study (CAA's layer and scale, ITI's k and alpha), the layer x
scale heatmap, the scale sweep over evaluations and trials, and the best setting per model."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.runs import Missing, as_float, of_stage, order_models, tag
from analysis.tables import (
    _empty,
    _get,
    _latest,
    higher_is_better,
)
from core.artifacts import (
    TAG_BEST_RUN,
    TAG_CONSTRAINT,
    TAG_COST,
    TAG_MODEL,
    TAG_OBJECTIVE_DIRECTION,
    TAG_OBJECTIVE_METRIC,
    TAG_PARENT,
    TAG_STAGE,
    TAG_STUDY,
    TAG_VARIANT,
    TRIAL_METRIC,
    TRIAL_STAGE,
    TUNE_STAGE,
)
from evaluation.side_effects import NEUTRAL_COSTS
from steering.methods import method, method_of_params, tuned_params
from steering.scale import RELATIVE_SCALE_METRIC as RELATIVE_METRIC
from steering.scale import SCALE_METRIC

COSTS = NEUTRAL_COSTS  # a trial's measured cost of steering (evaluation.side_effects)

PARAMS = tuned_params()  # every tunable method's axes: layer, scale (caa), k, alpha (iti)

MAX_SCALE_COLUMNS = 12  # more distinct tuned scales than this are binned for the heatmap


SCALE_BINS = 10


SWEEP_COLUMNS = ["model", "source", "variant", "layer", "scale", "metric", "value", "ci_low", "ci_high", "run_id",
                 "kl_neutral", "relative_scale"]
RELATIVE_COLUMNS = ["model", "n_layers", "source", "variant", "layer", "depth", "relative_scale", "scale", "metric",
                    "value", "ci_low", "ci_high", "run_id"]


TRIAL_COLUMNS = ["model", "study", "run_id", "variant", *PARAMS, "metric", "value", "ci_low", "ci_high",
                 "higher_is_better", "cost_metric", "cost", "chosen", "start_time", "relative_scale", "multiplier",
                 "bound"]


HEATMAP_COLUMNS = ["model", "study", "metric", "layer", "scale", "value", "n_trials"]


BEST_COLUMNS = ["model", "n_params_b", "source", "run_id", "variant", *PARAMS, "metric", "value", "ci_low", "ci_high"]


def _bound(constraint: str, cost_metric: str) -> float:
    """The bound of a study's constraint (tag ``truthsteer.constraint``, ``kl_neutral<=0.5``) on its cost; NaN without."""
    found = re.fullmatch(r"\s*(\w+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*", constraint)
    return float(found.group(3)) if found and found.group(1) == cost_metric else math.nan


def tune_trials(runs: pd.DataFrame, missing: Missing, directions: Mapping[str, bool],
                study_tags: Callable[[str], Mapping[str, str]] | None = None) -> pd.DataFrame:
    """One row per trial of every tune study: its model, study, setting and objective value.

    A trial is a run with stage ``tune.trial`` or a child of a ``tune`` run (a worker). Its study is
    its tag ``truthsteer.study`` (every worker of a study shares it), else its worker run's id. A CAA
    trial has its method's axes (``steering.methods``; variant ``caa``: a layer and a scale) and NaN for the
    other methods' (an ITI trial, variant ``iti``, has a k and an alpha, ``layer`` and ``scale`` NaN). A trial
    without a variant tag is of the method whose axes its params are.

    Args:
        runs: the run frame.
        missing: records trials without their setting or objective, and studies without usable trials.
        directions: metric -> higher_is_better, for studies that declare no direction.
        study_tags: the tags of a worker run that is not in ``runs`` (None: such workers have none).
    """
    workers = of_stage(runs, TUNE_STAGE)
    tags_of: dict[str, dict[str, str]] = {}
    for worker in workers.to_dict("records"):
        tags_of[str(worker["run_id"])] = {k.removeprefix("tags."): str(v) for k, v in worker.items()
                                          if k.startswith("tags.") and v is not None and not pd.isna(v)}
    parents = tag(runs, TAG_PARENT)
    stages = tag(runs, TAG_STAGE).fillna("")
    trials = runs[(parents.isin(set(tags_of)) | (stages == TRIAL_STAGE)) & (stages != TUNE_STAGE)]
    records = []
    for trial in trials.to_dict("records"):
        worker = _text(trial.get(f"tags.{TAG_PARENT}"))
        if worker not in tags_of:
            tags_of[worker] = dict(study_tags(worker)) if worker and study_tags else {}
        worker_tags = tags_of[worker]
        study = _text(trial.get(f"tags.{TAG_STUDY}")) or worker_tags.get(TAG_STUDY) or worker
        name = worker_tags.get(TAG_OBJECTIVE_METRIC) or TRIAL_METRIC
        direction = worker_tags.get(TAG_OBJECTIVE_DIRECTION, "")
        higher = direction != "minimize" if direction else higher_is_better(name, directions)
        model = _text(trial.get(f"tags.{TAG_MODEL}")) or worker_tags.get(TAG_MODEL, "")
        setting = {p: as_float(trial.get(f"params.{p}")) for p in PARAMS}
        given = method_of_params({p for p, v in setting.items() if not math.isnan(v)})
        variant = (_text(trial.get(f"tags.{TAG_VARIANT}")) or _text(trial.get("tags.variant"))
                   or (given.name if given else "caa"))
        value = as_float(trial.get(f"metrics.{name}"))
        if math.isnan(value):  # MLflowCallback's name for the same value
            value = as_float(trial.get(f"metrics.{TRIAL_METRIC}"))
        measured = [c for c in COSTS if not math.isnan(as_float(trial.get(f"metrics.{c}")))]
        cost_metric = worker_tags.get(TAG_COST, "") or next(iter(measured), "")  # the study's own cost first
        cost_metric = cost_metric if cost_metric in measured else ""
        tuned = method(variant).tune
        needed = [a.name for a in tuned.axes] if tuned else PARAMS
        lacks = [f"param {p}" for p in needed if math.isnan(setting[p])] + ([f"metric {name}"] if math.isnan(value) else [])
        if lacks:
            missing.add(f"tune trial without {', '.join(lacks)} (pruned or failed?): left out", model=model,
                        run_id=str(trial["run_id"]))
            continue
        records.append({
            "model": model, "study": study, "run_id": str(trial["run_id"]),
            "variant": variant, **{p: v if p in needed else math.nan for p, v in setting.items()}, "metric": name,
            "value": value, "ci_low": as_float(trial.get(f"metrics.{name}_ci_low")),
            "ci_high": as_float(trial.get(f"metrics.{name}_ci_high")), "higher_is_better": higher,
            "cost_metric": cost_metric, "cost": as_float(trial.get(f"metrics.{cost_metric}")) if cost_metric else math.nan,
            "chosen": str(trial["run_id"]) == worker_tags.get(TAG_BEST_RUN, ""), "start_time": trial.get("start_time"),
            "relative_scale": as_float(trial.get(f"metrics.{RELATIVE_METRIC}")),
            "multiplier": as_float(trial.get(f"metrics.{SCALE_METRIC}")),
            "bound": _bound(worker_tags.get(TAG_CONSTRAINT, ""), cost_metric),
        })
    usable = {r["study"] for r in records}
    for worker in workers.to_dict("records"):
        worker_id = str(worker["run_id"])
        if (tags_of[worker_id].get(TAG_STUDY) or worker_id) not in usable:
            missing.add("tune run without usable trials: no heatmap for its study",
                        model=tags_of[worker_id].get(TAG_MODEL, ""), run_id=worker_id)
    return pd.DataFrame(records, columns=TRIAL_COLUMNS) if records else _empty(TRIAL_COLUMNS)


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _best_row(frame: pd.DataFrame, higher: bool) -> dict[str, Any]:
    ordered = frame.sort_values(["value", "start_time"], ascending=[not higher, False], kind="stable")
    return dict(ordered.iloc[0].to_dict())


def _bin_scales(scales: pd.Series) -> pd.Series:
    """Scale bin midpoints, for a heatmap of continuously sampled scales."""
    bins = pd.cut(scales, SCALE_BINS)
    return bins.map(lambda b: round(float(b.mid), 4)).astype(float)


def layer_scale_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per study, layer and scale: the mean objective over its trials and how many there were.

    More than ``MAX_SCALE_COLUMNS`` distinct scales in a study are binned into ``SCALE_BINS`` bins,
    each labelled by its midpoint.

    Args:
        trials: ``tune_trials`` output (ITI trials, without a layer, are left out).
    """
    frames = []
    trials = trials[trials["layer"].notna() & trials["scale"].notna()]
    for (model, study), group in trials.groupby(["model", "study"], sort=True):
        scales = group["scale"] if group["scale"].nunique() <= MAX_SCALE_COLUMNS else _bin_scales(group["scale"])
        cells = group.assign(scale=scales).groupby(["layer", "scale"], sort=True)["value"].agg(["mean", "size"])
        cells = cells.reset_index().rename(columns={"mean": "value", "size": "n_trials"})
        cells.insert(0, "metric", group["metric"].iloc[0])
        cells.insert(0, "study", study)
        cells.insert(0, "model", model)
        frames.append(cells)
    if not frames:
        return _empty(HEATMAP_COLUMNS)
    out = pd.concat(frames, ignore_index=True)[HEATMAP_COLUMNS]
    return out.astype({"layer": int, "n_trials": int})


def scale_sweep_table(variants: pd.DataFrame, trials: pd.DataFrame, evaluations: Mapping[str, str],
                      metric_name: str | None) -> pd.DataFrame:
    """The metric against the steering scale, per model and steered variant, with what each point costs
    (``kl_neutral``, NaN where it was not measured).

    From evaluations: each (model, variant) evaluated at two or more scales of one layer (the layer
    with the most scales), the latest run per scale; with it the baseline of the model's chosen
    evaluation (scale NaN: a horizontal reference). From tune studies: the trials at the best
    trial's layer, the latest per scale, with the objective as metric, each at the multiplier it steered with
    (its ``steering_scale`` metric; a relative study's scale param is a share of the residual norm, so its
    trials logged before that metric are left out: the relative-scale table has them).

    Args:
        variants: ``variant_runs`` output.
        trials: ``tune_trials`` output.
        evaluations: model -> chosen evaluation (for the baseline).
        metric_name: the evaluate metric to plot; None skips evaluations.
    """
    records: list[dict[str, Any]] = []
    swept_models = set()
    steered = variants[variants["variant"] != "baseline"] if metric_name else variants.iloc[0:0]
    for (model, variant), group in steered.groupby(["model", "variant"], sort=True):
        counts = group.dropna(subset=["scale"]).groupby("layer")["scale"].nunique()
        if counts.empty or counts.max() < 2:
            continue
        layer = float(counts[counts == counts.max()].index.min())
        at_layer = _latest(group[(group["layer"] == layer) & group["scale"].notna()], ["scale"])
        for row in at_layer.sort_values("scale").to_dict("records"):
            records.append({"model": model, "source": "evaluate", "variant": variant, "layer": layer,
                            "scale": row["scale"], "metric": metric_name, "value": _get(row, str(metric_name)),
                            "ci_low": _get(row, f"{metric_name}_ci_low"),
                            "ci_high": _get(row, f"{metric_name}_ci_high"), "run_id": row["run_id"],
                            "kl_neutral": _get(row, "kl_neutral"), "relative_scale": _get(row, RELATIVE_METRIC)})
        swept_models.add(str(model))
    for model in sorted(swept_models):
        base = variants[(variants["model"] == model) & (variants["variant"] == "baseline")
                        & (variants["evaluation"] == evaluations.get(model, ""))]
        if base.empty:
            continue
        row = _latest(base, ["variant"]).to_dict("records")[0]
        records.append({"model": model, "source": "evaluate", "variant": "baseline", "layer": math.nan,
                        "scale": math.nan, "metric": metric_name, "value": _get(row, str(metric_name)),
                        "ci_low": _get(row, f"{metric_name}_ci_low"), "ci_high": _get(row, f"{metric_name}_ci_high"),
                        "run_id": row["run_id"], "kl_neutral": _get(row, "kl_neutral"), "relative_scale": math.nan})
    caa_trials = trials[trials["layer"].notna() & trials["scale"].notna()]  # ITI trials have no layer to sweep at
    for (model, _study), group in caa_trials.groupby(["model", "study"], sort=True):
        best = _best_row(group, bool(group["higher_is_better"].iloc[0]))
        at_layer = _latest(group[group["layer"] == best["layer"]], ["variant", "scale"])
        for row in at_layer.sort_values(["variant", "scale"]).to_dict("records"):
            # the x axis is the multiplier: a relative study's scale param is a share of the residual norm
            multiplier = _multiplier(row)
            if math.isnan(multiplier):
                continue
            records.append({"model": model, "source": "tune", "variant": row["variant"], "layer": row["layer"],
                            "scale": multiplier, "metric": row["metric"], "value": row["value"],
                            "ci_low": row["ci_low"], "ci_high": row["ci_high"], "run_id": row["run_id"],
                            "kl_neutral": row["cost"] if row.get("cost_metric") == "kl_neutral" else math.nan,
                            "relative_scale": row.get("relative_scale", math.nan)})
    records = [r for r in records if not math.isnan(r["value"])]
    return pd.DataFrame(records, columns=SWEEP_COLUMNS) if records else _empty(SWEEP_COLUMNS)


def _multiplier(trial: Mapping[str, Any]) -> float:
    """The multiplier a tune trial steered with: its ``steering_scale`` metric; for trials logged before it, the
    scale param unless the trial was relative (``relative_scale`` equal to it: then unknown, NaN)."""
    logged = as_float(trial.get("multiplier"))
    if not math.isnan(logged):
        return logged
    scale, relative = as_float(trial.get("scale")), as_float(trial.get("relative_scale"))
    return math.nan if not math.isnan(relative) and math.isclose(relative, scale) else scale


def relative_scale_table(sweep: pd.DataFrame, n_layers: Mapping[str, int]) -> pd.DataFrame:
    """The scale sweep's points whose relative scale is known (``steering_scale_relative``: the added vector's
    norm over the layer's mean residual norm), so models of different sizes share one x axis; a setting
    that appears twice (two studies, a warm start) keeps its later row.

    Args:
        sweep: ``scale_sweep_table`` output.
        n_layers: model -> decoder layers (for the layer's depth fraction; NaN when unknown).
    """
    known = sweep[np.isfinite(sweep["relative_scale"].to_numpy(float))] if not sweep.empty else sweep
    if known.empty:
        return _empty(RELATIVE_COLUMNS)
    out = known.assign(n_layers=[float(n_layers.get(str(m), math.nan)) for m in known["model"]],
                       relative_scale=known["relative_scale"].astype(float).round(9))
    out = out.assign(depth=out["layer"].astype(float) / out["n_layers"])
    # one point per setting: a setting tried again (another study, a warm start) keeps its latest value
    out = out.drop_duplicates(["model", "source", "variant", "layer", "relative_scale"], keep="last")
    return out.sort_values(["variant", "model", "source", "relative_scale"])[RELATIVE_COLUMNS].reset_index(drop=True)


def best_settings_table(variants: pd.DataFrame, trials: pd.DataFrame, metric_name: str | None,
                        directions: Mapping[str, bool], sizes: Mapping[str, float]) -> pd.DataFrame:
    """Per model, the best setting (layer and scale; k and alpha for an ITI study): the best trial of each
    tune study, and the best steered variant run over all its evaluations (by ``metric_name``).

    Args:
        variants: ``variant_runs`` output.
        trials: ``tune_trials`` output.
        metric_name: the evaluate metric to rank variant runs by; None skips evaluations.
        directions: metric -> higher_is_better.
        sizes: model -> billions of parameters (the row order).
    """
    records = []
    for (model, study), group in trials.groupby(["model", "study"], sort=True):
        best = _best_row(group, bool(group["higher_is_better"].iloc[0]))
        records.append({"model": model, "source": f"tune {study}", "run_id": best["run_id"],
                        "variant": best["variant"], **{p: best[p] for p in PARAMS}, "metric": best["metric"],
                        "value": best["value"], "ci_low": best["ci_low"], "ci_high": best["ci_high"]})
    if metric_name and f"metrics.{metric_name}" in variants:
        steered = variants[(variants["variant"] != "baseline") & variants["layer"].notna()
                           & variants[f"metrics.{metric_name}"].notna()]
        for model, group in steered.groupby("model", sort=True):
            best = _best_row(group.assign(value=group[f"metrics.{metric_name}"]),
                             higher_is_better(metric_name, directions))
            records.append({"model": model, "source": "evaluate", "run_id": best["run_id"],
                             "variant": best["variant"], **{p: math.nan for p in PARAMS},
                             "layer": best["layer"], "scale": best["scale"], "metric": metric_name, "value": best["value"],
                             "ci_low": _get(best, f"{metric_name}_ci_low"),
                             "ci_high": _get(best, f"{metric_name}_ci_high")})
    if not records:
        return _empty(BEST_COLUMNS)
    out = pd.DataFrame(records)
    models = order_models(out["model"], sizes)
    out = out.assign(n_params_b=out["model"].map(lambda m: sizes.get(m, math.nan)),
                     _order=out["model"].map(models.index)).sort_values(["_order", "source"], kind="stable")
    return out[BEST_COLUMNS].reset_index(drop=True)


__all__ = ['PARETO_COLUMNS', 'on_front', 'pareto_table', 'BEST_COLUMNS', 'HEATMAP_COLUMNS', 'MAX_SCALE_COLUMNS', 'SCALE_BINS', 'SWEEP_COLUMNS', 'TRIAL_COLUMNS', 'RELATIVE_COLUMNS', 'best_settings_table', 'layer_scale_table', 'relative_scale_table', 'scale_sweep_table', 'tune_trials']


PARETO_COLUMNS = ["model", "study", "run_id", "variant", "metric", "value", "ci_low", "ci_high", "cost_metric", "cost",
                  "on_front", "chosen", "bound"]


def on_front(values: Sequence[float], costs: Sequence[float], higher_is_better: bool) -> list[bool]:
    """Whether each (value, cost) point is on the Pareto front: no other point is at least as good on both
    (value by ``higher_is_better``, cost lower) and better on one."""
    sign = 1.0 if higher_is_better else -1.0
    points = [(sign * v, -c) for v, c in zip(values, costs, strict=True)]  # both to maximise
    return [not any(o[0] >= p[0] and o[1] >= p[1] and o != p for o in points) for p in points]


def pareto_table(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials of every study that measured a cost of steering (``cost``): value, cost, whether on the
    study's Pareto front, and whether it is the study's chosen (best, or best feasible) trial.

    Args:
        trials: ``tune_trials`` output.
    """
    costed = trials[trials["cost"].notna()] if len(trials) else trials
    records = []
    for _, group in costed.groupby(["model", "study"], sort=True):
        front = on_front(list(group["value"]), list(group["cost"]), bool(group["higher_is_better"].iloc[0]))
        for row, on in zip(group.to_dict("records"), front, strict=True):
            records.append({**{c: row[c] for c in PARETO_COLUMNS if c in row}, "on_front": on})
    return pd.DataFrame(records, columns=PARETO_COLUMNS) if records else _empty(PARETO_COLUMNS)
