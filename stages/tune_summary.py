"""The tune stage's results: a worker's ``TuneOutcome``, the study's chosen trial (best, best feasible under
a constraint, or best on the Pareto front), and what the tune run logs about the study (tags, best config,
trials, history, importance, the Pareto front)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import mlflow
import pandas as pd
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from core import artifacts
from core.artifacts import (
    TAG_BEST_RUN,
    TAG_BEST_TRIAL,
    TRIAL_METRIC,
)
from core.config import ConfigError
from stages.tune_space import COSTS, Constraint, Objective, trial_constraints
from stages.tune_storage import (
    ATTR_FAIL_REASON,
    ATTR_SURPLUS,
    MLFLOW_RUN_ATTR,
)
from stages.tune_workers import (
    StudyCounts,
)
from steering.methods import method_of_params, tunable


@dataclasses.dataclass(frozen=True)
class TuneOutcome:
    """What a worker leaves: the study's best (over every worker) and the counts.

    Args:
        study_name: the study.
        storage: the storage, password hidden.
        best_params: ``{"layer": L, "scale": S}`` (``{"k": K, "alpha": A}``) of the best COMPLETE trial;
            None without one.
        best_value: its objective value.
        best_trial: its number.
        best_run_id: its MLflow run.
        counts: the study's trials by state (surplus trials left out).
        n_worker_trials: the trials this worker ran.
        extraction_source: ``run:<id>``, ``cache`` or ``computed``.
    """

    study_name: str
    storage: str
    best_params: dict[str, Any] | None
    best_value: float | None
    best_trial: int | None
    best_run_id: str | None
    counts: StudyCounts
    n_worker_trials: int
    extraction_source: str


def _tuned(best_params: dict[str, Any], method: str) -> Any:
    chosen = tunable(method) if method else method_of_params(best_params)
    if chosen is None or chosen.tune is None:
        raise ConfigError(f"params {sorted(best_params)} are not the axes of any tunable method")
    return chosen.tune


def tuned_fragment(best_params: dict[str, Any], method: str = "",
                   scale_mode: str = "absolute") -> dict[str, dict[str, Any]]:
    """The config fragment ``full --tuned`` applies: the method's section with its axes' values,
    ``{"steering": {"layer": L, "scale": S, "scale_mode": M}}`` for CAA, ``{"iti": {"k": K, "alpha": A}}`` for ITI.

    Args:
        best_params: the best trial's params.
        method: the tuned method; "" for the one whose axes the params are.
        scale_mode: the ``steering.scale_mode`` the study's scales are in; written beside a steering scale, so
            ``full --tuned`` reads a relative scale as relative whatever its own config says.
    """
    fragment = _tuned(best_params, method).fragment(best_params)
    if "scale" in fragment.get("steering", {}):
        fragment["steering"]["scale_mode"] = scale_mode
    return fragment


def best_tags(best_params: dict[str, Any], method: str = "") -> dict[str, str]:
    """``truthsteer.best_<axis>`` of each axis (``TAG_BEST_LAYER`` and ``TAG_BEST_SCALE``, ``TAG_BEST_K`` and
    ``TAG_BEST_ALPHA``)."""
    return {artifacts.best_tag(a.name): str(best_params[a.name]) for a in _tuned(best_params, method).axes}


def chosen_trial(study: Study, constraint: Constraint | None = None) -> FrozenTrial | None:
    """The study's chosen trial: the best by its (first) objective among the COMPLETE trials, only the
    feasible ones under ``constraint``, and for two objectives only those on the Pareto front (so the
    chosen trial costs no more than any trial as good). None when no trial qualifies."""
    if len(study.directions) == 1 and constraint is None:
        return study.best_trial
    candidates = (study.best_trials if len(study.directions) > 1 else
                  study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if constraint is not None:
        candidates = [t for t in candidates if all(v <= 0 for v in trial_constraints(t))]
    if not candidates:
        return None
    sign = 1.0 if study.directions[0] == StudyDirection.MAXIMIZE else -1.0
    return max(candidates, key=lambda t: (sign * float(t.values[0]), -t.number))


def lowest_cost(study: Study, constraint: Constraint | None) -> str:
    """The smallest cost any completed trial reached, for the no-feasible-trial message."""
    if constraint is None:
        return "no cost measured"
    spent = [(float(t.user_attrs[constraint.metric]), t.number) for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,)) if constraint.metric in t.user_attrs]
    if not spent:
        return f"no trial measured {constraint.metric}"
    low, number = min(spent)
    return f"the lowest {constraint.metric} is {low:.4g}, trial {number}"


def _log_pareto(study: Study, objective: Objective, chosen: FrozenTrial, variant: str, cost: str) -> None:
    """``TUNE_PARETO`` and ``TUNE_PARETO_FIGURE``: every COMPLETE trial's value and ``cost``, the front, the chosen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.sweep_figures import pareto_figure
    from analysis.sweeps import PARETO_COLUMNS, on_front

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if cost in t.user_attrs]
    values, costs = [float(t.values[0]) for t in complete], [float(t.user_attrs.get(cost, math.nan)) for t in complete]
    front = on_front(values, costs, objective.higher_is_better)
    active = mlflow.active_run()
    model = active.data.tags.get(artifacts.TAG_MODEL, "") if active else ""
    table = pd.DataFrame([{"model": model, "study": study.study_name, "run_id": str(t.system_attrs.get(MLFLOW_RUN_ATTR, "")),
                           "variant": variant, "metric": objective.metric, "value": v, "cost_metric": cost, "cost": c,
                           "on_front": f, "chosen": t.number == chosen.number, "trial": t.number, **t.params}
                          for t, v, c, f in zip(complete, values, costs, front, strict=True)],
                         columns=[*PARETO_COLUMNS, "trial", *chosen.params])
    mlflow.log_text(table.to_csv(index=False), artifacts.TUNE_PARETO)
    figure = pareto_figure(table)
    mlflow.log_figure(figure, artifacts.TUNE_PARETO_FIGURE)
    plt.close(figure)


