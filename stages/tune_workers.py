"""The tune stage's study and workers: opening the study, the trial budget over all workers, re-queueing the
trials of dead workers, the guarded objective and the MLflow callbacks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import mlflow
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, Trial, TrialState

from core.artifacts import (
    TRIAL_METRIC,
)
from core.config import Config, ConfigError
from core.data import Question
from core.stores import file_lock as _file_lock
from stages.tune_scoring import (
    NonFiniteObjective,
    StopRequest,
    WorkerStopped,
    extraction_key,
)
from stages.tune_space import (
    Objective,
    SearchSpace,
    make_pruner,
    make_sampler,
)
from stages.tune_storage import (
    ACTIVE,
    ATTR_FAIL_REASON,
    ATTR_SETUP,
    ATTR_SETUP_KEY,
    ATTR_SURPLUS,
    ATTR_WORKER,
    MLFLOW_RUN_ATTR,
    RetryStaleTrial,
    TuneSettings,
    has_heartbeat,
    outputs_root,
)


@dataclasses.dataclass(frozen=True)
class StudyCounts:
    """Trials of a study by state."""

    complete: int
    running: int
    waiting: int
    pruned: int
    failed: int

    @classmethod
    def of(cls, trials: Sequence[FrozenTrial]) -> StudyCounts:
        """Count ``trials`` by state, surplus ones left out.

        Args:
            trials: the study's trials.
        """
        states = [t.state for t in trials if not t.user_attrs.get(ATTR_SURPLUS)]
        return cls(*(states.count(s) for s in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING,
                                               TrialState.PRUNED, TrialState.FAIL)))


def _key(trial: FrozenTrial) -> tuple[int, int]:
    return (trial.number, trial._trial_id)


def _grid_cells(trials: Sequence[FrozenTrial], grid: dict[str, list[Any]] | None) -> dict[int, list[FrozenTrial]]:
    """Grid cell -> the trials holding it (``GridSampler``'s system attrs ``grid_id`` and ``search_space``)."""
    cells: dict[int, list[FrozenTrial]] = {}
    if grid is None:
        return cells
    for t in trials:
        if "grid_id" in t.system_attrs and t.system_attrs.get("search_space") == grid:
            cells.setdefault(int(t.system_attrs["grid_id"]), []).append(t)
    return cells


@dataclasses.dataclass(frozen=True)
class TrialBudget:
    """When a worker may start a trial, so that all workers together end at exactly ``total``.

    Args:
        total: the study's COMPLETE target; 0: none.
        grid: the grid (``SearchSpace.grid()``) when the sampler is the grid, whose cells are each
            scored once.
        n_cells: the grid's size.
    """

    total: int = 0
    grid: dict[str, list[Any]] | None = None
    n_cells: int = 0

    def decide(self, trials: Sequence[FrozenTrial]) -> Literal["start", "wait", "stop"]:
        """``start`` a trial, ``wait`` for the running ones (one may die and be re-queued), or ``stop``.

        Args:
            trials: every trial of the study, fresh from the storage.
        """
        counts = StudyCounts.of(trials)
        if self.total and counts.complete >= self.total:
            return "stop"
        if counts.waiting:
            return "start"
        if self.grid is not None:
            free = self.n_cells - len(_grid_cells(trials, self.grid))
            if free > 0 and not (self.total and counts.complete + counts.running >= self.total):
                return "start"
            return "wait" if counts.running else "stop"
        if self.total and counts.complete + counts.running >= self.total:
            return "wait"
        return "start"

    def is_surplus(self, trial: FrozenTrial, trials: Sequence[FrozenTrial]) -> bool:
        """Whether ``trial`` lost a race: the COMPLETE trials and the active ones ahead of it (lower
        number) fill the total already, or (grid) another trial holds its cell.

        Args:
            trial: the trial just asked for.
            trials: every trial of the study, fresh from the storage.
        """
        others = [t for t in trials if t._trial_id != trial._trial_id and not t.user_attrs.get(ATTR_SURPLUS)]
        if self.total:
            complete = sum(t.state == TrialState.COMPLETE for t in others)
            ahead = sum(t.state in ACTIVE and _key(t) < _key(trial) for t in others)
            if complete + ahead >= self.total:
                return True
        if self.grid is not None and "grid_id" in trial.system_attrs:
            retried = set(trial.system_attrs.get("retry_history", []))
            holders = _grid_cells(others, self.grid).get(int(trial.system_attrs["grid_id"]), [])
            return any(t.number not in retried and not (t.state in ACTIVE and _key(t) > _key(trial)) for t in holders)
        return False


def study_setup(cfg: Config, objective: Objective, val: Sequence[Question], source: str) -> dict[str, Any]:
    """What must match for two trials' values to be comparable: the model and its dtype, the
    objective, the val questions, the vectors, the steered positions, and what changes an answer
    (teacher-forcing length for ``mc``, the decoding for generating objectives).

    Args:
        cfg: the run's config.
        objective: the objective.
        val: the val questions.
        source: where the vectors come from (``shared_extraction``).
    """
    from evaluation.generation_store import decoding_key_fields

    return {"model": cfg.model.alias, "dtype": cfg.model.dtype, "objective": objective.name,
            "metric": objective.metric, "val": hashlib.sha256(",".join(q.id for q in val).encode()).hexdigest()[:16],
            "vectors": source if source.startswith("run:") else extraction_key(cfg),
            "positions": cfg.steering.positions, "max_length": cfg.extract.max_length,
            "decoding": decoding_key_fields(cfg.eval) if objective.generates else {},
            **({"scale_mode": "relative"} if cfg.steering.scale_mode == "relative" else {})}


def open_study(cfg: Config, settings: TuneSettings, space: SearchSpace, storage: BaseStorage,
               setup: dict[str, Any]) -> Study:
    """Create the study or load it (``load_if_exists``), checking that its trials are comparable.

    Args:
        cfg: the run's config.
        settings: sampler, pruner, seed, study name.
        space: the search space.
        storage: ``open_storage`` output.
        setup: what makes trial values comparable (model, objective, val split, vectors); stored in
            the study's user attrs, and a resumed study must have the same.
    """
    name = settings.study_name_for(cfg)
    objective = settings.objective_spec
    directions = [objective.direction] + (["minimize"] if settings.directions else [])
    study = optuna.create_study(storage=storage, study_name=name, directions=directions,
                                sampler=make_sampler(settings, space),
                                pruner=make_pruner(settings.resolved_pruner()), load_if_exists=True)
    if study.directions != [StudyDirection[d.upper()] for d in directions]:
        raise ConfigError(f"study {name!r} {', '.join(d.name.lower() for d in study.directions)}s, but this run "
                          f"{' and '.join(directions)}s {objective.metric} ({objective.name})"
                          f"{f' and {settings.cost}' if settings.directions else ''}; pass another --study-name")
    key = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]
    found = study.user_attrs.get(ATTR_SETUP_KEY)
    if found is None:
        study.set_user_attr(ATTR_SETUP_KEY, key)
        study.set_user_attr(ATTR_SETUP, setup)
    elif found != key:
        before = study.user_attrs.get(ATTR_SETUP, {})
        changed = sorted(k for k in set(before) | set(setup) if before.get(k) != setup.get(k))
        raise ConfigError(f"study {name!r} was run with a different {', '.join(changed) or 'setup'} "
                          f"({ {k: before.get(k) for k in changed} }); its values are not comparable with this "
                          f"run's ({ {k: setup.get(k) for k in changed} }); pass another --study-name or the same settings")
    return study


