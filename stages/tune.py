"""The tune stage: Optuna studies of the CAA steering layer and scale (or ITI's k and alpha), one study per
(model, method, objective).

The search space, samplers and pruners are in ``stages.tune_space``, the storages and settings in
``stages.tune_storage``, scoring a setting (and the shared extraction) in ``stages.tune_scoring``, the
study and its workers in ``stages.tune_workers``; this module runs a worker and summarises the study.

A *study* lives in an Optuna storage, so that it outlives any one process and several processes
(workers) can share it:

- a local sqlite file by default (``$TRUTHSTEER_OUTPUTS/tune/optuna.db``, ``outputs/`` by default);
- any RDB URL (``sqlite:///x.db``, ``postgresql://user:pass@host/db`` for workers on several
  machines); RDB storages get a heartbeat, so the trial of a killed worker is marked FAIL after
  the grace period and re-queued with the same params (``RetryHeartbeatStaleTrialCallback``);
- a journal file (``journal:PATH``, or a path ending in ``.log``): ``JournalStorage`` over
  ``JournalFileBackend``, for workers on one machine or a shared file system (no heartbeat).

Starting a study with an existing name resumes it (``load_if_exists``). Each worker runs up to
``n_trials`` trials; with ``total_trials`` (and always for the grid sampler, whose total is the
grid) the workers of a study stop at exactly that many COMPLETE trials: a worker starts a trial
only while the COMPLETE plus the running and queued trials fall short of the total, and a trial
that lost a race for the last slot (``is_surplus``: a lower-numbered trial claimed it) is pruned
before it samples anything. ``MaxTrialsCallback`` is not enough for this: it stops a worker after
a trial finishes, when the other workers' trials are already running past the total.

The search space is the steering layer (ints) and scale (floats), each a range ``low:high``, a
stepped range ``low:high:step`` or a list ``a,b,c``; the layers default to a band centred on the
model's default layer, the scales to ``0:8`` (``0:8:2`` for the grid). Samplers: TPE (default,
multivariate, seeded per trial number so that concurrent workers do not repeat each other) and
``grid`` (``GridSampler``: every layer x scale cell exactly once, over all workers).

``method=iti`` tunes ITI instead: the number of steered heads ``k`` (ints, default ``1:48``, grid
``4,8,16,32``, at most the model's n_layers x n_heads) and the shift ``alpha`` (default ``0:30``, grid
``0:30:5``); each trial steers the best ``k`` of the shared head ranking (an iti run's, ``source_run``,
or the cache ``$TRUTHSTEER_OUTPUTS/tune/iti/``, see ``stages.tune_iti``) by ``alpha``. Its study is
``truthsteer-<model>-iti-<objective>``, its params ``k`` and ``alpha``, its best ``{"iti": {"k", "alpha"}}``.

Objectives (``OBJECTIVES``), scored on the val split under CAA steering ``vectors[layer] * scale``:

- ``mc`` (default, cheap): TruthfulQA's MC2, teacher-forced (``evaluation.mc``), no generation.
  MC2 rather than MC1 because it is continuous (the normalised probability of the true answers),
  so nearby settings are ranked by more than a 0/1 per question;
- ``judge``: greedy answers (``evaluation.generate``) scored by the semantic judge's
  ``semantic_diff`` (max similarity to a true reference minus max similarity to a false one,
  continuous for the same reason).

The direction comes from the metric's declared ``higher_is_better`` in the judge registry.
With a pruner (``wilcoxon`` by default for ``judge``), each question's value is reported at the
step of its index in the val split and ``WilcoxonPruner`` stops trials that are worse than the
best with confidence; ``median`` reports the running mean instead. A non-finite value fails the
trial, with the reason in its user attr ``fail_reason``; it never counts as 0.

Every trial of a worker shares one all-layer extraction (``shared_extraction``): an extract run's
(``extract_run``) or the one in the on-disk cache ``$TRUTHSTEER_OUTPUTS/tune/extractions/``, keyed
by the model and the config sections that decide it, computed once under a file lock when missing.
The model is loaded once per worker. The first SIGINT/SIGTERM stops a worker at the next chunk
boundary, re-queueing its running trial (``StopRequest``); a second stops it at once.

Tracking: a worker is a ``tune`` run (the study's parent run for the trials it runs); each trial is
a nested run made by optuna-integration's ``MLflowCallback`` in the parent's experiment, with the
params ``layer`` and ``scale`` and the metrics ``objective`` and the objective metric's own name.
At the end the parent is tagged with the study's best params, value, trial and the best trial's
run (over every worker), and gets the artifacts ``TUNED`` (``{"steering": {"layer", "scale"}}``,
which ``full --tuned <run id>`` reads), ``TUNE_TRIALS``, ``TUNE_HISTORY`` and ``TUNE_IMPORTANCE``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import mlflow
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import Study
from optuna.trial import TrialState

from core import artifacts, tracking
from core.artifacts import (
    TAG_BEST_RUN,
    TAG_BEST_TRIAL,
    TAG_EXTRACTION,
    TAG_OBJECTIVE_DIRECTION,
    TAG_OBJECTIVE_METRIC,
    TAG_STOPPED,
    TAG_STUDY,
    TRIAL_METRIC,
)
from core.config import Config, ConfigError
from core.data import splits_for
from core.models import LoadedModel, describe_source, load_from_config
from stages.tune_scoring import StopRequest, TrialScorer, make_objective
from stages.tune_sources import shared_source
from stages.tune_space import (
    Objective,
)
from stages.tune_storage import (
    ATTR_FAIL_REASON,
    ATTR_SURPLUS,
    MAX_RETRY,
    MLFLOW_RUN_ATTR,
    TuneSettings,
    open_storage,
    redacted,
    storage_url,
)
from stages.tune_workers import (
    StudyCounts,
    TrialBudget,
    guarded,
    mlflow_callbacks,
    open_study,
    run_worker,
    study_setup,
)
from steering.methods import method_of_params, tunable

# ---------------------------------------------------------------- results


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


def tuned_fragment(best_params: dict[str, Any], method: str = "") -> dict[str, dict[str, Any]]:
    """The config fragment ``full --tuned`` applies: the method's section with its axes' values,
    ``{"steering": {"layer": L, "scale": S}}`` for CAA, ``{"iti": {"k": K, "alpha": A}}`` for ITI.

    Args:
        best_params: the best trial's params.
        method: the tuned method; "" for the one whose axes the params are.
    """
    return _tuned(best_params, method).fragment(best_params)


def best_tags(best_params: dict[str, Any], method: str = "") -> dict[str, str]:
    """``truthsteer.best_<axis>`` of each axis (``TAG_BEST_LAYER`` and ``TAG_BEST_SCALE``, ``TAG_BEST_K`` and
    ``TAG_BEST_ALPHA``)."""
    return {artifacts.best_tag(a.name): str(best_params[a.name]) for a in _tuned(best_params, method).axes}


def _log_figures(study: Study) -> dict[str, str]:
    """The optimisation history and the param importances as figures; the reason where one is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    skipped: dict[str, str] = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if complete:
            axes = optuna_plots.plot_optimization_history(study, target_name=TRIAL_METRIC)
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
                axes = optuna_plots.plot_param_importances(study)
            except (ValueError, RuntimeError) as err:  # e.g. all completed values equal
                skipped["importance"] = f"optuna could not compute importances: {err}"
            else:
                figure = axes.get_figure(root=True)
                mlflow.log_figure(figure, artifacts.TUNE_IMPORTANCE)
                plt.close(figure)
    return skipped


