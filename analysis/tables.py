"""The tables behind every figure and the report, computed from the run frame and loaded artifacts.

Every function here is pure: it reads a run frame (``analysis.runs.select_runs``), metric
histories or artifact contents handed to it, and returns a DataFrame; what it looked for and did
not find goes to a ``Missing`` list instead of an exception.

Which run stands for a model where several could:

- an *evaluation* is the parent run of a set of ``evaluate.variant`` runs (an evaluate or score
  run); per model the latest one (by its variants' start time) gives the variant metrics, the
  cross-model comparison, the judge agreement and the per-category changes, so that every variant
  is compared with the baseline of the same evaluation;
- the scale sweep and the best settings read every evaluation and every tune trial; where two runs
  share a model, variant, layer and scale, the latest counts;
- training curves: the latest train run per model and branch.

Tune studies (``stages.tune``): a worker is a ``tune`` run tagged with the study's name, its
objective metric and direction; its trials are child runs (stage ``tune.trial``) with params
``layer`` and ``scale`` and the objective metric (MLflowCallback's ``objective`` as a fallback).
A study's trials are pooled over its workers. Without a direction tag the metric's registered
``higher_is_better`` decides, else maximize.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from analysis.runs import (
    Missing,
    as_float,
    column,
    metric,
    model_of,
    of_stage,
    order_models,
    param,
    tag,
    variant_tag,
)
from core import artifacts
from core.artifacts import TAG_BRANCH, TAG_PARENT, TRAIN_STAGE, VARIANT_STAGE
from evaluation.variant_metrics import COST_METRICS
from steering.methods import variant_order as methods_order

# Judge metrics in the order they are preferred as "the" truthfulness metric of a figure: True*Info of the
# trained judge first (TruthfulQA's headline metric, and the judge that agrees best with people: calibrate).
PREFERRED_METRICS = ("judge_truthful_informative", "judge_truthful", "llm_truthful", "llm_logprob_truthful", "semantic_acc", "mc1", "mc2", "bleu_acc",
                     "rouge1_acc")
INFORMATIVE_METRICS = ("judge_informative", "llm_informative")  # preferred first
LOSS_METRICS = ("train_loss", "val_loss")
FINAL_LOSS = "final_train_loss"  # the whole train set after training (train_loss: one batch per step)

VARIANT_COLUMNS = ["model", "evaluation", "variant", "run_id", "layer", "scale", "metric", "value", "ci_low",
                   "ci_high", "delta", "delta_ci_low", "delta_ci_high", "mcnemar_p"]
CROSS_COLUMNS = ["model", "n_params_b", "variant", "metric", "value", "ci_low", "ci_high", "run_id"]
CURVE_COLUMNS = ["model", "branch", "run_id", "metric", "step", "value"]
TRAIN_COLUMNS = ["model", "branch", "run_id", "start_time"]


def _empty(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


def variant_order(variants: Iterable[str]) -> list[str]:
    """The steering methods' registration order (baseline, caa, mlp_mc, mlp_gen, ...), then any other by name."""
    return methods_order(set(variants))


def higher_is_better(name: str, directions: Mapping[str, bool]) -> bool:
    """The declared direction of metric ``name``; undeclared metrics count as higher is better."""
    return bool(directions.get(name, True))


# ---------------------------------------------------------------- variant runs and evaluations