def _worker_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(trial: FrozenTrial) -> bool:
    """Whether ``trial``'s worker was a process on this machine that is gone."""
    host, _, pid = str(trial.user_attrs.get(ATTR_WORKER, "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def requeue_dead_local_trials(study: Study, requeue: Callable[[Study, FrozenTrial], None]) -> list[int]:
    """For storages without a heartbeat: fail and re-queue the RUNNING trials whose worker process
    on this machine is gone (a journal study's trials would otherwise stay RUNNING and hold their
    slot forever). A file lock keeps two workers from re-queueing the same trial.

    Args:
        study: the study.
        requeue: ``RetryStaleTrial()``.

    Returns:
        The numbers of the trials failed and re-queued.
    """
    if not any(_dead_here(t) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        return []
    done = []
    with _file_lock(outputs_root() / "tune" / "locks" / f"{study.study_name}.lock"):
        for trial in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):  # fresh, under the lock
            if _dead_here(trial):
                study.tell(trial.number, state=TrialState.FAIL)
                requeue(study, trial)
                done.append(trial.number)
    return done


def guarded(tracked: Callable[[Trial], float], budget: TrialBudget,
            retry: RetryHeartbeatStaleTrialCallback) -> Callable[[Trial], float]:
    """The function ``study.optimize`` runs: the surplus check, then the tracked objective.

    A surplus trial is pruned before it samples (and gives back its grid cell); an interrupted
    trial (Ctrl-C, SIGTERM from a scheduler) is re-queued with its params before it fails.

    Args:
        tracked: the objective inside its trial run, ``MLflowCallback.track_in_mlflow()(objective)``.
        budget: the study's trial budget.
        retry: re-queues an interrupted trial.
    """

    def run_trial(trial: Trial) -> float:
        trial.set_user_attr(ATTR_WORKER, _worker_tag())
        if budget.total or budget.grid is not None:
            frozen = trial.storage.get_trial(trial._trial_id)
            if budget.is_surplus(frozen, trial.study.get_trials(deepcopy=False)):
                trial.set_user_attr(ATTR_SURPLUS, True)
                if "grid_id" in frozen.system_attrs:  # GridSampler ignores a trial of another search space
                    trial.storage.set_trial_system_attr(trial._trial_id, "search_space", {"released": True})
                raise optuna.TrialPruned("surplus: the study's other trials fill its total already")
        try:
            return tracked(trial)
        except WorkerStopped:
            frozen = trial.storage.get_trial(trial._trial_id)
            if frozen.params:
                retry(trial.study, frozen)  # before the reason is set: the copy inherits the user attrs
                trial.set_user_attr(ATTR_FAIL_REASON, "interrupted (SIGINT or SIGTERM); re-queued with the same params")
            raise

    return run_trial


def run_worker(
    study: Study,
    run_trial: Callable[[Trial], float],
    budget: TrialBudget,
    *,
    n_trials: int,
    timeout: float,
    callbacks: Sequence[Callable[[Study, FrozenTrial], None]],
    poll_seconds: float,
    stop: StopRequest | None = None,
    requeue: Callable[[Study, FrozenTrial], None] | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Run trials one ``study.optimize`` call at a time until the budget, ``n_trials`` or ``timeout`` ends it.

    Between trials the worker fails stale trials (heartbeat), or without a heartbeat the trials of
    dead processes on this machine (``requeue_dead_local_trials``), then asks the budget: it starts a
    trial, stops, or (others' trials are running and may die) waits ``poll_seconds``. Without a
    heartbeat a dead worker elsewhere goes unnoticed, so there the worker stops instead of waiting.

    Args:
        study: the study.
        run_trial: ``guarded(...)``.
        budget: when to start, wait or stop.
        n_trials: trials this worker runs at most (surplus trials not counted); 0: no limit.
        timeout: seconds after which no trial starts; 0: no limit.
        callbacks: ``study.optimize`` callbacks.
        poll_seconds: seconds between two looks while waiting.
        stop: after a signal, no trial starts (the running one is stopped by the objective).
        requeue: re-queues a dead worker's trial, without a heartbeat; default ``RetryStaleTrial()``.
        log: where progress lines go.

    Returns:
        The number of trials this worker ran (surplus ones left out).
    """
    start, waited = time.monotonic(), False
    ran: list[int] = []  # numbers of this worker's trials, surplus ones left out

    def count(study: Study, trial: FrozenTrial) -> None:
        if not trial.user_attrs.get(ATTR_SURPLUS):
            ran.append(trial.number)

    heartbeat = has_heartbeat(study._storage)
    stop = stop or StopRequest()
    requeue = requeue or RetryStaleTrial()
    while n_trials == 0 or len(ran) < n_trials:
        if stop.signum is not None:
            log(f"stopped by signal {stop.signum} after {len(ran)} trials")
            break
        if timeout and time.monotonic() - start >= timeout:
            log(f"timeout of {timeout:g} s reached after {len(ran)} trials")
            break
        if heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        else:
            for number in requeue_dead_local_trials(study, requeue):
                log(f"trial {number} was left running by a dead process on this machine: failed and re-queued")
        decision = budget.decide(study.get_trials(deepcopy=False))
        if decision == "stop":
            break
        if decision == "wait":
            if not heartbeat:
                log("the study's remaining trials are running in other workers; this storage has no heartbeat "
                    "to notice a dead one, so this worker stops (run it again to fill in what is missing)")
                break
            if not waited:
                log("the study's remaining trials are running in other workers; waiting in case one dies")
            waited = True
            time.sleep(poll_seconds)
            continue
        waited = False
        try:
            study.optimize(run_trial, n_trials=1, catch=(NonFiniteObjective,), callbacks=[*callbacks, count])
        except WorkerStopped:
            log(f"stopped by signal {stop.signum} in a trial, which is re-queued")
            break
    return len(ran)


MLFLOW_STATUS = {TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}  # COMPLETE: the callback's FINISHED


def mlflow_callbacks(experiment_id: str, names: Sequence[str] = (TRIAL_METRIC,)
                     ) -> tuple[Any, list[Callable[[Study, FrozenTrial], None]]]:
    """optuna-integration's ``MLflowCallback`` (nested trial runs in ``experiment_id``, metric
    ``objective``) and the ``study.optimize`` callbacks: it, for every non-surplus trial, then the
    trial run's status set from the trial's state (PRUNED: KILLED, FAIL: FAILED).

    Args:
        experiment_id: the parent run's experiment.
        names: the metric name of each of the study's values (``objective``, then the cost's name).
    """
    from optuna_integration.mlflow import MLflowCallback

    with warnings.catch_warnings():  # deprecated since optuna-integration 4.9, still the integration asked for
        warnings.simplefilter("ignore", FutureWarning)
        callback = MLflowCallback(metric_name=list(names) if len(names) > 1 else names[0], create_experiment=False,
                                  mlflow_kwargs={"nested": True, "experiment_id": experiment_id})

    def log_trial(study: Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get(ATTR_SURPLUS) or MLFLOW_RUN_ATTR not in trial.system_attrs:
            return
        callback(study, trial)
        if trial.state in MLFLOW_STATUS:
            mlflow.MlflowClient().set_terminated(trial.system_attrs[MLFLOW_RUN_ATTR], MLFLOW_STATUS[trial.state])

    return callback, [log_trial]


__all__ = ['MLFLOW_STATUS', 'StudyCounts', 'TrialBudget', 'guarded', 'mlflow_callbacks', 'open_study', 'requeue_dead_local_trials', 'run_worker', 'study_setup']
