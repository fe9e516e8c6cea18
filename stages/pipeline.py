"""The ``full`` pipeline: data -> train_judge -> calibrate -> extract -> bank -> train (mc, gen, joint) -> evaluate
as nested runs.

``train_judge`` learns the trained judge from the human labels of every question outside the val
and test splits, and ``calibrate`` measures every answer judge against the human labels of the
test questions; ``evaluate`` then judges with ``judge.trained`` set to the judge of ``train_judge``
(unless the config names one). Both judge stages run only when ``eval.judges`` has ``judge``.

Each stage gets a *stage key*: a hash of its entry point, its parameters compared as strings
(the config sections it reads plus the run ids it consumes), the code version and the data split.
A finished run in the experiment with the same key is reused instead of recomputed, so a killed
``full`` run simply continues when started again; the parent run records which stages were
reused. Runs left RUNNING by a dead process are marked KILLED first: on this host when their pid is gone, on
another host (a shared tracking server) when their heartbeat is older than the lease.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Literal

import mlflow
from mlflow.entities import RunStatus

from core import artifacts
from core.artifacts import TAG_HEARTBEAT, TAG_HOST, TAG_KEY, TAG_PID, TAG_REAPED, TAG_REUSED, TAG_STAGE
from core.config import Config, ConfigError
from core.config_io import config_to_dict
from core.tracking import LEASE_ENV, code_version, download, lease_seconds, stage_run
from steering.methods import check_variants, method

STAGES = ("data", "train_judge", "calibrate", "extract", "bank", "train_mc", "train_gen", "train_joint", "iti",
          "evaluate")
TRAIN_STAGES: dict[str, Literal["mc", "gen", "joint"]] = {"train_mc": "mc", "train_gen": "gen", "train_joint": "joint"}
# (each pins mlp.branch)
JUDGE_STAGES = ("train_judge", "calibrate")  # run only when eval.judges has the trained judge
# The config sections each stage reads: only these enter its key.
_SECTIONS = {
    "data": ("data",),
    "train_judge": ("data", "judge"),
    "calibrate": ("data", "eval", "judge", "calibrate"),
    "extract": ("model", "data", "extract"),
    "bank": ("model", "bank"),  # and steering.layer, as every stage that reads the layer
    "train_mc": ("model", "mlp", "steering"),
    "train_gen": ("model", "mlp", "steering"),
    "train_joint": ("model", "mlp", "steering"),
    "iti": ("model", "data", "iti"),
    "evaluate": ("model", "eval", "effects", "judge", "steering"),  # and the sections of its variants' methods
}
# The stages that do not read the steering layer: a sweep over layers reuses their runs.
LAYER_FREE = ("data", "train_judge", "calibrate", "extract", "iti")
# The upstream runs each stage consumes, by stage name.
UPSTREAM = {
    "data": (),
    "train_judge": ("data",),
    "calibrate": ("data", "train_judge"),
    "extract": ("data",),
    "bank": ("extract",),
    "train_mc": ("data", "bank"),
    "train_gen": ("data", "bank"),
    "train_joint": ("data", "bank"),
    "iti": ("data",),
    "evaluate": ("data",),  # and the source stages of its variants' methods
}


def judge_uri(train_judge_run: str) -> str:
    """Where the judge of a ``train_judge`` run is: its ``judge`` artifact folder."""
    return f"runs:/{train_judge_run}/{artifacts.JUDGE_DIR}"


def method_stages(cfg: Config) -> tuple[str, ...]:
    """The stages whose runs hold the sources of ``eval.variants``' steering methods."""
    return tuple(dict.fromkeys(method(v).stage for v in cfg.eval.variants if method(v).stage))


def upstream(stage: str, cfg: Config) -> tuple[str, ...]:
    """The stages whose runs ``stage`` consumes; ``evaluate`` consumes its variants' source stages."""
    return UPSTREAM[stage] + (method_stages(cfg) if stage == "evaluate" else ())


def sections(stage: str, cfg: Config) -> tuple[str, ...]:
    """The config sections ``stage`` reads; ``evaluate`` also reads its variants' methods' sections."""
    extra = tuple(method(v).section for v in cfg.eval.variants if method(v).section) if stage == "evaluate" else ()
    return tuple(dict.fromkeys(_SECTIONS[stage] + extra))


def stages_of(cfg: Config) -> tuple[str, ...]:
    """The stages ``full`` runs: data, the judge stages (only for the trained judge without a given one),
    the stages that make the sources of ``eval.variants`` with their inputs, and evaluate."""
    check_variants(list(cfg.eval.variants))
    needed = {"data", "evaluate"} | (set(JUDGE_STAGES) if "judge" in cfg.eval.judges and not cfg.judge.trained else set())
    todo = list(method_stages(cfg))
    while todo:
        stage = todo.pop()
        if stage not in needed:
            needed.add(stage)
            todo.extend(UPSTREAM[stage])
    return tuple(s for s in STAGES if s in needed)


