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

import mlflow
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback

from core import artifacts, tracking
from core.artifacts import (
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
from stages.tune_storage import (
    MAX_RETRY,
    TuneSettings,
    open_storage,
    redacted,
    storage_url,
)
from stages.tune_summary import TuneOutcome, best_tags, summarise, tuned_fragment
from stages.tune_workers import (
    StudyCounts,
    TrialBudget,
    guarded,
    mlflow_callbacks,
    open_study,
    run_worker,
    study_setup,
)
from steering.methods import tunable

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
        *([f"cost per trial: {settings.cost} on {cfg.effects.n_passages} neutral passages; "
           + (f"feasible when {settings.constraint_spec.describe()}" if settings.constraint_spec else
              "the second direction (minimised): the Pareto front is logged")] if settings.cost else []),
        f"trials: {settings.n_trials or 'no limit'} in this worker; study total: "
        f"{f'{total} COMPLETE' if total else 'no limit'}; timeout: {f'{settings.timeout:g} s' if settings.timeout else 'none'}",
        f"{settings.tune.noun}: {extraction}",
        *([f"warm start: the best trials of tune run {settings.warm_start}, converted to {cfg.model.n_layers} layers "
           f"and {cfg.steering.scale_mode} scale, run first"] if settings.warm_start else []),
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
                     TAG_OBJECTIVE_DIRECTION: objective.direction,
                     **({artifacts.TAG_COST: settings.cost} if settings.cost else {}),
                     **({artifacts.TAG_CONSTRAINT: settings.constraint_spec.describe()} if settings.constraint_spec else {})})
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
        "tune.n_val": str(len(val)), "tune.constraint": settings.constraint or "none",
        "tune.directions": settings.directions or "none", "tune.warm_start": settings.warm_start or "none",
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
        from evaluation.judge_loading import check_trained_judge
        from evaluation.judges import make_judge

        if objective.judge == "judge":  # the trained judge must not have learned a val question
            check_trained_judge(cfg, [q.id for q in val])
        judge = make_judge(objective.judge, cfg)
    passages: tuple[str, ...] = ()
    if settings.cost:
        from core.corpus import NEUTRAL_CORPUS, load_passages

        passages = tuple(p.text for p in load_passages(cfg.effects.corpus or NEUTRAL_CORPUS, cfg.effects.n_passages))
    scorer = TrialScorer(cfg, objective, loaded, vectors, source, judge, method=settings.method, passages=passages)
    storage = open_storage(url, settings.heartbeat)
    setup = study_setup(cfg, objective, val, source)
    if settings.tune.named:  # caa studies keep the setup (and key) they had before methods
        setup |= {"method": settings.method,
                  "vectors": source if source.startswith("run:") else shared_source(stage).key(cfg)}
    if settings.cost:  # what a cost is measured on, and what makes a trial count
        setup |= {"cost": settings.cost, "constraint": settings.constraint, "directions": settings.directions,
                  "effects": {k: v for k, v in dataclasses.asdict(cfg.effects).items() if k != "enabled"}}
    study = open_study(cfg, settings, space, storage, setup)
    if settings.warm_start:  # another model's best trials first, in this model's units
        from stages.tune_warm import warm_trials

        enqueued, lines = warm_trials(cfg, settings.warm_start, vectors, space)
        for params in enqueued:
            study.enqueue_trial(params, skip_if_exists=True)
        print("\n".join(lines))
    budget = TrialBudget(total, space.grid() if settings.sampler == "grid" else None,
                         space.n_cells if settings.sampler == "grid" else 0)
    callback, callbacks = mlflow_callbacks(parent.info.experiment_id,
                                           [TRIAL_METRIC, settings.cost] if settings.directions else [TRIAL_METRIC])
    stop = StopRequest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        objective_fn = make_objective(scorer, space, val, pruner=settings.resolved_pruner(), seed=settings.seed,
                                      study_name=name, stop=stop, cost=settings.cost,
                                      constraint=settings.constraint_spec, two_objectives=bool(settings.directions))
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
                        method=settings.method, constraint=settings.constraint_spec, cost=settings.cost,
                        scale_mode=cfg.steering.scale_mode)
    best = (f"best {objective.metric} {outcome.best_value:.4f} at {outcome.best_params} (trial {outcome.best_trial}, "
            f"run {outcome.best_run_id})" if outcome.best_value is not None else "no completed trial yet")
    print(f"study {name}: {outcome.counts.complete} complete ({ran} by this worker), {outcome.counts.pruned} pruned, "
          f"{outcome.counts.failed} failed; {best}")
    return outcome


__all__ = ['TuneOutcome', 'best_tags', 'plan', 'run', 'summarise', 'tuned_fragment']
