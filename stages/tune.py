"""Optuna studies of the CAA steering layer and scale: one study per (model, objective).

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

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import mlflow
import optuna
import torch
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import GridSampler, RandomSampler, TPESampler
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, Trial, TrialState

from core import artifacts, tracking
from core.artifacts import (
    TAG_BEST_LAYER,
    TAG_BEST_RUN,
    TAG_BEST_SCALE,
    TAG_BEST_TRIAL,
    TAG_EXTRACTION,
    TAG_OBJECTIVE_DIRECTION,
    TAG_OBJECTIVE_METRIC,
    TAG_STOPPED,
    TAG_STUDY,
    TRIAL_METRIC,
    TRIAL_STAGE,
)
from core.config import Config, ConfigError, ModelSpec, config_to_dict
from core.data import Question, file_sha256, is_local_source, splits_for
from core.models import TORCH_DTYPES, LoadedModel, describe_source, load_from_config
from stages.extract import load_extraction
from steering.extract import Extraction, contrastive_pairs, extract_caa

OUTPUTS_ENV = "TRUTHSTEER_OUTPUTS"  # evaluation.generate's store lives under it as well
DEFAULT_OUTPUTS = "outputs"
STUDY_PREFIX = "truthsteer"
SAMPLERS = ("tpe", "grid")
PRUNERS = ("auto", "wilcoxon", "median", "none")
ATTR_SETUP = "truthsteer.setup"  # study user attr: what makes two trials' values comparable
ATTR_SETUP_KEY = "truthsteer.setup_key"
ATTR_FAIL_REASON = "fail_reason"
ATTR_SURPLUS = "surplus"
ATTR_WORKER = "worker"
MLFLOW_RUN_ATTR = "mlflow_run_id"  # optuna_integration.mlflow.RUN_ID_ATTRIBUTE_KEY
MAX_RETRY = 3  # re-queues of a trial whose worker died
PRUNING_CHUNK = 8  # questions scored between two pruning checks
DEFAULT_SCALES = {"tpe": "0:8", "grid": "0:8:2"}
EXTRACTION_CACHE_VERSION = 1
ACTIVE = (TrialState.RUNNING, TrialState.WAITING)


class NonFiniteObjective(ValueError):
    """A trial's objective was NaN or infinite; the trial fails (never counts as 0)."""


class WorkerStopped(KeyboardInterrupt):
    """A SIGINT/SIGTERM asked the worker to stop; raised only at a safe point between two chunks."""


class StopRequest:
    """Graceful stops: the first SIGINT or SIGTERM only sets ``signum``; the running trial stops at
    its next chunk boundary (``check``) and is re-queued, and no trial starts after it. A second
    signal raises ``KeyboardInterrupt`` at once, as without this handler.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {signum} (second)")
        self.signum = signum
        print(f"signal {signum}: stopping after the running chunk; the running trial is re-queued "
              "(signal again to stop at once)", flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle SIGINT and SIGTERM inside the block (in the main thread; elsewhere, nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def check(self) -> None:
        """Raise ``WorkerStopped`` when a signal came."""
        if self.signum is not None:
            raise WorkerStopped(f"signal {self.signum}")


# ---------------------------------------------------------------- objectives


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a study optimises: a judge's metric on the val split, per question.

    Args:
        name: the ``--objective`` name.
        judge: the registered judge that scores the trial.
        metric: the judge metric averaged over the val questions.
        generates: whether the judge scores generated answers (else the teacher-forced model).
    """

    name: str
    judge: str
    metric: str
    generates: bool

    @property
    def higher_is_better(self) -> bool:
        """The metric's ``higher_is_better``, as the judge registry declares it."""
        from evaluation.judges import metric_directions

        directions = metric_directions()
        if self.metric not in directions:
            raise ConfigError(f"objective {self.name!r}: metric {self.metric!r} is not registered by any judge; "
                              f"registered: {', '.join(sorted(directions))}")
        return directions[self.metric]

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        return "maximize" if self.higher_is_better else "minimize"


OBJECTIVES = {
    "mc": Objective("mc", judge="mc", metric="mc2", generates=False),
    "judge": Objective("judge", judge="semantic", metric="semantic_diff", generates=True),
}


# ---------------------------------------------------------------- the search space


def _number(name: str, text: str, integer: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} value {text!r} is not a number; write e.g. "
                          f"{'8:20 or 6,9,12' if integer else '0.5:8 or 1,2,4'}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} value {text!r} must be finite")
    if integer and not value.is_integer():
        raise ConfigError(f"{name} value {text!r} must be an integer layer index, e.g. 8:20 or 6,9,12")
    return value