def with_trained_judge(cfg: Config, runs: dict[str, str]) -> Config:
    """``cfg`` with ``judge.trained`` set to the pipeline's own judge, once ``train_judge`` has run."""
    if cfg.judge.trained or "train_judge" not in runs:
        return cfg
    return dataclasses.replace(cfg, judge=dataclasses.replace(cfg.judge, trained=judge_uri(runs["train_judge"])))


def stage_config(stage: str, cfg: Config) -> Config:
    """The config a stage runs with: the train stages pin their branch."""
    if stage in TRAIN_STAGES:
        return dataclasses.replace(cfg, mlp=dataclasses.replace(cfg.mlp, branch=TRAIN_STAGES[stage]))
    return cfg


def stage_params(stage: str, cfg: Config, runs: dict[str, str]) -> dict[str, str]:
    """Everything that decides a stage's output, as strings (MLflow compares params as strings).

    Args:
        stage: the stage.
        cfg: the pipeline's config.
        runs: the run ids of the stages done so far, by stage.
    """
    full = config_to_dict(stage_config(stage, with_trained_judge(cfg, runs)))
    params = {f"{section}.{key}": str(value) for section in sections(stage, cfg)
              for key, value in full[section].items()}
    if stage not in LAYER_FREE:
        params["steering.layer"] = str(cfg.layer)
    params.update({f"run.{name}": runs[name] for name in upstream(stage, cfg)})
    params["code_version"] = code_version()
    return params


