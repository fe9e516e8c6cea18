"""MLflow plumbing shared by every stage: the store, stage runs, config logging, artifacts."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus

from core.artifacts import TAG_CODE, TAG_HEARTBEAT, TAG_HOST, TAG_MODEL, TAG_PID, TAG_REAPED, TAG_STAGE
from core.config import Config, ConfigError
from core.config_io import config_yaml, flat_params

CONFIG_ARTIFACT = "config.yaml"
PROJECT_DIR = Path(__file__).resolve().parents[1]


def tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` when set (``mlflow run`` sets it for its run), else ``tracking.uri``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri


@functools.cache
def ensure_store(uri: str) -> str:
    """Open (and so create or migrate) the tracking store, safely when many processes start on a new one at
    once (``core.stores.first_open``); a server is probed first. Any failure is one line naming the store.

    Raises:
        ConfigError: the server is unreachable, or the store cannot be opened (a read-only or missing folder,
            a full disk, a bad URI).
    """
    from core.stores import first_open, probe_server

    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        probe_server(uri)
    try:
        first_open(uri, lambda: mlflow.MlflowClient(uri).search_experiments(max_results=1))
    except ConfigError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ConfigError(f"tracking store {uri.split('@')[-1] if '@' in uri else uri} cannot be opened: {first}; "
                          "check that its folder exists and is writable and the disk has room, or set "
                          "MLFLOW_TRACKING_URI to another store, e.g. sqlite:///mlflow.db") from None
    return uri


@functools.cache
def code_version() -> str:
    """The git commit of the project (``+dirty`` with uncommitted changes), else the package version."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_DIR,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"truthsteer-{version('truthsteer')}"
        except PackageNotFoundError:
            return "unknown"


def log_params_once(params: Mapping[str, str]) -> None:
    """Log params, skipping those already logged with the same value.

    MLflow params are write-once: a resumed run that asks for a different value fails here with
    the key and both values, rather than deep inside MLflow.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_params_once needs an active MLflow run")
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    conflicts = {k: (logged[k], v) for k, v in params.items() if k in logged and logged[k] != str(v)}
    if conflicts:
        listed = "; ".join(f"{k}: logged {a!r}, now {b!r}" for k, (a, b) in sorted(conflicts.items()))
        raise ConfigError(f"run {run.info.run_id} already has different params ({listed}); start a new run")
    todo = {k: str(v)[:6000] for k, v in params.items() if k not in logged}
    items = list(todo.items())
    for start in range(0, len(items), 100):  # MLflow's batch limit
        mlflow.log_params(dict(items[start:start + 100]))


def log_config(cfg: Config, params: Mapping[str, str] | None = None) -> None:
    """The resolved config as params (``steering.layer`` ...; `params` instead when given) and as the
    ``config.yaml`` artifact. Empty values are not logged: an unset setting has no param, not ``''``."""
    log_params_once({k: v for k, v in (flat_params(cfg) if params is None else params).items() if v != ""})
    mlflow.log_text(config_yaml(cfg), CONFIG_ARTIFACT)


@contextmanager
def tracked_run(stage: str, *, run_name: str, experiment: str = "", experiment_id: str = "",
                tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start (or join, under ``mlflow run``) a run tagged with its stage, the code version, this host
    and this process, nested under an active run when there is one.

    The run ends FINISHED, FAILED on an exception, or KILLED on Ctrl-C/SIGTERM; it is never left
    RUNNING by an exception in the body, and a later ``full`` marks it KILLED if its process dies (on another
    host: once its ``truthsteer.heartbeat`` tag, refreshed every minute while the body runs, is a lease old).

    Args:
        stage: tagged as ``truthsteer.stage``.
        run_name: the run's name.
        experiment: experiment name for a top-level run (ignored when nested or under ``mlflow run``).
        experiment_id: experiment id, instead of ``experiment``.
        tags: extra tags.
    """
    nested = mlflow.active_run() is not None
    if not nested and "MLFLOW_RUN_ID" not in os.environ:
        if experiment_id:
            mlflow.set_experiment(experiment_id=experiment_id)
        elif experiment:  # processes that start together all create it: one wins, the others retry and find it
            from core.stores import first_open

            first_open("", lambda: mlflow.set_experiment(experiment))
    all_tags = {TAG_STAGE: stage, TAG_CODE: code_version(), TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()),
                TAG_HEARTBEAT: f"{time.time():.0f}", **(tags or {})}
    beat_every = heartbeat_seconds()  # a bad setting fails before the run exists
    run = mlflow.start_run(run_name=run_name, nested=nested, tags=all_tags)
    if not nested:
        reap_unstarted_launches(run.info.experiment_id, own=run.info.run_id)
    try:
        with heartbeat(run.info.run_id, beat_every):
            yield run
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