def variant_runs(runs: pd.DataFrame, exclude_parents: Iterable[str] = ()) -> pd.DataFrame:
    """One row per ``evaluate.variant`` run: ``run_id``, ``model``, ``variant``, ``evaluation`` (its
    parent run, "" for none), ``split`` (``eval.split``, "" when not logged), ``layer``, ``scale`` (NaN for
    baseline), ``start_time``, ``sweep`` (the sweep whose cell it is, "" for none), and every ``metrics.*`` column.

    Args:
        runs: the run frame.
        exclude_parents: parent runs whose variant runs are left out (tune trials).
    """
    selected = of_stage(runs, VARIANT_STAGE)
    parents = tag(selected, TAG_PARENT).fillna("")
    selected = selected[~parents.isin(set(exclude_parents))]
    if selected.empty:
        return _empty(["run_id", "model", "variant", "evaluation", "split", "layer", "scale", "start_time", "sweep"])

    def setting(key: str) -> pd.Series:  # the variant's tag; a run without the tag falls back to the config
        tagged, configured = variant_tag(selected, key), param(selected, f"steering.{key.removeprefix('truthsteer.')}")
        steered = variant_tag(selected) != "baseline"  # baseline steers nothing, whatever its config says
        return tagged.where(tagged.notna(), configured.where(steered)).map(as_float)

    frame = pd.DataFrame({
        "run_id": column(selected, "run_id").astype(str), "model": model_of(selected),
        "variant": variant_tag(selected, artifacts.TAG_VARIANT).fillna(""), "evaluation": tag(selected, TAG_PARENT).fillna(""),
        "split": param(selected, "eval.split").fillna(""), "layer": setting(artifacts.TAG_LAYER), "scale": setting(artifacts.TAG_SCALE), "start_time": column(selected, "start_time"),
        "sweep": tag(selected, artifacts.TAG_SWEEP_NAME).fillna(""),
    })
    metrics = selected[[c for c in selected.columns if c.startswith("metrics.")]]
    return pd.concat([frame, metrics], axis=1).reset_index(drop=True)


def judge_metric_names(variants: pd.DataFrame) -> list[str]:
    """The judge metrics the variant runs report with an interval (``m`` with ``m_ci_low``), preferred first."""
    names = {c.removeprefix("metrics.") for c in variants.columns if c.startswith("metrics.")}
    found = {m for m in names if f"{m}_ci_low" in names and not m.endswith("_delta")
             and variants[f"metrics.{m}"].notna().any()}
    return [m for m in PREFERRED_METRICS if m in found] + sorted(found - set(PREFERRED_METRICS))


def primary_metric(names: Iterable[str]) -> str | None:
    """The truthfulness metric figures plot: the first of ``PREFERRED_METRICS`` present, else the
    first name that is not a side-effect metric (``COST_METRICS``: KL, cross-entropy), else None.

    Args:
        names: the available metric names.
    """
    available = [m for m in names if m not in COST_METRICS]
    return next((m for m in PREFERRED_METRICS if m in available), available[0] if available else None)


def reported(variants: pd.DataFrame) -> pd.DataFrame:
    """The variant runs whose numbers are reported: a model's evaluations on any split but ``val`` (the val split
    chooses, the others report), or its val evaluations where it has no other.

    Args:
        variants: ``variant_runs`` output.
    """
    if variants.empty or "split" not in variants:
        return variants
    on_val = variants["split"] == "val"
    others = variants[~on_val]
    return pd.concat([others, variants[on_val & ~variants["model"].isin(set(others["model"]))]])


def latest_evaluations(variants: pd.DataFrame, *, validation: bool = False) -> dict[str, str]:
    """Per model, the evaluation (parent run id) whose variant runs started last, of the ``reported`` ones, or
    with ``validation`` of those on the val split only. A sweep's cells count only where a model has no other
    evaluation, and then the cell with the most variants (its reference cell): the last cell is one point of a
    grid, not the model's headline.

    Args:
        variants: ``variant_runs`` output.
        validation: the latest evaluation on the val split instead.
    """
    if variants.empty:
        return {}
    if validation:
        variants = variants[variants["split"] == "val"] if "split" in variants else variants.iloc[0:0]
    else:
        variants = reported(variants)
    if variants.empty:
        return {}
    sweeps = variants["sweep"] if "sweep" in variants else pd.Series("", index=variants.index)
    grouped = variants.assign(in_sweep=sweeps.fillna("") != "").groupby(["model", "evaluation"], sort=True)
    started = grouped.agg(start_time=("start_time", "max"), in_sweep=("in_sweep", "any"),
                          n_variants=("variant", "nunique")).reset_index()
    started = started.sort_values(["model", "start_time"], kind="stable")
    chosen = {}
    for model, group in started.groupby("model", sort=True):
        own = group[~group["in_sweep"]]
        chosen[str(model)] = str(own["evaluation"].iloc[-1] if not own.empty else
                                 group.sort_values("n_variants", kind="stable")["evaluation"].iloc[-1])
    return chosen