@dataclasses.dataclass(frozen=True)
class Axis:
    """One searched parameter: a range (``low:high``, optionally ``:step``) or a list of values.

    Args:
        name: the Optuna param name (``layer`` or ``scale``).
        integer: whether values are ints (layers).
        low: range start (inclusive); None for a list.
        high: range end (inclusive); None for a list.
        step: range step; None for a continuous float range (ints step by 1).
        choices: the values of a list; empty for a range.
    """

    name: str
    integer: bool
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.choices:
            if self.low is not None or self.high is not None or self.step is not None:
                raise ConfigError(f"{self.name}: give a range or a list of values, not both")
            return
        if self.low is None or self.high is None:
            raise ConfigError(f"{self.name}: a range needs low and high, e.g. 8:20")
        if self.low > self.high:
            raise ConfigError(f"{self.name} range {self.low:g}:{self.high:g} is empty; write low:high with low <= high")
        if self.step is not None and self.step <= 0:
            raise ConfigError(f"{self.name} step {self.step:g} must be > 0")

    @classmethod
    def parse(cls, name: str, text: str, *, integer: bool) -> Axis:
        """``low:high``, ``low:high:step``, ``a,b,c`` or one value.

        Args:
            name: the param name.
            text: the spec.
            integer: ints only (layers).
        """
        text = text.strip()
        if not text:
            raise ConfigError(f"{name} spec is empty; write low:high, low:high:step or a,b,c")
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3):
                raise ConfigError(f"{name} spec {text!r} must be low:high or low:high:step")
            low, high = (_number(name, p, integer) for p in parts[:2])
            step = _number(name, parts[2], integer) if len(parts) == 3 else None
            return cls(name, integer, low, high, step)
        values = tuple(dict.fromkeys(_number(name, p, integer) for p in text.split(",") if p.strip()))
        if not values:
            raise ConfigError(f"{name} spec {text!r} holds no value")
        return cls(name, integer, choices=values)

    def _cast(self, value: float) -> float | int:
        return int(value) if self.integer else float(value)

    @property
    def finite(self) -> bool:
        """Whether the axis has finitely many values (a list, a stepped or an int range)."""
        return bool(self.choices) or self.integer or self.step is not None

    def values(self) -> list[float | int]:
        """Every value, for the grid; a continuous float range has none to list.

        Raises:
            ConfigError: the axis is a float range without a step.
        """
        if self.choices:
            return [self._cast(v) for v in self.choices]
        if not self.finite or self.low is None or self.high is None:
            raise ConfigError(f"the grid needs finitely many {self.name} values, but {self.describe()} is continuous; "
                              f"give a step (e.g. {self.low:g}:{self.high:g}:1) or a list (e.g. 0.5,1,2,4)")
        step = self.step or 1.0
        count = math.floor((self.high - self.low) / step + 1e-9) + 1
        return [self._cast(round(self.low + k * step, 10)) for k in range(count)]

    def bounds(self) -> tuple[float, float]:
        """The smallest and largest value."""
        if self.choices:
            return min(self.choices), max(self.choices)
        if self.low is None or self.high is None:
            raise ConfigError(f"{self.name}: a range needs low and high")
        return self.low, self.high

    def suggest(self, trial: Trial) -> float | int:
        """Ask ``trial`` for a value: categorical for a list, int/float (stepped) for a range.

        Args:
            trial: the running trial.
        """
        if self.choices:
            return self._cast(trial.suggest_categorical(self.name, [self._cast(v) for v in self.choices]))
        low, high = self.bounds()
        if self.integer:
            return trial.suggest_int(self.name, int(low), int(high), step=int(self.step or 1))
        return trial.suggest_float(self.name, low, high, step=self.step)

    def describe(self) -> str:
        if self.choices:
            return ",".join(f"{v:g}" for v in self.choices)
        low, high = self.bounds()
        return f"{low:g}:{high:g}" + (f":{self.step:g}" if self.step is not None else "")


