"""Warm starts: a study on one model begins with another model's best trials, converted to its size.

``tune --warm-start <tune run id>`` reads that run's ``tune/trials.csv``, takes its best complete (and,
under a constraint, feasible) trials and enqueues them first in this study: the layer as the same
fraction of the depth (``round(layer / n_layers * n_layers_here)``, as ``steering.depth`` resolves),
the scale as the same fraction of the residual norm (each trial's ``relative_scale``, recorded by every
CAA trial whose extraction measured the norm), then back to this study's unit (a multiplier of this
model's vector in absolute mode). A value outside this study's search space is moved to its nearest
allowed value, and the message says so.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from typing import Any

import mlflow

from core import artifacts
from core.config import Config, ConfigError
from core.tracking import download
from stages.tune_scoring import ATTR_RELATIVE_SCALE
from stages.tune_space import ATTR_CONSTRAINTS, Axis, SearchSpace
from steering.scale import LayerVectors, multiplier_per_relative

WARM_START_TRIALS = 3  # the source's best trials enqueued (fewer when it has fewer)


def nearest(axis: Axis, value: float) -> float | int:
    """The allowed value of ``axis`` closest to ``value`` (a list's nearest, a range's clipped and stepped value)."""
    if axis.choices:
        return min(axis.values(), key=lambda v: abs(float(v) - value))
    assert axis.low is not None and axis.high is not None  # a range (Axis checks)
    clipped = min(max(value, axis.low), axis.high)
    if axis.step is not None:
        clipped = axis.low + round((clipped - axis.low) / axis.step) * axis.step
        clipped = min(clipped, axis.low + math.floor((axis.high - axis.low) / axis.step + 1e-9) * axis.step)
    return int(round(clipped)) if axis.integer else float(clipped)


def _source_trials(run_id: str) -> tuple[list[dict[str, str]], dict[str, str], Any]:
    run = mlflow.MlflowClient().get_run(run_id)
    if run.data.tags.get(artifacts.TAG_STAGE) != "tune":
        raise ConfigError(f"warm_start={run_id} is a {run.data.tags.get(artifacts.TAG_STAGE) or 'non-truthsteer'} "
                          "run, not a tune run; pass the id of a finished `tune` run")
    if run.data.params.get("tune.method", "caa") != "caa":
        raise ConfigError(f"warm_start={run_id} tuned {run.data.params['tune.method']}; warm starts convert caa's "
                          "layer and scale: pass a caa tune run")
    with open(download(run_id, artifacts.TUNE_TRIALS), newline="") as handle:
        return list(csv.DictReader(handle)), dict(run.data.params), run


def _feasible(row: Mapping[str, str]) -> bool:
    """Whether a row of ``tune/trials.csv`` (Optuna's ``trials_dataframe``) violates no constraint: its
    ``user_attrs_<ATTR_CONSTRAINTS>`` cell, a list of violations, holds none above 0 (no cell: no constraint)."""
    values = [v for k, v in row.items() if k == f"user_attrs_{ATTR_CONSTRAINTS}" and v not in ("", None)]
    try:
        return all(float(x) <= 0 for v in values for x in str(v).strip("[]() ").split(",") if x.strip())
    except ValueError:
        return True


def warm_trials(cfg: Config, run_id: str, vectors: LayerVectors, space: SearchSpace,
                n: int = WARM_START_TRIALS) -> tuple[list[dict[str, float | int]], list[str]]:
    """The params to enqueue from tune run ``run_id``'s best trials, and one line per trial saying how each
    was converted.

    Args:
        cfg: this run's config (its model's depth, ``steering.scale_mode``).
        run_id: a finished caa tune run, of this or another model.
        vectors: this study's extraction (its vector and residual norms per layer).
        space: this study's search space (converted values are moved into it).
        n: how many of the best trials.
    """
    rows, params, run = _source_trials(run_id)
    direction = run.data.tags.get(artifacts.TAG_OBJECTIVE_DIRECTION, "maximize")
    value_key = "value" if rows and "value" in rows[0] else "values_0"
    complete = [r for r in rows if r.get("state") == "COMPLETE" and r.get(value_key) not in ("", None)
                and _feasible(r)]
    if not complete:
        raise ConfigError(f"warm_start={run_id}: its study has no complete feasible trial to start from; pass a tune "
                          "run with at least one")
    if ATTR_RELATIVE_SCALE not in (k.removeprefix("user_attrs_") for k in complete[0]):
        raise ConfigError(f"warm_start={run_id}: its trials do not record {ATTR_RELATIVE_SCALE} (its extraction "
                          "predates the residual norms); tune the source model again first")
    complete.sort(key=lambda r: float(r[value_key]), reverse=direction == "maximize")
    source_layers = int(params.get("model.n_layers") or 0)
    if source_layers <= 0:
        raise ConfigError(f"warm_start={run_id} does not log model.n_layers; pass a tune run made by truthsteer")
    source_model = params.get("model.alias", "?")
    out: list[dict[str, float | int]] = []
    lines: list[str] = []
    for row in complete:
        if len(out) == n:
            break
        layer = int(float(row["params_layer"]))
        relative = float(row[f"user_attrs_{ATTR_RELATIVE_SCALE}"])
        target_layer = min(cfg.model.n_layers - 1, round(layer / source_layers * cfg.model.n_layers))
        target_layer = int(nearest(space["layer"], target_layer))
        if cfg.steering.scale_mode == "relative":
            target_scale = relative
        else:
            resid = None if vectors.resid_norm is None else float(vectors.resid_norm[target_layer])
            target_scale = relative * multiplier_per_relative(float(vectors[target_layer].norm()), resid, vectors.where)
        moved = nearest(space["scale"], target_scale)
        trial = {"layer": target_layer, "scale": moved}
        if trial in out:
            continue
        out.append(trial)
        lines.append(f"warm start: {source_model} trial {row['number']} ({value_key} {float(row[value_key]):.4f}; "
                     f"layer {layer}/{source_layers}, relative scale {relative:.4g}) -> layer {target_layer}/"
                     f"{cfg.model.n_layers}, scale {moved:.4g} ({cfg.steering.scale_mode})"
                     + (f", moved into the search space from {target_scale:.4g}" if moved != target_scale else ""))
    return out, lines


__all__ = ["WARM_START_TRIALS", "nearest", "warm_trials"]