HEARTBEAT_ENV = "TRUTHSTEER_HEARTBEAT_SECONDS"
HEARTBEAT_SECONDS = 60.0
LEASE_ENV = "TRUTHSTEER_LEASE_SECONDS"
LEASE_SECONDS = 600.0  # a run of another host whose heartbeat is older than this is dead (ten missed beats)


def _seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{name}={text!r} must be > 0 seconds")
    return value


def heartbeat_seconds() -> float:
    """Seconds between two heartbeats of a run (``$TRUTHSTEER_HEARTBEAT_SECONDS``, 60 by default)."""
    return _seconds(HEARTBEAT_ENV, HEARTBEAT_SECONDS)


def lease_seconds() -> float:
    """How old another host's heartbeat may be before its run counts as dead (``$TRUTHSTEER_LEASE_SECONDS``, 600)."""
    return _seconds(LEASE_ENV, LEASE_SECONDS)


@contextmanager
def heartbeat(run_id: str, every: float | None = None) -> Iterator[None]:
    """Refresh the run's ``truthsteer.heartbeat`` tag (unix seconds) every ``every`` seconds from a daemon thread
    while the block runs: a later run on another host reaps this one only once the beats have stopped for a lease
    (``stages.pipeline.mark_stale_runs``). A beat that fails (a server away for a moment) is retried at the next.

    Args:
        run_id: the run.
        every: seconds between beats; ``heartbeat_seconds()`` when None.
    """
    interval = heartbeat_seconds() if every is None else every
    client = mlflow.MlflowClient()  # the store of this thread: the beats go where the run is
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                client.set_tag(run_id, TAG_HEARTBEAT, f"{time.time():.0f}")
            except Exception:  # the next beat retries; ten missed beats end the lease
                continue

    thread = threading.Thread(target=beat, name=f"truthsteer-heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)  # a beat stuck on a slow server is a daemon: it cannot hold the process


LAUNCH_GRACE_SECONDS = 30 * 60  # a launch whose entry point has not started within this never will


def reap_unstarted_launches(experiment_id: str, own: str = "", grace: float = LAUNCH_GRACE_SECONDS) -> list[str]:
    """Mark FAILED the runs that ``mlflow run`` created but whose entry point never started: RUNNING, with
    MLflow's ``mlflow.project.entryPoint`` tag but no ``truthsteer.stage`` (every entry point sets it first),
    older than ``grace`` seconds. ``mlflow run`` without ``--env-manager local`` on a machine without conda
    creates the run and then fails; the next run of any stage ends it, with a tag that says why.

    Args:
        experiment_id: where to look.
        own: the calling run (never reaped).
        grace: seconds a launch may take to reach its entry point (creating a conda env can take minutes).
    """
    import time

    cutoff = (time.time() - grace) * 1000
    client = mlflow.MlflowClient()
    reaped = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if run.info.run_id == own or TAG_STAGE in tags or "mlflow.project.entryPoint" not in tags:
            continue
        if run.info.start_time < cutoff:
            client.set_tag(run.info.run_id, TAG_REAPED, "the launch never reached its entry point within "
                           f"{grace / 60:g} min (mlflow run without --env-manager local needs conda)")
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            reaped.append(run.info.run_id)
    return reaped


@contextmanager
def stage_run(stage: str, cfg: Config, *, run_name: str | None = None,
              tags: Mapping[str, str] | None = None, params: Mapping[str, str] | None = None) -> Iterator[Any]:
    """The run of one stage (``tracked_run``) with the resolved config logged to it.

    Args:
        stage: the entry point's name, tagged as ``truthsteer.stage``.
        cfg: the resolved config, logged as params and ``config.yaml``; its ``tracking`` section
            names the store and the experiment.
        run_name: defaults to ``<model>-<stage>``.
        tags: extra tags.
        params: the params to log instead of the whole config (``config.yaml`` still holds all of it).
    """
    ensure_store(tracking_uri(cfg))
    with tracked_run(stage, run_name=run_name or f"{cfg.model.alias}-{stage}", experiment=cfg.tracking.experiment,
                     tags={TAG_MODEL: cfg.model.alias, **(tags or {})}) as run:
        log_config(cfg, params)
        yield run


def download(run_id: str, artifact_path: str) -> Path:
    """An artifact of another run, through MLflow's artifact API (any artifact store)."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path))
    except mlflow.exceptions.MlflowException as err:
        raise ConfigError(f"run {run_id!r} has no artifact {artifact_path!r}: {err.message}") from None


if __name__ == "__main__":  # `python -m core.tracking URI`: create the store before workers race on it
    import sys

    print(f"tracking store ready: {ensure_store(sys.argv[1] if len(sys.argv) > 1 else 'sqlite:///mlflow.db')}")