def default_layers(spec: ModelSpec) -> str:
    """A band of about half the depth, centred on the model's default layer (its
    ``layer_fraction`` of the depth), clipped to the model: ``8:22`` for a 30-layer model.

    Args:
        spec: the model's registry entry.
    """
    centre, half = spec.default_layer, max(1, spec.n_layers // 4)
    return f"{max(0, centre - half)}:{min(spec.n_layers - 1, centre + half)}"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The layer and scale axes of a study.

    Args:
        layer: the steering layer axis (ints in ``[0, n_layers)``).
        scale: the steering scale axis (floats).
    """

    layer: Axis
    scale: Axis

    def check(self, spec: ModelSpec) -> None:
        """Every layer must exist in ``spec``'s model."""
        low, high = self.layer.bounds()
        if low < 0 or high >= spec.n_layers:
            raise ConfigError(f"layers={self.layer.describe()} must lie in [0, {spec.n_layers}) for {spec.alias}, "
                              f"which has {spec.n_layers} decoder layers; e.g. layers={default_layers(spec)}")

    def grid(self) -> dict[str, list[float | int]]:
        """``{"layer": [...], "scale": [...]}``, sorted by name as ``GridSampler`` stores it."""
        return {"layer": self.layer.values(), "scale": self.scale.values()}

    @property
    def n_cells(self) -> int:
        grid = self.grid()
        return len(grid["layer"]) * len(grid["scale"])

    def describe(self) -> str:
        return f"layer {self.layer.describe()} x scale {self.scale.describe()}"


# ---------------------------------------------------------------- settings


def outputs_root() -> Path:
    """``$TRUTHSTEER_OUTPUTS`` (``outputs`` by default), where the default storage and the extraction cache live."""
    return Path(os.environ.get(OUTPUTS_ENV) or DEFAULT_OUTPUTS)


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """How a worker runs its study (the ``tune`` entry point's flags).

    Args:
        objective: a name in ``OBJECTIVES``: ``mc`` or ``judge``.
        sampler: ``tpe`` or ``grid``.
        n_trials: trials this worker runs at most; 0: no per-worker limit (needs ``total_trials``,
            the grid or ``timeout`` to end).
        total_trials: the study's COMPLETE trials over all workers at which every worker stops;
            0: no study-wide limit (the grid always stops at its size).
        timeout: seconds after which this worker starts no new trial; 0: no limit.
        storage: an RDB URL, ``journal:PATH``, a ``.log`` path (journal) or a ``.db`` path (sqlite);
            "" for ``$TRUTHSTEER_OUTPUTS/tune/optuna.db``.
        study_name: "" for ``truthsteer-<model>-<objective>``.
        layers: the layer spec (``8:20``, ``8:20:2``, ``6,9,12``); "" for ``default_layers``.
        scales: the scale spec (``0.5:8``, ``0:8:2``, ``1,2,4``); "" for ``DEFAULT_SCALES``.
        seed: seeds the sampler (TPE per trial number, the grid's order).
        pruner: ``auto`` (``wilcoxon`` for ``judge`` with TPE, else none), ``wilcoxon``, ``median``, ``none``.
        heartbeat: seconds between RDB heartbeats (grace period: twice that); 0 turns them off.
        extract_run: an extract stage run whose vectors to use instead of the cache.
    """

    objective: str = "mc"
    sampler: str = "tpe"
    n_trials: int = 24
    total_trials: int = 0
    timeout: float = 0.0
    storage: str = ""
    study_name: str = ""
    layers: str = ""
    scales: str = ""
    seed: int = 0
    pruner: str = "auto"
    heartbeat: int = 60
    extract_run: str = ""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective={self.objective!r} is not one of {', '.join(OBJECTIVES)}")
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
        if self.sampler == "grid" and self.pruner in ("wilcoxon", "median"):
            raise ConfigError(f"pruner={self.pruner} with the grid sampler would leave pruned cells unscored; "
                              "use --pruner none (or auto) with --sampler grid")

    @property
    def objective_spec(self) -> Objective:
        return OBJECTIVES[self.objective]

    def resolved_pruner(self) -> str:
        """The pruner in use: ``auto`` is ``wilcoxon`` for the judge objective under TPE, else ``none``."""
        if self.pruner != "auto":
            return self.pruner
        return "wilcoxon" if self.objective == "judge" and self.sampler == "tpe" else "none"

    def study_name_for(self, cfg: Config) -> str:
        return self.study_name or f"{STUDY_PREFIX}-{cfg.model.alias}-{self.objective}"

    def search_space(self, cfg: Config) -> SearchSpace:
        """The layer and scale axes, checked against the model (and for the grid, finite).

        Args:
            cfg: the run's config (its model's depth and default layer).
        """
        space = SearchSpace(
            Axis.parse("layer", self.layers or default_layers(cfg.model), integer=True),
            Axis.parse("scale", self.scales or DEFAULT_SCALES[self.sampler], integer=False),
        )
        space.check(cfg.model)
        if self.sampler == "grid":
            space.grid()  # raises for a continuous axis
        return space

    def total_for(self, space: SearchSpace) -> int:
        """The study-wide COMPLETE target: ``total_trials``, capped by the grid's size for the grid."""
        if self.sampler == "grid":
            return min(self.total_trials, space.n_cells) if self.total_trials else space.n_cells
        return self.total_trials


# ---------------------------------------------------------------- storages


def storage_url(spec: str) -> str:
    """The storage's canonical form: an RDB URL or ``journal:PATH``.

    Args:
        spec: ``TuneSettings.storage``.
    """
    spec = spec.strip()
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
                      "postgresql://user:pass@host/db), journal:PATH, a PATH ending in .log (journal) or .db (sqlite)")


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
    """The storage's ``heartbeat_stale_trial_callback``: mark a dead worker's trial run KILLED in
    MLflow, then re-queue the trial with the same params (``RetryHeartbeatStaleTrialCallback``).

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
        self.retry(study, trial)


def open_storage(url: str, heartbeat: int = 60) -> BaseStorage:
    """An Optuna storage for ``url`` (see ``storage_url``).

    RDB storages get a heartbeat every ``heartbeat`` seconds and a grace period of twice that,
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
    if not heartbeat:
        return RDBStorage(url, engine_kwargs=engine_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                          heartbeat_stale_trial_callback=RetryStaleTrial())