def summarise(study: Study, objective: Objective, n_worker_trials: int, storage: str,
              extraction_source: str, stopped: bool = False, method: str = "") -> TuneOutcome:
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
    best = study.best_trial
    best_run = str(best.system_attrs.get(MLFLOW_RUN_ATTR, ""))
    mlflow.set_tags({TAG_BEST_TRIAL: str(best.number), TAG_BEST_RUN: best_run,
                    **best_tags(best.params, method)})
    mlflow.log_metric(f"best_{objective.metric}", float(best.value))  # type: ignore[arg-type]  # COMPLETE: a value
    mlflow.log_text(yaml.safe_dump(tuned_fragment(best.params, method), sort_keys=False), artifacts.TUNED)
    return TuneOutcome(study.study_name, storage, dict(best.params), best.value, best.number, best_run or None,
                       counts, n_worker_trials, extraction_source)


# ---------------------------------------------------------------- the stage


def plan(cfg: Config, settings: TuneSettings) -> list[str]:
    """What ``run`` would do, for a dry run: no weights are loaded and the storage is not opened.

    Args:
        cfg: the resolved config.
        settings: the tune settings.
    """
    space = settings.search_space(cfg)
    objective = settings.objective_spec
    val = splits_for(cfg)["val"]
    if not val:
        raise ConfigError("the val split is empty; tune scores on it: set data.val > 0 (e.g. --overrides data.val=20)")
    total = settings.total_for(space)
    stage = tunable(settings.method).stage
    cache = shared_source(stage).cache(cfg)
    extraction = (f"{stage} run {settings.source}" if settings.source else
                  f"cache {cache} ({'present' if cache.exists() else 'computed on first use'})")
    return [
        f"model: {cfg.model.alias} ({cfg.model.n_layers} layers) from {describe_source(cfg.model, cfg.runtime.cache_dir)}",
        f"study: {settings.study_name_for(cfg)} in {redacted(storage_url(settings.storage))}",
        f"objective: {objective.name} = {objective.metric} ({objective.judge} judge), {objective.direction}, "
        f"on {len(val)} val questions",
        f"search space ({settings.method}): {space.describe()}"
        + (f" = {space.n_cells} grid cells" if settings.sampler == "grid" else ""),
        f"sampler: {settings.sampler} (seed {settings.seed}); pruner: {settings.resolved_pruner()}",
        f"trials: {settings.n_trials or 'no limit'} in this worker; study total: "
        f"{f'{total} COMPLETE' if total else 'no limit'}; timeout: {f'{settings.timeout:g} s' if settings.timeout else 'none'}",
        f"{settings.tune.noun}: {extraction}",
        f"artifacts: {artifacts.TUNED}, {artifacts.TUNE_TRIALS}, {artifacts.TUNE_HISTORY}, {artifacts.TUNE_IMPORTANCE}",
    ]