def _log_figures(study: Study) -> dict[str, str]:
    """The optimisation history and the param importances as figures; the reason where one is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    skipped: dict[str, str] = {}
    first = (lambda t: float(t.values[0])) if len(study.directions) > 1 else None  # the objective, not the cost
    # the importance evaluator ranks params by how they lower the target: a maximised objective is negated
    lowered = (lambda t: -float(t.values[0])) if first and study.directions[0] == StudyDirection.MAXIMIZE else first
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")  # the target is negated
        if complete:
            axes = optuna_plots.plot_optimization_history(study, target=first, target_name=TRIAL_METRIC)
            figure = axes.get_figure(root=True)
            mlflow.log_figure(figure, artifacts.TUNE_HISTORY)
            plt.close(figure)
        else:
            skipped["history"] = "no completed trial"
        names = sorted({p for t in complete for p in t.params})
        fixed = [p for p in names if len({t.params.get(p) for t in complete}) < 2]
        if len(complete) < 2 or fixed:
            skipped["importance"] = (f"{len(complete)} completed trial(s); importance needs >= 2"
                                     if len(complete) < 2 else f"{', '.join(fixed)} took one value only")
        else:
            try:
                axes = optuna_plots.plot_param_importances(study, target=lowered, target_name=TRIAL_METRIC)
            except (ValueError, RuntimeError) as err:  # e.g. all completed values equal
                skipped["importance"] = f"optuna could not compute importances: {err}"
            else:
                figure = axes.get_figure(root=True)
                mlflow.log_figure(figure, artifacts.TUNE_IMPORTANCE)
                plt.close(figure)
    return skipped


def summarise(study: Study, objective: Objective, n_worker_trials: int, storage: str,
              extraction_source: str, stopped: bool = False, method: str = "",
              constraint: Constraint | None = None, cost: str = "", scale_mode: str = "absolute") -> TuneOutcome:
    """Tag the active (parent) run with the study's best and log its artifacts.

    Tags ``TAG_BEST_RUN``, ``TAG_BEST_TRIAL`` and ``best_tags`` (best layer and scale, or k and alpha); metrics
    ``best_<metric>``, ``n_complete``, ``n_pruned``, ``n_failed``, ``n_worker_trials``; artifacts
    ``TUNED``, ``TUNE_TRIALS``, ``TUNE_HISTORY``, ``TUNE_IMPORTANCE``.

    Args:
        study: the study, after this worker's trials.
        objective: the objective.
        n_worker_trials: trials this worker ran.
        storage: the storage, password hidden.
        extraction_source: where the vectors came from.
        stopped: a signal stopped the worker: a study without a completed trial is then no error.
        method: the tuned method; "" for the one whose axes the best params are.
        constraint: the bound that makes a trial feasible; the best *feasible* trial is chosen.
        cost: the study's measured cost (its constraint's, or its second direction); "" for none.

    Raises:
        ConfigError: the study has no completed trial (and the worker was not stopped).
    """
    trials = study.get_trials(deepcopy=False)
    counts = StudyCounts.of(trials)
    mlflow.log_metrics({"n_complete": counts.complete, "n_pruned": counts.pruned, "n_failed": counts.failed,
                        "n_worker_trials": n_worker_trials})
    mlflow.log_text(study.trials_dataframe().to_csv(index=False), artifacts.TUNE_TRIALS)
    for what, reason in _log_figures(study).items():
        mlflow.set_tag(f"truthsteer.{what}_skipped", reason)
        print(f"{what} plot skipped: {reason}")
    if not counts.complete and stopped:
        print(f"study {study.study_name!r} has no completed trial yet; nothing to tag")
        return TuneOutcome(study.study_name, storage, None, None, None, None, counts, n_worker_trials,
                           extraction_source)
    if not counts.complete:
        reasons = sorted({str(t.user_attrs.get(ATTR_FAIL_REASON, t.state.name)) for t in trials
                          if t.state != TrialState.COMPLETE and not t.user_attrs.get(ATTR_SURPLUS)})
        raise ConfigError(f"study {study.study_name!r} has no completed trial ({counts.failed} failed, "
                          f"{counts.pruned} pruned): {'; '.join(reasons[:3]) or 'no trial ran'}")
    best = chosen_trial(study, constraint)
    if best is None:
        raise ConfigError(f"no completed trial of study {study.study_name!r} is feasible under "
                          f"{constraint.describe() if constraint else 'its constraint'} "
                          f"({lowest_cost(study, constraint)}); loosen the constraint or narrow the search space")
    best_run = str(best.system_attrs.get(MLFLOW_RUN_ATTR, ""))
    mlflow.set_tags({TAG_BEST_TRIAL: str(best.number), TAG_BEST_RUN: best_run,
                     **best_tags(best.params, method)})
    mlflow.log_metric(f"best_{objective.metric}", float(best.values[0]))
    costs = {c: float(best.user_attrs[c]) for c in COSTS if c in best.user_attrs}
    if costs:
        mlflow.log_metrics({f"best_{c}": v for c, v in costs.items()})
        _log_pareto(study, objective, best, method or (method_of_params(best.params) or tunable("caa")).name,
                    cost or next(c for c in COSTS if c in best.user_attrs))
    mlflow.log_text(yaml.safe_dump(tuned_fragment(best.params, method, scale_mode), sort_keys=False), artifacts.TUNED)
    return TuneOutcome(study.study_name, storage, dict(best.params), best.values[0], best.number, best_run or None,
                       counts, n_worker_trials, extraction_source)


__all__ = ['TuneOutcome', 'best_tags', 'chosen_trial', 'lowest_cost', 'summarise', 'tuned_fragment']