def has_heartbeat(storage: BaseStorage) -> bool:
    """Whether ``storage`` (or the cache a study wraps it in) sends heartbeats.

    Args:
        storage: an Optuna storage, e.g. ``study._storage``.
    """
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(interval) and interval() is not None


# ---------------------------------------------------------------- samplers and pruners


class TrialSeededTPESampler(TPESampler):
    """TPE (multivariate, constant liar) whose randomness in trial ``n`` depends only on ``(seed, n)``.

    One worker is reproducible from its seed, and concurrent workers (all with the same seed) do
    not propose the same startup points, as one shared seed per process would make them.

    Args:
        seed: the study's seed.
    """

    def __init__(self, seed: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            super().__init__(seed=seed, multivariate=True, constant_liar=True)
        self._base_seed = seed

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        super().before_trial(study, trial)
        # Hashed: Mersenne Twister streams of consecutive small seeds start with similar draws.
        trial_seed = int.from_bytes(hashlib.sha256(f"{self._base_seed}/{trial.number}".encode()).digest()[:4], "big")
        # What TPESampler.reseed_rng reseeds, with a seed instead of OS entropy.
        self._rng = LazyRandomState(trial_seed)
        self._random_sampler = RandomSampler(seed=trial_seed)


def make_sampler(settings: TuneSettings, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """TPE seeded per trial, or the grid over ``space`` in the order ``seed`` shuffles it.

    Args:
        settings: the sampler name and seed.
        space: the search space.
    """
    if settings.sampler == "grid":
        return GridSampler(space.grid(), seed=settings.seed)
    return TrialSeededTPESampler(settings.seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """``wilcoxon`` (per-question values), ``median`` (running means) or none.

    Args:
        name: ``TuneSettings.resolved_pruner()``.
    """
    if name == "wilcoxon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=PRUNING_CHUNK)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=PRUNING_CHUNK)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------- the shared extraction


def extraction_key(cfg: Config) -> str:
    """What decides a cached all-layer extraction: the model, the data and extract sections, the
    extraction dtype and (for a local file) the data's sha256; 16 hex digits.

    Args:
        cfg: the run's config.
    """
    full = config_to_dict(cfg)
    fields = {"version": EXTRACTION_CACHE_VERSION, "model": full["model"], "data": full["data"],
              "extract": full["extract"], "dtype": cfg.extract_dtype,
              "data_sha256": file_sha256(cfg.data.source) if is_local_source(cfg.data.source) else ""}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def extraction_cache_dir(cfg: Config) -> Path:
    """``$TRUTHSTEER_OUTPUTS/tune/extractions/<model>-<extraction key>/``, an artifact root that
    ``extract.load_extraction`` reads.

    Args:
        cfg: the run's config.
    """
    return outputs_root() / "tune" / "extractions" / f"{cfg.model.alias}-{extraction_key(cfg)}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_extraction(extraction: Extraction, root: Path) -> None:
    """Write ``extraction`` as the extract stage lays it out (``CAA_TENSORS``, ``CAA_META``) under
    ``root``, atomically: a reader sees the whole folder or none.

    Args:
        extraction: what ``extract_caa`` returned.
        root: the folder to write (replaced if present).
    """
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    vectors = extraction.steering_vectors()
    meta = {**vectors.to_meta(), "question_ids": list(extraction.question_ids),
            "n_examples": extraction.n_examples, "n_valid_by_layer": extraction.n_valid.tolist()}
    tensors = {"vectors": extraction.vectors, "diffs": extraction.diffs,  # (n_layers, d_model), (n, n_layers, d_model)
               "valid": extraction.valid.to(torch.uint8)}  # (n_examples, n_layers)
    artifacts.save_tensors(tmp / artifacts.CAA_TENSORS, tmp / artifacts.CAA_META, tensors, meta)
    shutil.rmtree(root, ignore_errors=True)  # a torn folder from a killed writer
    os.replace(tmp, root)


def shared_extraction(
    cfg: Config,
    pool: Sequence[Question],
    loaded: LoadedModel,
    *,
    extract_run: str = "",
) -> tuple[Extraction, str]:
    """The all-layer extraction every trial steers with, and where it came from.

    From ``extract_run`` when given; else from the cache folder (``extraction_cache_dir``), computed
    there from the pool split when missing. Workers on one machine compute it once: the first takes
    a file lock and the others wait for it, then read.

    Args:
        cfg: the run's config (model, data, extract sections).
        pool: the pool split's questions, for the contrastive pairs.
        loaded: the model, used for the extraction when its dtype is ``cfg.extract_dtype``.
        extract_run: an extract stage run id.

    Returns:
        The extraction and its source: ``run:<id>``, ``cache`` (read) or ``computed`` (written now).
    """
    if extract_run:
        extraction = load_extraction(extract_run)
        if extraction.model != cfg.model.alias:
            raise ConfigError(f"extract run {extract_run} holds the extraction of {extraction.model!r}, not "
                              f"{cfg.model.alias!r}; pass an extract run of {cfg.model.alias}")
        return extraction, f"run:{extract_run}"
    root = extraction_cache_dir(cfg)
    with _file_lock(root.with_name(f"{root.name}.lock")):
        if (root / artifacts.CAA_TENSORS).exists():
            return load_extraction(root), "cache"
        pairs = contrastive_pairs(pool, cfg.extract.pairs_per_question, cfg.data.seed)
        same_dtype = loaded.dtype == TORCH_DTYPES[cfg.extract_dtype]
        extractor = loaded if same_dtype else load_from_config(cfg, dtype=cfg.extract_dtype)
        extraction = extract_caa(extractor, pairs, batch_size=cfg.extract.batch_size,
                                 max_length=cfg.extract.max_length, nan_threshold=cfg.extract.nan_threshold)
        extraction = dataclasses.replace(extraction, provenance={
            "stage": "tune", "extraction_key": extraction_key(cfg), "dtype": cfg.extract_dtype,
            "code_version": tracking.code_version()})
        save_extraction(extraction, root)
        return extraction, "computed"


# ---------------------------------------------------------------- scoring one setting


@dataclasses.dataclass(frozen=True, eq=False)
class TrialScorer:
    """Scores a (layer, scale) setting on questions, with the model and judge loaded once.

    Args:
        cfg: the run's config (eval batch size and decoding, extract max_length, steering positions).
        objective: what is scored.
        loaded: the main model.
        vectors: ``(n_layers, d_model)`` CAA vectors.
        source: where the vectors came from (enters the steering's identity).
        judge: the judge of a generating objective (``make_judge(objective.judge, cfg)``); None for ``mc``.
    """

    cfg: Config
    objective: Objective
    loaded: LoadedModel
    vectors: torch.Tensor
    source: str
    judge: Any = None

    def steering(self, layer: int, scale: float) -> Any:
        """The CAA steering ``vectors[layer] * scale`` from each row's last prompt token (or as configured)."""
        from steering.methods.intervention import Steering

        return Steering("caa", layer=layer, scale=scale, vector=self.vectors[layer],  # (d_model,)
                        positions=self.cfg.steering.positions, source_run=self.source)

    def score(self, questions: Sequence[Question], layer: int, scale: float, batch_index: int = 0) -> list[dict[str, Any]]:
        """One judge row per question (the objective metric among its fields).

        Args:
            questions: the questions to score.
            layer: the steered decoder layer.
            scale: the steering scale.
            batch_index: the chunk's index, which seeds sampling when ``eval.do_sample``.
        """
        from evaluation.judges import JudgeItem

        steering = self.steering(layer, scale)
        if not self.objective.generates:
            from evaluation.mc import MCJudge

            judge = MCJudge.from_config(self.cfg).bind(self.loaded, steering)
            return judge.score([JudgeItem.from_question(q, "") for q in questions])
        from evaluation.generate import DecodingParams, generate_batch

        answers = generate_batch(self.loaded, [q.question for q in questions], steering,
                                 DecodingParams.from_config(self.cfg), batch_index=batch_index)
        return self.judge.score([JudgeItem.from_question(q, a.text) for q, a in zip(questions, answers, strict=True)])


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _finite_or_fail(trial: Trial, values: Sequence[float], order: Sequence[int], questions: Sequence[Question],
                    metric: str, layer: int, scale: float) -> None:
    bad = [questions[i].id for i, v in zip(order, values, strict=True) if not math.isfinite(v)]
    if bad:
        reason = (f"{metric} is not finite for {len(bad)} of {len(values)} questions (first: {bad[0]}) at layer "
                  f"{layer}, scale {scale:g}: the steered activations overflowed; lower the scale range or use a "
                  "wider dtype (float32/bfloat16)")
        trial.set_user_attr(ATTR_FAIL_REASON, reason)
        raise NonFiniteObjective(reason)


def make_objective(
    scorer: TrialScorer,
    space: SearchSpace,
    questions: Sequence[Question],
    *,
    pruner: str,
    seed: int,
    study_name: str,
    stop: StopRequest | None = None,
) -> Callable[[Trial], float]:
    """The Optuna objective: suggest (layer, scale), score every question, return the mean.

    With a pruner, questions are scored in chunks of ``PRUNING_CHUNK`` in an order shuffled per
    trial (``WilcoxonPruner``'s advice); each question's value is reported at the step of its index
    in ``questions`` (``median``: the running mean at the step of the count so far), and the trial
    is pruned when the pruner says so. Runs inside the trial's MLflow run (``track_in_mlflow``).

    Args:
        scorer: the model, vectors and judge.
        space: the search space.
        questions: the val split.
        pruner: ``wilcoxon``, ``median`` or ``none``.
        seed: seeds the per-trial question order.
        study_name: tagged on the trial's run.
        stop: checked before the first and between chunks (a stopped trial is re-queued by ``guarded``).
    """
    metric = scorer.objective.metric
    stop = stop or StopRequest()

    def objective(trial: Trial) -> float:
        tick = time.perf_counter()
        mlflow.set_tags({artifacts.TAG_STAGE: TRIAL_STAGE, artifacts.TAG_MODEL: scorer.cfg.model.alias,
                         artifacts.TAG_HOST: socket.gethostname(), artifacts.TAG_PID: str(os.getpid()),
                         TAG_STUDY: study_name, "variant": "caa"})
        layer = int(space.layer.suggest(trial))
        scale = float(space.scale.suggest(trial))
        order = list(range(len(questions)))
        if pruner != "none":
            random.Random(f"{seed}/{trial.number}").shuffle(order)
        size = PRUNING_CHUNK if pruner != "none" else scorer.cfg.eval.batch_size
        rows: list[dict[str, Any]] = []
        values: list[float] = []
        for index, chunk in enumerate(_chunks(order, size)):
            stop.check()
            chunk_rows = scorer.score([questions[i] for i in chunk], layer, scale, batch_index=index)
            chunk_values = [float(r[metric]) for r in chunk_rows]
            _finite_or_fail(trial, chunk_values, chunk, questions, metric, layer, scale)
            rows += chunk_rows
            values += chunk_values
            if pruner == "none":
                continue
            for i, value in zip(chunk, chunk_values, strict=True):
                if pruner == "wilcoxon":
                    trial.report(value, step=i)
            if pruner == "median":
                trial.report(math.fsum(values) / len(values), step=len(values))
            if len(values) < len(questions) and trial.should_prune():
                partial = math.fsum(values) / len(values)
                trial.set_user_attr("n_evaluated", len(values))
                trial.set_user_attr("partial_mean", partial)
                mlflow.log_metrics({f"{metric}_partial": partial, "n_questions": float(len(values))})
                raise optuna.TrialPruned(f"{metric} {partial:.4f} over {len(values)} of {len(questions)} questions "
                                         f"is worse than the best trial's ({pruner} pruner)")
        value = math.fsum(values) / len(values)
        metrics = {metric: value, "n_questions": float(len(values)), "trial_seconds": time.perf_counter() - tick}
        if "mc1" in rows[0] and metric != "mc1":
            metrics["mc1"] = math.fsum(float(r["mc1"]) for r in rows) / len(rows)
        mlflow.log_metrics(metrics)
        return value

    return objective


# ---------------------------------------------------------------- the study and its workers


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
    from evaluation.generate import DecodingParams

    return {"model": cfg.model.alias, "dtype": cfg.model.dtype, "objective": objective.name,
            "metric": objective.metric, "val": hashlib.sha256(",".join(q.id for q in val).encode()).hexdigest()[:16],
            "vectors": source if source.startswith("run:") else extraction_key(cfg),
            "positions": cfg.steering.positions, "max_length": cfg.extract.max_length,
            "decoding": DecodingParams.from_config(cfg).key_fields() if objective.generates else {}}


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
    study = optuna.create_study(storage=storage, study_name=name, direction=objective.direction,
                                sampler=make_sampler(settings, space),
                                pruner=make_pruner(settings.resolved_pruner()), load_if_exists=True)
    if study.direction != StudyDirection[objective.direction.upper()]:
        raise ConfigError(f"study {name!r} {study.direction.name.lower()}s, but {objective.metric} "
                          f"({objective.name}) must be {objective.direction}d; pass another --study-name")
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


def mlflow_callbacks(experiment_id: str) -> tuple[Any, list[Callable[[Study, FrozenTrial], None]]]:
    """optuna-integration's ``MLflowCallback`` (nested trial runs in ``experiment_id``, metric
    ``objective``) and the ``study.optimize`` callbacks: it, for every non-surplus trial, then the
    trial run's status set from the trial's state (PRUNED: KILLED, FAIL: FAILED).

    Args:
        experiment_id: the parent run's experiment.
    """
    from optuna_integration.mlflow import MLflowCallback

    with warnings.catch_warnings():  # deprecated since optuna-integration 4.9, still the integration asked for
        warnings.simplefilter("ignore", FutureWarning)
        callback = MLflowCallback(metric_name=TRIAL_METRIC, create_experiment=False,
                                  mlflow_kwargs={"nested": True, "experiment_id": experiment_id})

    def log_trial(study: Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get(ATTR_SURPLUS) or MLFLOW_RUN_ATTR not in trial.system_attrs:
            return
        callback(study, trial)
        if trial.state in MLFLOW_STATUS:
            mlflow.MlflowClient().set_terminated(trial.system_attrs[MLFLOW_RUN_ATTR], MLFLOW_STATUS[trial.state])

    return callback, [log_trial]


# ---------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class TuneOutcome:
    """What a worker leaves: the study's best (over every worker) and the counts.

    Args:
        study_name: the study.
        storage: the storage, password hidden.
        best_params: ``{"layer": L, "scale": S}`` of the best COMPLETE trial; None without one.
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


def tuned_fragment(best_params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The config fragment ``full --tuned`` applies: ``{"steering": {"layer": L, "scale": S}}``.

    Args:
        best_params: the best trial's params.
    """
    return {"steering": {"layer": int(best_params["layer"]), "scale": float(best_params["scale"])}}


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
        fixed = [p for p in ("layer", "scale") if len({t.params.get(p) for t in complete}) < 2]
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
              extraction_source: str, stopped: bool = False) -> TuneOutcome:
    """Tag the active (parent) run with the study's best and log its artifacts.

    Tags ``TAG_BEST_RUN``, ``TAG_BEST_TRIAL``, ``TAG_BEST_LAYER``, ``TAG_BEST_SCALE``; metrics
    ``best_<metric>``, ``n_complete``, ``n_pruned``, ``n_failed``, ``n_worker_trials``; artifacts
    ``TUNED``, ``TUNE_TRIALS``, ``TUNE_HISTORY``, ``TUNE_IMPORTANCE``.

    Args:
        study: the study, after this worker's trials.
        objective: the objective.
        n_worker_trials: trials this worker ran.
        storage: the storage, password hidden.
        extraction_source: where the vectors came from.
        stopped: a signal stopped the worker: a study without a completed trial is then no error.

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
                     TAG_BEST_LAYER: str(best.params["layer"]), TAG_BEST_SCALE: str(best.params["scale"])})
    mlflow.log_metric(f"best_{objective.metric}", float(best.value))  # type: ignore[arg-type]  # COMPLETE: a value
    mlflow.log_text(yaml.safe_dump(tuned_fragment(best.params), sort_keys=False), artifacts.TUNED)
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
    cache = extraction_cache_dir(cfg)
    extraction = (f"extract run {settings.extract_run}" if settings.extract_run else
                  f"cache {cache} ({'present' if (cache / artifacts.CAA_TENSORS).exists() else 'computed on first use'})")
    return [
        f"model: {cfg.model.alias} ({cfg.model.n_layers} layers) from {describe_source(cfg.model, cfg.runtime.cache_dir)}",
        f"study: {settings.study_name_for(cfg)} in {redacted(storage_url(settings.storage))}",
        f"objective: {objective.name} = {objective.metric} ({objective.judge} judge), {objective.direction}, "
        f"on {len(val)} val questions",
        f"search space: {space.describe()}"
        + (f" = {space.n_cells} grid cells" if settings.sampler == "grid" else ""),
        f"sampler: {settings.sampler} (seed {settings.seed}); pruner: {settings.resolved_pruner()}",
        f"trials: {settings.n_trials or 'no limit'} in this worker; study total: "
        f"{f'{total} COMPLETE' if total else 'no limit'}; timeout: {f'{settings.timeout:g} s' if settings.timeout else 'none'}",
        f"vectors: {extraction}",
        f"artifacts: {artifacts.TUNED}, {artifacts.TUNE_TRIALS}, {artifacts.TUNE_HISTORY}, {artifacts.TUNE_IMPORTANCE}",
    ]


def run(cfg: Config, settings: TuneSettings, *, loaded: LoadedModel | None = None) -> TuneOutcome:
    """The ``tune`` stage: run this worker's trials of the study, then log the study's best.

    Needs the active MLflow run (``tracking.stage_run("tune", cfg)``), which becomes the parent of
    this worker's trial runs. See the module docstring for the storage, sampler, budget and objectives.

    Args:
        cfg: the resolved config (model, data for the splits, extract, eval, steering.positions).
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
        "tune.pruner": settings.resolved_pruner(), "tune.layers": space.layer.describe(),
        "tune.scales": space.scale.describe(), "tune.n_trials": str(settings.n_trials), "tune.total_trials": str(total),
        "tune.timeout": str(settings.timeout), "tune.seed": str(settings.seed), "tune.study_name": name,
        "tune.storage": redacted(url), "tune.heartbeat": str(settings.heartbeat),
        "tune.extract_run": settings.extract_run or "none", "tune.n_val": str(len(val)),
    })
    loaded = loaded or load_from_config(cfg)
    from steering.layers import n_layers

    if n_layers(loaded.model) != cfg.model.n_layers:
        raise ConfigError(f"model {cfg.model.alias!r} has {n_layers(loaded.model)} layers, but its registry entry "
                          f"says n_layers={cfg.model.n_layers}; fix configs/models/{cfg.model.alias}.yaml")
    extraction, source = shared_extraction(cfg, splits["pool"], loaded, extract_run=settings.extract_run)
    overlap = set(extraction.question_ids) & {q.id for q in val}
    if overlap:
        raise ConfigError(f"{len(overlap)} val questions were used to extract the vectors ({source}); pass an "
                          "extract run made with the same data settings (--data, --split, --overrides data.*)")
    mlflow.set_tag(TAG_EXTRACTION, source)
    print(f"vectors: {source} ({extraction.n_examples} pairs, {extraction.n_layers} layers)")
    judge = None
    if objective.generates:
        from evaluation.judges import make_judge

        judge = make_judge(objective.judge, cfg)
    scorer = TrialScorer(cfg, objective, loaded, extraction.vectors, source, judge)  # (n_layers, d_model)
    storage = open_storage(url, settings.heartbeat)
    study = open_study(cfg, settings, space, storage, study_setup(cfg, objective, val, source))
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
    outcome = summarise(study, objective, ran, redacted(url), source, stopped=stop.signum is not None)
    best = (f"best {objective.metric} {outcome.best_value:.4f} at {outcome.best_params} (trial {outcome.best_trial}, "
            f"run {outcome.best_run_id})" if outcome.best_value is not None else "no completed trial yet")
    print(f"study {name}: {outcome.counts.complete} complete ({ran} by this worker), {outcome.counts.pruned} pruned, "
          f"{outcome.counts.failed} failed; {best}")
    return outcome


__all__ = ['Axis', 'NonFiniteObjective', 'OBJECTIVES', 'Objective', 'RetryStaleTrial', 'SearchSpace', 'StopRequest', 'StudyCounts', 'TrialBudget', 'TrialScorer', 'TrialSeededTPESampler', 'TuneOutcome', 'TuneSettings', 'WorkerStopped', 'default_layers', 'extraction_cache_dir', 'extraction_key', 'make_objective', 'open_storage', 'open_study', 'plan', 'requeue_dead_local_trials', 'run', 'run_worker', 'shared_extraction', 'storage_url', 'summarise', 'tuned_fragment']