def run(cfg: Config, settings: TuneSettings, *, loaded: LoadedModel | None = None) -> TuneOutcome:
    """The ``tune`` stage: run this worker's trials of the study, then log the study's best.

    Needs the active MLflow run (``tracking.stage_run("tune", cfg)``), which becomes the parent of
    this worker's trial runs. See the module docstring for the storage, sampler, budget and objectives.

    Args:
        cfg: the resolved config (model, data for the splits, extract or iti, eval, steering.positions).
        settings: the tune settings.
        loaded: the model, when the caller has it loaded; else loaded from ``cfg``.
    """
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("tune.run needs an active MLflow run: call it inside tracking.stage_run('tune', cfg)")
    from stages.pipeline import mark_stale_runs

    mark_stale_runs(parent.info.experiment_id)
    space = settings.search_space(cfg)
    objective = settings.objective_spec
    name = settings.study_name_for(cfg)
    url = storage_url(settings.storage)
    mlflow.set_tags({TAG_STUDY: name, TAG_OBJECTIVE_METRIC: objective.metric,
                     TAG_OBJECTIVE_DIRECTION: objective.direction})
    splits = splits_for(cfg)
    val = splits["val"]
    if not val:
        raise ConfigError("the val split is empty; tune scores on it: set data.val > 0 (e.g. --overrides data.val=20)")
    total = settings.total_for(space)
    tracking.log_params_once({
        "tune.objective": objective.name, "tune.metric": objective.metric, "tune.sampler": settings.sampler,
        "tune.pruner": settings.resolved_pruner(), "tune.method": settings.method,
        **{f"tune.{name}s": axis.describe() for name, axis in space.axes.items()},
        "tune.n_trials": str(settings.n_trials), "tune.total_trials": str(total),
        "tune.timeout": str(settings.timeout), "tune.seed": str(settings.seed), "tune.study_name": name,
        "tune.storage": redacted(url), "tune.heartbeat": str(settings.heartbeat),
        f"tune.{'source' if settings.tune.named else 'extract'}_run": settings.source or "none",
        "tune.n_val": str(len(val)),
    })
    loaded = loaded or load_from_config(cfg)
    from steering.layers import n_layers

    if n_layers(loaded.model) != cfg.model.n_layers:
        raise ConfigError(f"model {cfg.model.alias!r} has {n_layers(loaded.model)} layers, but its registry entry "
                          f"says n_layers={cfg.model.n_layers}; fix configs/models/{cfg.model.alias}.yaml")
    stage = tunable(settings.method).stage
    shared = shared_source(stage).read(cfg, splits["pool"], loaded, settings.source)
    vectors, source = shared.value, shared.source
    overlap = set(shared.question_ids) & {q.id for q in val}
    if overlap:
        raise ConfigError(f"{len(overlap)} val questions were used to make the {settings.tune.noun} ({source}); pass "
                          f"an {stage} run made with the same data settings (--data, --split, --overrides data.*)")
    space.check_source(vectors, f"{cfg.model.alias} has ({source})")
    mlflow.set_tag(TAG_EXTRACTION, source)
    print(f"{settings.tune.noun}: {source} ({shared.what})")
    judge = None
    if objective.generates:
        from evaluation.judges import make_judge

        judge = make_judge(objective.judge, cfg)
    scorer = TrialScorer(cfg, objective, loaded, vectors, source, judge, method=settings.method)
    storage = open_storage(url, settings.heartbeat)
    setup = study_setup(cfg, objective, val, source)
    if settings.tune.named:  # caa studies keep the setup (and key) they had before methods
        setup |= {"method": settings.method,
                  "vectors": source if source.startswith("run:") else shared_source(stage).key(cfg)}
    study = open_study(cfg, settings, space, storage, setup)
    budget = TrialBudget(total, space.grid() if settings.sampler == "grid" else None,
                         space.n_cells if settings.sampler == "grid" else 0)
    callback, callbacks = mlflow_callbacks(parent.info.experiment_id)
    stop = StopRequest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        objective_fn = make_objective(scorer, space, val, pruner=settings.resolved_pruner(), seed=settings.seed,
                                      study_name=name, stop=stop)
        tracked = callback.track_in_mlflow()(objective_fn)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    before = StudyCounts.of(study.get_trials(deepcopy=False))
    print(f"study {name} in {redacted(url)}: {before.complete} complete, {before.running} running, "
          f"{before.waiting} queued; {space.describe()}; {objective.metric} {objective.direction}")
    with stop.installed():
        ran = run_worker(study, guarded(tracked, budget, retry), budget, n_trials=settings.n_trials,
                         timeout=settings.timeout, callbacks=callbacks,
                         poll_seconds=min(max(settings.heartbeat / 4, 0.25), 10.0), stop=stop)
    if stop.signum is not None:
        mlflow.set_tag(TAG_STOPPED, f"signal {stop.signum}")
    outcome = summarise(study, objective, ran, redacted(url), source, stopped=stop.signum is not None,
                        method=settings.method)
    best = (f"best {objective.metric} {outcome.best_value:.4f} at {outcome.best_params} (trial {outcome.best_trial}, "
            f"run {outcome.best_run_id})" if outcome.best_value is not None else "no completed trial yet")
    print(f"study {name}: {outcome.counts.complete} complete ({ran} by this worker), {outcome.counts.pruned} pruned, "
          f"{outcome.counts.failed} failed; {best}")
    return outcome


__all__ = ['TuneOutcome', 'best_tags', 'plan', 'run', 'summarise', 'tuned_fragment']