def _latest(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The latest row (by ``start_time``) of each ``keys`` group."""
    if frame.empty:
        return frame
    ordered = frame.sort_values("start_time", kind="stable")
    return ordered.groupby(keys, sort=False, dropna=False).tail(1)


def _get(row: Mapping[str, Any], name: str) -> float:
    value = row.get(f"metrics.{name}")
    return math.nan if value is None else float(value)


def variant_metrics_table(variants: pd.DataFrame, evaluations: Mapping[str, str], metric_names: Sequence[str],
                          missing: Missing, model_order: Sequence[str] | None = None) -> pd.DataFrame:
    """Per model (its chosen evaluation), variant and judge metric: the value with its interval and,
    against baseline, the delta with its interval and McNemar's p.

    Args:
        variants: ``variant_runs`` output.
        evaluations: model -> the evaluation to read (``latest_evaluations``).
        metric_names: the judge metrics to report.
        missing: records metrics and intervals a variant run lacks.
        model_order: the models' order; default by name.
    """
    records = []
    for model in model_order or sorted(evaluations):
        if model not in evaluations:
            continue
        chosen = variants[(variants["model"] == model) & (variants["evaluation"] == evaluations[model])]
        chosen = _latest(chosen, ["variant"])
        rows = {str(r["variant"]): r for r in chosen.to_dict("records")}
        for name in metric_names:
            have = [v for v, r in rows.items() if not math.isnan(_get(r, name))]
            if not have:
                missing.add(f"no metric {name} in any variant of evaluation {evaluations[model] or '(no parent)'}",
                            model=model, run_id=evaluations[model])
                continue
            for variant in variant_order(rows):
                row = rows[variant]
                value = _get(row, name)
                if math.isnan(value):
                    missing.add(f"{variant}: no metric {name}", model=model, run_id=row["run_id"])
                    continue
                low, high = _get(row, f"{name}_ci_low"), _get(row, f"{name}_ci_high")
                if math.isnan(low) or math.isnan(high):
                    missing.add(f"{variant}: no interval for {name}", model=model, run_id=row["run_id"])
                records.append({
                    "model": model, "evaluation": evaluations[model], "variant": variant, "run_id": row["run_id"],
                    "layer": row["layer"], "scale": row["scale"], "metric": name, "value": value,
                    "ci_low": low, "ci_high": high, "delta": _get(row, f"{name}_delta"),
                    "delta_ci_low": _get(row, f"{name}_delta_ci_low"),
                    "delta_ci_high": _get(row, f"{name}_delta_ci_high"),
                    "mcnemar_p": _get(row, f"{name}_mcnemar_p"),
                })
    return pd.DataFrame(records, columns=VARIANT_COLUMNS) if records else _empty(VARIANT_COLUMNS)


def best_variants(table: pd.DataFrame, metric_name: str, higher: bool) -> dict[str, str]:
    """Per model, the steered (non-baseline) variant with the best ``metric_name``; ties go to the
    first in variant order.

    Args:
        table: ``variant_metrics_table`` output.
        metric_name: the metric to compare.
        higher: whether higher values are better.
    """
    out: dict[str, str] = {}
    steered = table[(table["metric"] == metric_name) & (table["variant"] != "baseline")]
    for model, group in steered.groupby("model", sort=True):
        ranked = sorted(group.to_dict("records"), key=lambda r: variant_order(group["variant"]).index(r["variant"]))
        best = max(ranked, key=lambda r: r["value"]) if higher else min(ranked, key=lambda r: r["value"])
        out[str(model)] = str(best["variant"])
    return out


def cross_model_table(table: pd.DataFrame, metric_names: Sequence[str], sizes: Mapping[str, float]) -> pd.DataFrame:
    """The variant metrics of ``metric_names`` for every model, models from smallest to largest.

    Args:
        table: ``variant_metrics_table`` output.
        metric_names: e.g. the truthfulness metric and ``llm_informative``.
        sizes: model -> billions of parameters.
    """
    chosen = table[table["metric"].isin(metric_names)]
    if chosen.empty:
        return _empty(CROSS_COLUMNS)
    models = order_models(chosen["model"], sizes)
    out = chosen.assign(
        n_params_b=chosen["model"].map(lambda m: sizes.get(m, math.nan)),
        _model=chosen["model"].map(models.index),
        _metric=chosen["metric"].map(list(metric_names).index),
        _variant=chosen["variant"].map(variant_order(chosen["variant"]).index),
    ).sort_values(["_metric", "_model", "_variant"], kind="stable")
    return out[CROSS_COLUMNS].reset_index(drop=True)


# ---------------------------------------------------------------- training curves


def train_runs(runs: pd.DataFrame, missing: Missing) -> pd.DataFrame:
    """The latest train run per model and branch (``mc``/``gen``) that logged ``train_loss``.

    The branch is the tag ``truthsteer.branch``, else the param ``mlp.branch``; a ``both`` run
    holds no curves itself (its branches train in child runs).

    Args:
        runs: the run frame.
        missing: records train runs of one branch that logged no ``train_loss``.
    """
    trained = of_stage(runs, TRAIN_STAGE)
    if trained.empty:
        return _empty(TRAIN_COLUMNS)
    branch = tag(trained, TAG_BRANCH)
    frame = pd.DataFrame({"model": model_of(trained), "branch": branch.where(branch.notna(),
                                                                             param(trained, "mlp.branch")),
                          "run_id": column(trained, "run_id").astype(str),
                          "start_time": column(trained, "start_time"),
                          "has_loss": metric(trained, "train_loss").notna()})
    frame = frame[frame["branch"].isin(("mc", "gen", "joint"))]  # steering.mlp.BRANCHES (it imports torch)
    for row in frame[~frame["has_loss"]].to_dict("records"):
        missing.add(f"train run ({row['branch']}) without train_loss: no curve", model=row["model"],
                    run_id=row["run_id"])
    frame = _latest(frame[frame["has_loss"]], ["model", "branch"])
    return frame[TRAIN_COLUMNS].sort_values(["model", "branch"], kind="stable").reset_index(drop=True)


def training_curves_table(trained: pd.DataFrame, history: Callable[[str, str], Sequence[tuple[int, float]]],
                          missing: Missing) -> pd.DataFrame:
    """Per train run and loss metric, the value at every step; ``train_loss`` is each step's batch,
    ``val_loss`` the whole val set, and ``final_train_loss`` (one row, at the last step) the whole train set
    after training, which is why it differs from the last batch's ``train_loss``.

    Args:
        trained: ``train_runs`` output.
        history: ``(run_id, metric) -> [(step, value), ...]``.
        missing: records runs without a ``val_loss`` (or ``train_loss``) history.
    """
    records = []
    for row in trained.to_dict("records"):
        last = 0
        for name in LOSS_METRICS:
            points = sorted(history(row["run_id"], name))
            if not points:
                missing.add(f"train run ({row['branch']}) has no {name} history", model=row["model"],
                            run_id=row["run_id"])
            last = max([last, *(int(step) for step, _ in points)])
            records += [{"model": row["model"], "branch": row["branch"], "run_id": row["run_id"], "metric": name,
                         "step": int(step), "value": float(value)} for step, value in points]
        records += [{"model": row["model"], "branch": row["branch"], "run_id": row["run_id"], "metric": FINAL_LOSS,
                     "step": last, "value": float(value)} for _, value in history(row["run_id"], FINAL_LOSS)[-1:]]
    return pd.DataFrame(records, columns=CURVE_COLUMNS) if records else _empty(CURVE_COLUMNS)


__all__ = ['PREFERRED_METRICS', 'best_variants', 'cross_model_table', 'judge_metric_names', 'latest_evaluations', 'reported', 'primary_metric', 'train_runs', 'training_curves_table', 'variant_metrics_table', 'variant_runs']