def stage_key(stage: str, params: dict[str, str]) -> str:
    text = json.dumps({"stage": stage, **params}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def find_finished(experiment_id: str, key: str) -> str | None:
    """The newest FINISHED run with this stage key, if any."""
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{TAG_KEY}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _heartbeat_age(tags: dict[str, str], now: float) -> float | None:
    try:
        return now - float(tags[TAG_HEARTBEAT])
    except (KeyError, ValueError):
        return None


def mark_stale_runs(experiment_id: str, lease: float | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs whose process is gone; return their ids.

    A run of this host is gone when its pid is; a run of another host (a SLURM node logging to the same server)
    when its heartbeat (``core.tracking.heartbeat``) is older than ``lease``. A run of another host without a
    heartbeat (older code) is left alone: nothing tells whether it lives. A run this user may not edit is skipped.

    Args:
        experiment_id: where to look.
        lease: seconds; ``core.tracking.lease_seconds()`` (``$TRUTHSTEER_LEASE_SECONDS``, 600) when None.
    """
    lease = lease_seconds() if lease is None else lease
    client = mlflow.MlflowClient()
    own = {active.info.run_id} if (active := mlflow.active_run()) else set()
    host, now = socket.gethostname(), time.time()
    stale = []
    for run in mlflow.search_runs(experiment_ids=[experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  output_format="list"):
        tags = run.data.tags
        if run.info.run_id in own:
            continue
        if tags.get(TAG_HOST) == host:
            pid = tags.get(TAG_PID, "")
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            reason = f"its process {pid} on this host ({host}) is gone"
        else:
            age = _heartbeat_age(tags, now)
            if age is None or age <= lease:
                continue
            reason = (f"its host {tags.get(TAG_HOST, '?')} sent no heartbeat for {age / 60:.0f} min "
                      f"(lease {lease / 60:g} min, {LEASE_ENV})")
        try:
            client.set_tag(run.info.run_id, TAG_REAPED, reason)
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "PERMISSION_DENIED":
                raise
            print(f"run {run.info.run_id} looks dead ({reason}) but this user may not end it; its owner can")
            continue
        stale.append(run.info.run_id)
    return stale


@dataclasses.dataclass
class StageOutcome:
    stage: str
    run_id: str
    reused: bool


def _train(stage: str, cfg: Config, runs: dict[str, str]) -> Any:
    from stages import train

    return train.run(stage_config(stage, cfg), bank_run=runs["bank"], data_run=runs["data"])


def _runners(cfg: Config, runs: dict[str, str]) -> dict[str, Callable[[], Any]]:
    from stages import bank, calibrate, data, evaluate, extract, iti, train_judge
    from stages.source_runs import SourceRuns

    return {
        "data": lambda: data.run(cfg),
        "train_judge": lambda: train_judge.run(cfg, data_run=runs["data"]),
        "calibrate": lambda: calibrate.run(with_trained_judge(cfg, runs), data_run=runs["data"]),
        "extract": lambda: extract.run(cfg, data_run=runs["data"]),
        "bank": lambda: bank.run(cfg, extract_run=runs["extract"]),
        **{stage: functools.partial(_train, stage, cfg, runs) for stage in TRAIN_STAGES},
        "iti": lambda: iti.run(cfg, data_run=runs["data"]),
        "evaluate": lambda: evaluate.run(with_trained_judge(cfg, runs), sources=SourceRuns(
            runs["data"], {stage: runs[stage] for stage in method_stages(cfg)})),
    }


def run_stage(stage: str, cfg: Config, runs: dict[str, str], experiment_id: str, *,
              key_extra: dict[str, str] | None = None, tags: dict[str, str] | None = None,
              runner: Callable[[], Any] | None = None) -> StageOutcome:
    """Reuse the finished run of ``stage`` with the same key, or run it as a nested run of the active run.

    Args:
        stage: the stage.
        cfg: the config it runs with (``stage_config`` pins a train stage's branch).
        runs: the run ids of its upstream stages; its own is added.
        experiment_id: where to look for a finished run.
        key_extra: more fields of its key (a sweep's cell), logged as params.
        tags: more tags on its run.
        runner: what runs it; ``_runners``' by default.
    """
    params = {**stage_params(stage, cfg, runs), **(key_extra or {})}
    key = stage_key(stage, params)
    found = find_finished(experiment_id, key)
    if found:
        runs[stage] = found
        print(f"{stage:>9}: reusing finished run {found}")
        return StageOutcome(stage, found, True)
    print(f"{stage:>9}: running")
    entry = stage if stage in JUDGE_STAGES else stage.split("_")[0]
    with stage_run(entry, stage_config(stage, with_trained_judge(cfg, runs)),
                   run_name=f"{cfg.model.alias}-{stage.replace('_', '-')}",
                   tags={TAG_KEY: key, "truthsteer.pipeline_stage": stage, **(tags or {})}) as child:
        mlflow.log_params({k: v for k, v in params.items() if k.startswith("run.") or k in (key_extra or {})})
        (runner or _runners(cfg, runs)[stage])()
        runs[stage] = child.info.run_id
    from core.models import release_memory  # torch: imported when a stage has run
    release_memory()
    return StageOutcome(stage, runs[stage], False)


def start(cfg: Config, caller: str) -> str:
    """The active parent run's experiment, after marking the runs of dead processes there KILLED."""
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError(f"{caller} needs the active parent run (its entry point starts it)")
    experiment_id = parent.info.experiment_id
    stale = mark_stale_runs(experiment_id)
    if stale:
        print(f"marked {len(stale)} run(s) of dead processes KILLED: {', '.join(stale)}")
    return experiment_id


def run(cfg: Config) -> list[StageOutcome]:
    """Run (or reuse) every stage as a nested run of the active parent run.

    Args:
        cfg: the resolved config; each stage reads the sections in ``_SECTIONS``.
    """
    experiment_id = start(cfg, "pipeline.run")
    runs: dict[str, str] = {}
    outcomes = []
    for stage in stages_of(cfg):
        outcomes.append(run_stage(stage, cfg, runs, experiment_id))
        mlflow.set_tag(f"truthsteer.run.{stage}", runs[stage])
    reused = [o.stage for o in outcomes if o.reused]
    mlflow.set_tag(TAG_REUSED, ",".join(reused) or "none")
    mlflow.log_dict({o.stage: {"run_id": o.run_id, "reused": o.reused} for o in outcomes}, "pipeline/stages.json")
    return outcomes


def plan(cfg: Config) -> list[str]:
    """Dry run: which stages would be reused and which would run; loads no weights."""
    from core.models import describe_source
    from core.tracking import ensure_store, tracking_uri

    ensure_store(tracking_uri(cfg))
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    rt = cfg.runtime
    lines = [f"model: {cfg.model.alias} ({cfg.model.n_layers} layers) from {describe_source(cfg.model, rt.cache_dir)}",
             f"dtype {cfg.model.dtype}, device {rt.device}, device_map {rt.device_map}"
             + (f" (max_memory {rt.max_memory})" if rt.max_memory else "")
             + f"; judge {cfg.judge.model} on {rt.judge_device}",
             f"steering layer {cfg.layer}, scale {cfg.steering.scale}; splits {cfg.data.sizes}"]
    runs: dict[str, str] = {}
    for stage in stages_of(cfg):
        if any(name not in runs for name in upstream(stage, cfg)):
            lines.append(f"{stage}: would run (after its inputs)")
            continue
        key = stage_key(stage, stage_params(stage, cfg, runs))
        found = find_finished(experiment.experiment_id, key) if experiment else None
        if found:
            runs[stage] = found
            lines.append(f"{stage}: would reuse run {found}")
        else:
            lines.append(f"{stage}: would run")
    return lines


def tuned_overrides(run_id: str) -> list[str]:
    """The best layer and scale a tune study wrote, as overrides for ``full``."""
    path = download(run_id, artifacts.TUNED)
    import yaml

    fragment = yaml.safe_load(path.read_text()) or {}
    if not isinstance(fragment, dict):
        raise ConfigError(f"run {run_id}: {artifacts.TUNED} is not a mapping of config sections")
    return [f"{section}.{key}={value}" for section, values in fragment.items() for key, value in values.items()]


__all__ = ['STAGES', 'TAG_STAGE', 'mark_stale_runs', 'plan', 'run', 'run_stage', 'stage_key', 'stage_params', 'start',
           'tuned_overrides']
