"""Where a tune study lives (sqlite, PostgreSQL or journal storages, with heartbeats) and the tune stage's settings."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from core.config import Config, ConfigError
from stages.tune_space import (
    OBJECTIVES,
    PRUNERS,
    SAMPLERS,
    Constraint,
    Objective,
    SearchSpace,
    parse_directions,
)
from steering.methods import tunable, tunable_methods
from steering.methods.tuning import Tunable

OUTPUTS_ENV = "TRUTHSTEER_OUTPUTS"  # evaluation.generate's store lives under it as well


DEFAULT_OUTPUTS = "outputs"


ATTR_SETUP = "truthsteer.setup"  # study user attr: what makes two trials' values comparable


ATTR_SETUP_KEY = "truthsteer.setup_key"


ATTR_FAIL_REASON = "fail_reason"


ATTR_SURPLUS = "surplus"


ATTR_WORKER = "worker"


MLFLOW_RUN_ATTR = "mlflow_run_id"  # optuna_integration.mlflow.RUN_ID_ATTRIBUTE_KEY


MAX_RETRY = 3  # re-queues of a trial whose worker died


ACTIVE = (TrialState.RUNNING, TrialState.WAITING)


def outputs_root() -> Path:
    """``$TRUTHSTEER_OUTPUTS`` (``outputs`` by default), where the default storage and the extraction cache live."""
    return Path(os.environ.get(OUTPUTS_ENV) or DEFAULT_OUTPUTS)


STORAGE_ENV = "TRUTHSTEER_STORAGE"  # the storage URL when --storage is empty: the place for one with a password


def storage_url(spec: str) -> str:
    """The storage's canonical form: an RDB URL or ``journal:PATH``.

    Args:
        spec: ``TuneSettings.storage``; "" takes ``$TRUTHSTEER_STORAGE``, else the sqlite file under the outputs.
    """
    spec = spec.strip() or os.environ.get(STORAGE_ENV, "").strip()
    if not spec:
        return f"sqlite:///{(outputs_root() / 'tune' / 'optuna.db').resolve()}"
    if spec.startswith("journal:"):
        path = spec.removeprefix("journal:")
        if not path:
            raise ConfigError("storage='journal:' names no file; write journal:PATH, e.g. journal:outputs/tune/optuna.log")
        return f"journal:{Path(path).resolve()}"
    if "://" in spec:
        return spec
    if spec.endswith(".log"):
        return f"journal:{Path(spec).resolve()}"
    if spec.endswith((".db", ".sqlite", ".sqlite3")):
        return f"sqlite:///{Path(spec).resolve()}"
    raise ConfigError(f"storage={spec!r} is not an Optuna storage; give an RDB URL (sqlite:///optuna.db, "
                      "postgresql://user@host/db), journal:PATH, a PATH ending in .log (journal) or .db (sqlite)")


def has_password(spec: str) -> bool:
    """Whether a storage spec carries a password (``postgresql://user:pass@host/db``)."""
    if "://" not in spec or spec.strip().startswith("journal:"):
        return False
    from sqlalchemy.engine import make_url

    try:
        return make_url(spec.strip()).password is not None
    except Exception:  # unparsable: let a password-like "user:x@" part count
        return "@" in spec.split("://", 1)[1].split("/", 1)[0]


def check_no_password(spec: str) -> None:
    """A password in ``--storage`` would be logged (``mlflow run`` logs its params verbatim) and shown in the
    process list: refuse it and say where it goes instead.

    Raises:
        ConfigError: naming the redacted URL and the fixes.
    """
    if has_password(spec):
        raise ConfigError(f"storage={redacted(spec.strip())} holds a password, which would be logged as a param and "
                          "shown in the process list; pass the URL without it (postgresql://user@host/db) with the "
                          f"password in PGPASSWORD or ~/.pgpass, or put the whole URL in ${STORAGE_ENV} and leave "
                          "--storage empty")


def redacted(url: str) -> str:
    """The storage without its password, for logs and params.

    Args:
        url: ``storage_url`` output.
    """
    if url.startswith("journal:") or "://" not in url:
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: RDBStorage reports it; here, log only its scheme
        return url.split("://", 1)[0] + "://***"


class RetryStaleTrial:
    """The storage's ``heartbeat_stale_trial_callback``: mark a dead worker's trial run and its worker's
    tune run KILLED in MLflow (from any host), then re-queue the trial with the same params
    (``RetryHeartbeatStaleTrialCallback``).

    Args:
        max_retry: re-queues of one trial at most.
    """

    def __init__(self, max_retry: int = MAX_RETRY) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        run_id = trial.system_attrs.get(MLFLOW_RUN_ATTR)
        if run_id:
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # the run may be in another store
                client = mlflow.MlflowClient()
                client.set_tag(run_id, ATTR_FAIL_REASON, "its worker died (no heartbeat, or its process is gone); "
                                                         "re-queued")
                client.set_terminated(run_id, "KILLED")
                # the dead worker's own tune run, on whichever host: a trial without heartbeat means its process
                # is gone, so its run would stay RUNNING until a worker started again on that host
                parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId", "")
                if parent and client.get_run(parent).info.status == "RUNNING":
                    client.set_tag(parent, ATTR_FAIL_REASON, f"its trial {trial.number} lost its heartbeat: the "
                                                             "worker died; another worker ended this run")
                    client.set_terminated(parent, "KILLED")
        self.retry(study, trial)


def open_storage(url: str, heartbeat: int = 60) -> BaseStorage:
    """An Optuna storage for ``url`` (see ``storage_url``).

    Processes that open a new storage at once are safe (``core.stores.first_open``). RDB storages get a
    heartbeat every ``heartbeat`` seconds and a grace period of twice that,
    after which a RUNNING trial is marked FAIL and re-queued (``RetryStaleTrial``). The journal
    backend has no heartbeat.

    Args:
        url: ``storage_url`` output.
        heartbeat: seconds between heartbeats; 0 turns them off.
    """
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres"):  # SQLAlchemy 2.1's default driver is psycopg 3; ours is psycopg2
        url = f"postgresql+psycopg2{sep}{rest}"
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several workers wait for the file lock
    from core.stores import first_open

    if not heartbeat:
        return first_open(url, lambda: RDBStorage(url, engine_kwargs=engine_kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return first_open(url, lambda: RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=RetryStaleTrial()))


def has_heartbeat(storage: BaseStorage) -> bool:
    """Whether ``storage`` (or the cache a study wraps it in) sends heartbeats.

    Args:
        storage: an Optuna storage, e.g. ``study._storage``.
    """
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(interval) and interval() is not None


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """How a worker runs its study (the ``tune`` entry point's flags).

    Args:
        objective: a name in ``OBJECTIVES``: ``mc`` or ``judge``.
        method: a tunable steering method (``steering.methods.tunable_methods``): ``caa`` (the steering
            layer and scale) or ``iti`` (the number of heads k and the shift alpha).
        sampler: ``tpe`` or ``grid``.
        n_trials: trials this worker runs at most; 0: no per-worker limit (needs ``total_trials``,
            the grid or ``timeout`` to end).
        total_trials: the study's COMPLETE trials over all workers at which every worker stops;
            0: no study-wide limit (the grid always stops at its size).
        timeout: seconds after which this worker starts no new trial; 0: no limit.
        storage: an RDB URL, ``journal:PATH``, a ``.log`` path (journal) or a ``.db`` path (sqlite);
            "" for ``$TRUTHSTEER_OUTPUTS/tune/optuna.db``.
        study_name: "" for ``truthsteer-<model>-<objective>`` (``truthsteer-<model>-iti-<objective>`` for iti).
        axes: the method's axis flags and their specs (``{"layers": "8:20", "scales": "0:8:2"}``,
            ``{"ks": "4,8,16,32"}``); a missing or empty flag searches the axis's default.
        seed: seeds the sampler (TPE per trial number, the grid's order).
        pruner: ``auto`` (``wilcoxon`` for ``judge`` with TPE, else none), ``wilcoxon``, ``median``, ``none``.
        heartbeat: seconds between RDB heartbeats (grace period: twice that); 0 turns them off.
        extract_run: an extract stage run whose vectors to use instead of the cache (caa).
        source_run: the run of the shared source instead of the cache: a run of the method's stage (an
            iti stage run's ranked heads for iti; for caa an extract run, the same as ``extract_run``).
        constraint: a bound on a cost of steering measured per trial on neutral text, e.g.
            ``kl_neutral<=0.5``; the study reports its best feasible trial. "" for none.
        directions: ``<objective>:max,<cost>:min`` for a two-objective study (the Pareto front), e.g.
            ``truth_info:max,kl_neutral:min``; its objective replaces ``objective``. "" for one objective.
        warm_start: a caa tune run (of any model) whose best trials this study runs first, converted to this
            model's depth and residual norm (``stages.tune_warm``). "" for none.
    """

    objective: str = "mc"
    method: str = "caa"
    sampler: str = "tpe"
    n_trials: int = 24
    total_trials: int = 0
    timeout: float = 0.0
    storage: str = ""
    study_name: str = ""
    axes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    seed: int = 0
    pruner: str = "auto"
    heartbeat: int = 60
    extract_run: str = ""
    source_run: str = ""
    constraint: str = ""
    directions: str = ""
    warm_start: str = ""

    def __post_init__(self) -> None:
        check_no_password(self.storage)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective={self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        chosen = tunable(self.method)
        for name, other in tunable_methods().items():
            flags = [a.flag for a in other.tune.axes]  # type: ignore[union-attr]  # tunable
            if name != self.method and any(self.axes.get(flag) for flag in flags):
                raise ConfigError(f"{' and '.join(flags)} are {name}'s axes, but method={self.method}; "
                                  f"pass --method {name}, or drop {'/'.join(f'--{f}' for f in flags)}")
        unknown = set(self.axes) - {a.flag for m in tunable_methods().values() for a in m.tune.axes}  # type: ignore[union-attr]
        if unknown:
            raise ConfigError(f"{', '.join(sorted(unknown))} is not an axis of any tunable method")
        if chosen.stage != "extract" and self.extract_run:
            raise ConfigError(f"extract_run holds CAA vectors, but method={self.method} steers "
                              f"{chosen.tune.noun}; pass the {chosen.stage} stage run as "  # type: ignore[union-attr]
                              f"--source-run <run id> (or neither, to make them in the tune cache)")
        if self.extract_run and self.source_run and self.extract_run != self.source_run:
            raise ConfigError(f"extract_run={self.extract_run} and source_run={self.source_run} differ; for caa "
                              "they name the same extract run: pass one of them")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler={self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner={self.pruner!r} is not one of {', '.join(PRUNERS)}")
        for key in ("n_trials", "total_trials", "seed", "heartbeat"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{key}={value!r} must be an integer >= 0")
        if not math.isfinite(self.timeout) or self.timeout < 0:
            raise ConfigError(f"timeout={self.timeout!r} must be a number of seconds >= 0 (0: no limit)")
        if self.n_trials == 0 and self.total_trials == 0 and self.sampler != "grid" and self.timeout == 0:
            raise ConfigError("n_trials=0 (no per-worker limit) would run forever: give --total-trials, "
                              "--timeout or --sampler grid, or n_trials > 0")
        if self.constraint:
            Constraint.parse(self.constraint)
        if self.directions:
            objective, _ = parse_directions(self.directions)
            if self.objective not in ("mc", objective.name):
                raise ConfigError(f"objective={self.objective} and directions={self.directions} name two objectives; "
                                  f"drop --objective (directions names it: {objective.name})")
            if self.pruner in ("wilcoxon", "median"):
                raise ConfigError(f"pruner={self.pruner}: Optuna prunes single-objective studies only; "
                                  "use --pruner none (or auto) with --directions")
        if self.warm_start and (self.method != "caa" or self.sampler == "grid"):
            raise ConfigError(f"warm_start={self.warm_start} converts caa's layer and scale into the trials a sampler "
                              f"runs first; it needs --method caa and --sampler tpe (not {self.method}, "
                              f"{self.sampler}), or drop --warm-start")
        if self.sampler == "grid" and self.pruner in ("wilcoxon", "median"):
            raise ConfigError(f"pruner={self.pruner} with the grid sampler would leave pruned cells unscored; "
                              "use --pruner none (or auto) with --sampler grid")

    @property
    def objective_spec(self) -> Objective:
        """The objective: the first of ``directions`` when given, else ``objective``."""
        return parse_directions(self.directions)[0] if self.directions else OBJECTIVES[self.objective]

    @property
    def cost(self) -> str:
        """The cost of steering each trial measures (the second direction, or the constraint's); "" for none."""
        if self.directions:
            return parse_directions(self.directions)[1]
        return Constraint.parse(self.constraint).metric if self.constraint else ""

    @property
    def constraint_spec(self) -> Constraint | None:
        return Constraint.parse(self.constraint) if self.constraint else None

    def resolved_pruner(self) -> str:
        """The pruner in use: ``auto`` is ``wilcoxon`` for a generating objective under TPE with one direction,
        else ``none``."""
        if self.pruner != "auto":
            return self.pruner
        generating = self.objective_spec.generates and not self.directions
        return "wilcoxon" if generating and self.sampler == "tpe" else "none"

    @property
    def source(self) -> str:
        """The run of the shared source (an extract run for caa, an iti run for iti); "" for the cache."""
        return self.source_run or self.extract_run

    @property
    def tune(self) -> Tunable:
        """How the method is searched (``steering.methods.tuning``)."""
        tune = tunable(self.method).tune
        assert tune is not None  # tunable() made sure
        return tune

    @property
    def label(self) -> str:
        """``<method>-<objective>`` (``<objective>`` for caa, whose studies predate methods), then
        ``-pareto-<cost>`` for two directions or ``-<constraint>`` for a constraint."""
        objective = self.objective_spec.name
        label = f"{self.method}-{objective}" if self.tune.named else objective
        if self.directions:
            return f"{label}-pareto-{self.cost}"
        return f"{label}-{self.constraint_spec.describe()}" if self.constraint_spec else label

    def study_name_for(self, cfg: Config) -> str:
        return self.study_name or f"{STUDY_PREFIX}-{cfg.model.alias}-{self.label}"

    def search_space(self, cfg: Config) -> SearchSpace:
        """The method's axes (caa: layer and scale; iti: k and alpha), checked against the model (and for
        the grid, finite); a bound that depends on the shared source (ITI's ranked heads) is checked once
        it is read (``SearchSpace.check_source``).

        Args:
            cfg: the run's config (its model's depth and default layer).
        """
        specs = dict(self.axes)
        if cfg.steering.scale_mode == "relative":  # relative scales have their own sensible range
            for axis in self.tune.axes:
                if axis.relative_default is not None and not specs.get(axis.flag):
                    specs[axis.flag] = axis.relative_default(cfg.model, self.sampler)
        space = SearchSpace.of(self.method, specs, cfg.model, self.sampler)
        if self.sampler == "grid":
            space.grid()  # raises for a continuous axis
        return space

    def total_for(self, space: SearchSpace) -> int:
        """The study-wide COMPLETE target: ``total_trials``, capped by the grid's size for the grid."""
        if self.sampler == "grid":
            return min(self.total_trials, space.n_cells) if self.total_trials else space.n_cells
        return self.total_trials


STUDY_PREFIX = "truthsteer"


__all__ = ['ACTIVE', 'ATTR_FAIL_REASON', 'ATTR_SETUP', 'ATTR_SETUP_KEY', 'ATTR_SURPLUS', 'ATTR_WORKER', 'DEFAULT_OUTPUTS', 'MAX_RETRY', 'STORAGE_ENV', 'check_no_password', 'has_password', 'MLFLOW_RUN_ATTR', 'OUTPUTS_ENV', 'RetryStaleTrial', 'STUDY_PREFIX', 'TuneSettings', 'has_heartbeat', 'open_storage', 'outputs_root', 'redacted', 'storage_url']
