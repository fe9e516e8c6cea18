"""The tune stage: search spaces, the trial budget, studies that resume, grids, failures, workers.

Fast (a tiny random Llama, a throw-away tracking store and Optuna storage): the search-space specs
and their errors; the trial budget's decisions on real trials (start, wait, stop, surplus); the
trial-seeded TPE is reproducible whichever worker asks; a study resumed under the same name gains
the new trials; the grid scores every cell exactly once; a trial's value is MC2 under
``vectors[layer] * scale`` of the cached extraction, which equals a fresh one; a NaN objective fails
its trial with the reason and never counts; the best params round-trip into ``full``'s config; the
judge objective reports every question at its index; two worker processes on one journal file end
with exactly the requested COMPLETE trials and compute the shared extraction once; a worker stopped
with SIGTERM re-queues its trial, which the next run completes; the trial of a SIGKILLed journal
worker is failed and re-queued by the next worker on the machine.
Slow: the entry point on smollm2-135m, then ``full --tuned`` reading its best params; three
workers on one PostgreSQL study (``TRUTHSTEER_TEST_PG_URL``), one SIGKILLed mid-trial, whose trial
the heartbeat fails and another worker retries with the same params.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
import torch
import yaml
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from core import artifacts
from core.artifacts import TAG_STAGE
from core.config import Config, ConfigError
from core.config_io import load_config
from core.data import splits_for
from core.models import LoadedModel
from core.tracking import stage_run
from evaluation.judges import JudgeItem
from evaluation.mc import MCJudge
from stages import pipeline, tune, tune_scoring, tune_space, tune_storage, tune_workers
from steering.extract import contrastive_pairs, extract_caa
from steering.methods.caa import default_layers
from steering.methods.intervention import Steering
from tests.conftest import DATA_CSV, PROJECT_DIR
from tests.tiny_models import make_tiny

optuna.logging.set_verbosity(optuna.logging.WARNING)
TINY_OVERRIDES = [f"data.source={DATA_CSV}", "model.alias=tiny-llama", "model.n_layers=3", "model.d_model=32",
                  "data.pool=12", "data.val=6", "data.train=0", "data.test=0", "eval.batch_size=16",
                  "extract.batch_size=12", "judge.batch_size=8", "eval.max_new_tokens=4"]


def tiny_cfg(*extra: str) -> Config:
    return load_config("smollm2-135m", [*TINY_OVERRIDES, *extra])


def tiny_loaded(cfg: Config) -> LoadedModel:
    model, tokenizer = make_tiny("llama")
    return LoadedModel(spec=cfg.model, model=model, tokenizer=tokenizer, dtype=torch.float32,
                       device=torch.device("cpu"), prompt_format="qa")


def run_tiny(cfg: Config, settings: tune_storage.TuneSettings) -> tuple[tune.TuneOutcome, str]:
    """One worker of the study in this process; its outcome and parent run id."""
    with stage_run("tune", cfg) as parent:
        outcome = tune.run(cfg, settings, loaded=tiny_loaded(cfg))
    return outcome, parent.info.run_id


def load_study(settings: tune_storage.TuneSettings, cfg: Config) -> optuna.Study:
    storage = tune_storage.open_storage(tune_storage.storage_url(settings.storage), heartbeat=0)
    return optuna.load_study(study_name=settings.study_name_for(cfg), storage=storage)


def children(parent_id: str) -> list[Any]:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


# ---------------------------------------------------------------- search spaces and settings


def test_axis_specs_give_the_values_they_name() -> None:
    assert tune_space.Axis.parse("layer", "8:12", integer=True).values() == [8, 9, 10, 11, 12]
    assert tune_space.Axis.parse("layer", "8:20:4", integer=True).values() == [8, 12, 16, 20]
    assert tune_space.Axis.parse("layer", "6,9,6,12", integer=True).values() == [6, 9, 12]
    assert tune_space.Axis.parse("scale", "0:8:2", integer=False).values() == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert tune_space.Axis.parse("scale", "0.5:1.5:0.25", integer=False).values() == [0.5, 0.75, 1.0, 1.25, 1.5]
    assert tune_space.Axis.parse("scale", "-2", integer=False).values() == [-2.0]
    assert not tune_space.Axis.parse("scale", "0.5:8", integer=False).finite
    # smollm2-135m: 30 layers, default layer 15 (0.5 of the depth): a band of 15 around it.
    assert default_layers(load_config("smollm2-135m").model) == "8:22"


@pytest.mark.parametrize(("name", "text", "integer", "message"), [
    ("layer", "8.5:12", True, "must be an integer layer index"),
    ("layer", "12:8", True, "is empty; write low:high with low <= high"),
    ("scale", "a:b", False, "is not a number"),
    ("scale", "1:2:3:4", False, "must be low:high or low:high:step"),
    ("scale", "0:8:-1", False, "step -1 must be > 0"),
    ("scale", "inf", False, "must be finite"),
])
def test_bad_axis_specs_name_the_value_and_the_fix(name: str, text: str, integer: bool, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tune_space.Axis.parse(name, text, integer=integer)


def test_settings_refuse_what_cannot_work() -> None:
    cfg = load_config("smollm2-135m")
    with pytest.raises(ConfigError, match="objective='mcc' is not one of mc, mc2, judge, truth_info"):
        tune_storage.TuneSettings(objective="mcc")
    with pytest.raises(ConfigError, match="would run forever"):
        tune_storage.TuneSettings(n_trials=0)
    with pytest.raises(ConfigError, match=r"must lie in \[0, 30\) for smollm2-135m.*layers=8:22"):
        tune_storage.TuneSettings(axes={"layers": "20:30"}).search_space(cfg)
    with pytest.raises(ConfigError, match="the grid needs finitely many scale values.*0.5:8:1"):
        tune_storage.TuneSettings(sampler="grid", axes={"scales": "0.5:8"}).search_space(cfg)
    with pytest.raises(ConfigError, match="use --pruner none"):
        tune_storage.TuneSettings(sampler="grid", pruner="wilcoxon")
    grid = tune_storage.TuneSettings(sampler="grid", total_trials=100, axes={"layers": "10:12"})
    assert grid.total_for(grid.search_space(cfg)) == 15  # 3 layers x 5 scales (0:8:2): the grid caps the total
    assert tune_storage.TuneSettings(objective="judge").resolved_pruner() == "wilcoxon"
    assert tune_storage.TuneSettings(objective="mc").resolved_pruner() == "none"


def test_objective_directions_come_from_the_registry() -> None:
    from evaluation.judges import metric_directions

    for objective in tune_space.OBJECTIVES.values():
        assert objective.higher_is_better is metric_directions()[objective.metric]
    assert tune_space.OBJECTIVES["mc"].direction == "maximize"


def test_storage_specs(outputs: Path) -> None:
    assert tune_storage.storage_url("") == f"sqlite:///{(outputs / 'tune' / 'optuna.db').resolve()}"
    assert tune_storage.storage_url("runs/study.log") == f"journal:{Path('runs/study.log').resolve()}"
    assert tune_storage.storage_url("journal:/tmp/j") == "journal:/tmp/j"
    assert tune_storage.storage_url("x.db") == f"sqlite:///{Path('x.db').resolve()}"
    url = "postgresql://user:secret@127.0.0.1:5432/optuna"
    assert tune_storage.storage_url(url) == url
    assert tune_storage.redacted(url) == "postgresql://user:***@127.0.0.1:5432/optuna"
    with pytest.raises(ConfigError, match="is not an Optuna storage"):
        tune_storage.storage_url("optuna")


# ---------------------------------------------------------------- the trial budget


LAYER = IntDistribution(0, 2)
SCALE = FloatDistribution(0.0, 8.0)


def study_with(states: Sequence[TrialState], system_attrs: Sequence[dict[str, Any]] | None = None) -> optuna.Study:
    """An in-memory study whose trials have ``states``, in order (trial ``i`` has number ``i``)."""
    study = optuna.create_study(direction="maximize")
    for i, state in enumerate(states):
        attrs = (system_attrs or [{}] * len(states))[i]
        finished = state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        study.add_trial(create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                                     params={"layer": 1, "scale": 1.0} if finished else None,
                                     distributions={"layer": LAYER, "scale": SCALE} if finished else None,
                                     system_attrs=attrs))
    return study


def trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False)


C, R, W, F, P = TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL, TrialState.PRUNED


def test_budget_decisions_and_surplus_for_a_total() -> None:
    budget = tune_workers.TrialBudget(total=3)
    assert budget.decide(trials(study_with([C, C]))) == "start"
    assert budget.decide(trials(study_with([C, C, C]))) == "stop"
    assert budget.decide(trials(study_with([C, F, P, C]))) == "start"  # failed and pruned trials do not count
    assert budget.decide(trials(study_with([C, C, R]))) == "wait"  # the running one may die
    assert budget.decide(trials(study_with([C, C, R, W]))) == "start"  # a re-queued trial is run
    racers = trials(study_with([C, C, R, R]))
    assert [budget.is_surplus(t, racers) for t in racers[2:]] == [False, True]  # the lower number wins
    assert not tune_workers.TrialBudget().is_surplus(racers[3], racers)  # no total: every trial runs
    assert tune_workers.TrialBudget().decide(trials(study_with([C] * 50))) == "start"


def test_budget_for_the_grid_holds_each_cell_once() -> None:
    space: dict[str, list[Any]] = {"layer": [0, 1], "scale": [0.0]}
    budget = tune_workers.TrialBudget(grid=space, n_cells=2)

    def cell(i: int, **extra: Any) -> dict[str, Any]:
        return {"grid_id": i, "search_space": space, **extra}

    assert budget.decide(trials(study_with([C], [cell(0)]))) == "start"  # cell 1 is free
    assert budget.decide(trials(study_with([C, R], [cell(0), cell(1)]))) == "wait"
    assert budget.decide(trials(study_with([C, C], [cell(0), cell(1)]))) == "stop"
    assert budget.decide(trials(study_with([C, F], [cell(0), cell(1)]))) == "stop"  # a NaN cell is not rerun
    retried = trials(study_with([C, F, R, R], [cell(0), cell(1), cell(1, retry_history=[1]), cell(1)]))
    assert budget.decide(retried[:3]) == "wait"
    assert not budget.is_surplus(retried[2], retried)  # the retry of the failed trial holds cell 1
    assert budget.is_surplus(retried[3], retried)  # a second trial on cell 1 is a duplicate
    other_space = trials(study_with([C, C], [cell(0), {"grid_id": 1, "search_space": {"layer": [5]}}]))
    assert budget.decide(other_space) == "start"  # a trial of another grid holds no cell of this one


def test_trial_seeded_tpe_does_not_depend_on_which_worker_asks() -> None:
    def score(params: dict[str, Any]) -> float:
        return -((params["layer"] - 5) ** 2) - (params["scale"] - 3.0) ** 2

    def ask_tell(study: optuna.Study, samplers: Sequence[optuna.samplers.BaseSampler], n: int) -> list[dict[str, Any]]:
        for i in range(n):
            study.sampler = samplers[i % len(samplers)]
            trial = study.ask()
            params = {"layer": trial.suggest_int("layer", 0, 9), "scale": trial.suggest_float("scale", 0.0, 8.0)}
            study.tell(trial, score(params))
        return [t.params for t in study.trials]

    alone = ask_tell(optuna.create_study(direction="maximize"), [tune_space.TrialSeededTPESampler(7)], 14)
    two = ask_tell(optuna.create_study(direction="maximize"),
                   [tune_space.TrialSeededTPESampler(7), tune_space.TrialSeededTPESampler(7)], 14)
    assert two == alone  # the same history gives the same trials, whichever worker's sampler asks
    assert len({(p["layer"], p["scale"]) for p in alone[:10]}) == 10  # same seed, no repeated startup point
    other = ask_tell(optuna.create_study(direction="maximize"), [tune_space.TrialSeededTPESampler(8)], 3)
    assert other != alone[:3]


# ---------------------------------------------------------------- studies on the tiny model


def test_resume_adds_trials_to_the_same_study(tracking: str, outputs: Path) -> None:
    cfg = tiny_cfg()
    settings = tune_storage.TuneSettings(n_trials=1, heartbeat=0, axes={"layers": "0:2", "scales": "0:4"})
    first, first_run = run_tiny(cfg, settings)
    second, second_run = run_tiny(cfg, tune_storage.TuneSettings(n_trials=2, heartbeat=0, axes={"layers": "0:2", "scales": "0:4"}))
    assert (first.counts.complete, second.counts.complete, second.n_worker_trials) == (1, 3, 2)
    assert first.study_name == second.study_name == "truthsteer-tiny-llama-mc"
    study = load_study(settings, cfg)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert [len(children(first_run)), len(children(second_run))] == [1, 2]  # each worker's trials under it
    assert second.best_value == max(v for t in study.trials if (v := t.value) is not None)
    assert first.extraction_source == "computed" and second.extraction_source == "cache"


def test_a_resumed_study_must_score_the_same_way(tracking: str, outputs: Path) -> None:
    run_tiny(tiny_cfg(), tune_storage.TuneSettings(n_trials=1, heartbeat=0, axes={"layers": "0:2"}))
    with pytest.raises(ConfigError, match="different val.*pass another --study-name"):
        run_tiny(tiny_cfg("data.val=5"), tune_storage.TuneSettings(n_trials=1, heartbeat=0, axes={"layers": "0:2"}))


def test_grid_scores_every_cell_exactly_once(tracking: str, outputs: Path) -> None:
    cfg = tiny_cfg()
    settings = tune_storage.TuneSettings(sampler="grid", n_trials=3, heartbeat=0, axes={"layers": "1:2", "scales": "0,4"})
    first, _ = run_tiny(cfg, settings)
    rest, _ = run_tiny(cfg, dataclasses.replace(settings, n_trials=0))  # resume: until the grid is done
    again, _ = run_tiny(cfg, dataclasses.replace(settings, n_trials=0))
    assert (first.n_worker_trials, rest.n_worker_trials, again.n_worker_trials) == (3, 1, 0)
    cells = sorted((t.params["layer"], t.params["scale"]) for t in load_study(settings, cfg).trials)
    assert cells == [(layer, scale) for layer in (1, 2) for scale in (0.0, 4.0)]
    assert again.counts == tune_workers.StudyCounts(complete=4, running=0, waiting=0, pruned=0, failed=0)


@pytest.mark.oracle
def test_trials_score_the_cached_vectors_exactly(tracking: str, outputs: Path) -> None:
    cfg = tiny_cfg()
    run_tiny(cfg, tune_storage.TuneSettings(n_trials=2, heartbeat=0, axes={"layers": "0:2", "scales": "0.5:8"}))
    loaded, splits = tiny_loaded(cfg), splits_for(cfg)
    cached, source = tune_scoring.shared_extraction(cfg, splits["pool"], loaded)
    assert source == "cache"  # computed by the study, read here
    pairs = contrastive_pairs(splits["pool"], cfg.extract.pairs_per_question, cfg.data.seed)
    fresh = extract_caa(loaded, pairs, batch_size=cfg.extract.batch_size, max_length=cfg.extract.max_length)
    assert torch.equal(cached.diffs, fresh.diffs) and torch.equal(cached.valid, fresh.valid)
    items = [JudgeItem.from_question(q, "") for q in splits["val"]]
    for trial in load_study(tune_storage.TuneSettings(), cfg).trials:
        layer, scale = trial.params["layer"], trial.params["scale"]
        steering = Steering("caa", layer=layer, scale=scale, vector=fresh.vectors[layer])
        rows = MCJudge.from_config(cfg).bind(loaded, steering).score(items)
        assert trial.value == math.fsum(r["mc2"] for r in rows) / len(rows)  # CAA vectors[layer] * scale, on val


@pytest.mark.oracle
def test_a_nan_objective_fails_the_trial_with_its_reason(tracking: str, outputs: Path) -> None:
    cfg = tiny_cfg()
    settings = tune_storage.TuneSettings(n_trials=2, heartbeat=0, axes={"layers": "1", "scales": "1e39"})  # overflows fp32 to inf
    with pytest.raises(ConfigError, match="has no completed trial .2 failed"):
        run_tiny(cfg, settings)
    failed = load_study(settings, cfg).trials
    assert [t.state for t in failed] == [TrialState.FAIL, TrialState.FAIL]
    assert all(t.value is None for t in failed)  # never a 0
    assert all(t.user_attrs[tune_storage.ATTR_FAIL_REASON].startswith("mc2 is not finite for 6 of 6 questions") for t in failed)
    (parent,) = mlflow.search_runs(experiment_names=["truthsteer"], output_format="list",
                                   filter_string=f"tags.`{TAG_STAGE}` = 'tune'")
    assert parent.info.status == "FAILED"
    runs = children(parent.info.run_id)
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"]
    assert all("objective" not in r.data.metrics and r.data.tags["state"] == "FAIL" for r in runs)


def test_best_params_round_trip_into_full(tracking: str, outputs: Path) -> None:
    cfg = tiny_cfg()
    outcome, parent_id = run_tiny(cfg, tune_storage.TuneSettings(n_trials=3, heartbeat=0, axes={"layers": "0:2", "scales": "0.5:8"}))
    assert outcome.best_params is not None
    parent = mlflow.get_run(parent_id)
    fragment = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(run_id=parent_id,
                                                                        artifact_path=artifacts.TUNED)).read_text())
    assert fragment == {"steering": {"layer": outcome.best_params["layer"], "scale": outcome.best_params["scale"],
                                     "scale_mode": "absolute"}}
    full_cfg = load_config("smollm2-135m", pipeline.tuned_overrides(parent_id))
    assert (full_cfg.layer, full_cfg.steering.scale) == (outcome.best_params["layer"], outcome.best_params["scale"])
    tags = parent.data.tags
    assert (tags[artifacts.TAG_OBJECTIVE_METRIC], tags[artifacts.TAG_OBJECTIVE_DIRECTION]) == ("mc2", "maximize")
    best_run = mlflow.get_run(tags[artifacts.TAG_BEST_RUN])
    assert best_run.data.tags["mlflow.parentRunId"] == parent_id
    assert best_run.info.experiment_id == parent.info.experiment_id  # no separate experiment per study
    assert best_run.data.params == {"layer": str(outcome.best_params["layer"]),
                                    "scale": str(outcome.best_params["scale"])}
    assert best_run.data.metrics["objective"] == best_run.data.metrics["mc2"] == outcome.best_value
    low, high = best_run.data.metrics["mc2_ci_low"], best_run.data.metrics["mc2_ci_high"]  # the trial's interval
    assert low <= outcome.best_value <= high and low < high
    assert (tags[artifacts.TAG_BEST_LAYER], float(tags[artifacts.TAG_BEST_SCALE])) == (
        str(outcome.best_params["layer"]), outcome.best_params["scale"])
    assert parent.data.metrics["best_mc2"] == outcome.best_value
    logged = {f.path for f in mlflow.MlflowClient().list_artifacts(parent_id, "tune")}
    assert {artifacts.TUNED, artifacts.TUNE_TRIALS, artifacts.TUNE_HISTORY, artifacts.TUNE_IMPORTANCE} <= logged


def test_judge_objective_reports_every_question_at_its_index(tracking: str, outputs: Path) -> None:
    cfg = tiny_cfg("data.val=10")
    settings = tune_storage.TuneSettings(objective="judge", n_trials=3, heartbeat=0, axes={"layers": "0:2", "scales": "0:4"})
    outcome, _ = run_tiny(cfg, settings)
    study = load_study(settings, cfg)
    for trial in study.trials:
        assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        if trial.state == TrialState.COMPLETE:
            assert sorted(trial.intermediate_values) == list(range(10))
            assert trial.value == math.fsum(trial.intermediate_values.values()) / 10  # the mean, exactly
        else:
            assert len(trial.intermediate_values) == trial.user_attrs["n_evaluated"] < 10
    assert outcome.counts.complete >= 1


# ---------------------------------------------------------------- worker processes


def worker_main() -> None:
    """A worker process on the tiny model, run as the entry point runs (SIGTERM ends it as Ctrl-C):
    ``python -c 'import tests.test_tune as t; t.worker_main()' JSON``."""
    from entrypoints import _cli

    def work() -> None:
        torch.set_num_threads(1)
        job = json.loads(sys.argv[1])
        cfg = tiny_cfg(*job.get("overrides", []))
        with stage_run("tune", cfg) as parent:
            print(f"parent run {parent.info.run_id}", flush=True)
            tune.run(cfg, tune_storage.TuneSettings(**job["settings"]), loaded=tiny_loaded(cfg))

    _cli.main(work)


def running_trial_of(worker: subprocess.Popen[str], study_name: str, storage_spec: str,
                     timeout: float = 300) -> FrozenTrial:
    """The first trial that ``worker`` runs with its params sampled, polled from the storage."""
    storage = tune_storage.open_storage(tune_storage.storage_url(storage_spec), heartbeat=0)
    tag = f"{socket.gethostname()}:{worker.pid}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.poll() is None:
        if study_name in optuna.get_all_study_names(storage):
            running = [t for t in optuna.load_study(study_name=study_name, storage=storage).get_trials(
                deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get(tune_storage.ATTR_WORKER) == tag and {"layer", "scale"} <= set(t.params)]
            if running:
                return running[0]
        time.sleep(0.02)
    raise AssertionError(f"worker {worker.pid} ran no trial (exit code {worker.poll()})")


def start_worker(settings: dict[str, Any], env: dict[str, str], overrides: Sequence[str] = ()) -> subprocess.Popen[str]:
    job = json.dumps({"settings": settings, "overrides": list(overrides)})
    return subprocess.Popen([sys.executable, "-c", "import tests.test_tune as t; t.worker_main()", job],
                            cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def worker_env(outputs: Path) -> dict[str, str]:
    return {**os.environ, tune_storage.OUTPUTS_ENV: str(outputs), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.long
def test_two_workers_on_one_journal_complete_exactly_the_total(tracking: str, outputs: Path, tmp_path: Path) -> None:
    storage = f"journal:{tmp_path / 'study.log'}"
    settings = {"n_trials": 0, "total_trials": 5, "storage": storage, "axes": {"layers": "0:2", "scales": "0:8"},
                "heartbeat": 0}
    workers = [start_worker(settings, worker_env(outputs)) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(log[-3000:] for log in logs)
    cfg = tiny_cfg()
    study = load_study(tune_storage.TuneSettings(storage=storage), cfg)
    states = [t.state for t in study.trials if not t.user_attrs.get(tune_storage.ATTR_SURPLUS)]
    assert states.count(TrialState.COMPLETE) == 5
    assert set(states) == {TrialState.COMPLETE}  # nothing left running or queued
    assert len({t.number for t in study.trials}) == len(study.trials)
    parents = mlflow.search_runs(experiment_names=["truthsteer"], output_format="list",
                                 filter_string=f"tags.`{TAG_STAGE}` = 'tune'")
    assert sorted(p.data.tags[artifacts.TAG_EXTRACTION] for p in parents) == ["cache", "computed"]  # computed once
    assert [p.name for p in (outputs / "tune" / "extractions").iterdir() if p.is_dir()] == [
        tune_scoring.extraction_cache_dir(cfg).name]
    assert sum(int(p.data.metrics["n_worker_trials"]) for p in parents) == 5


@pytest.mark.long
def test_a_terminated_worker_requeues_its_trial(tracking: str, outputs: Path, tmp_path: Path) -> None:
    storage = str(tmp_path / "study.db")
    settings = {"n_trials": 50, "storage": storage, "axes": {"layers": "0:2", "scales": "0:8"}, "heartbeat": 0}
    worker = start_worker(settings, worker_env(outputs), ["data.val=60"])  # 4 chunks of 16: stopped in the first
    cut = running_trial_of(worker, "truthsteer-tiny-llama-mc", storage)
    worker.send_signal(signal.SIGTERM)
    log = worker.communicate(timeout=300)[0]
    assert worker.returncode == 0 and "re-queued" in log, log[-3000:]
    cfg = tiny_cfg("data.val=60")
    study = load_study(tune_storage.TuneSettings(storage=storage), cfg)
    stopped = study.trials[cut.number]
    assert stopped.state == TrialState.FAIL and "interrupted" in stopped.user_attrs[tune_storage.ATTR_FAIL_REASON]
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.params == stopped.params and queued.system_attrs["failed_trial"] == cut.number
    assert tune_storage.ATTR_FAIL_REASON not in queued.user_attrs
    (parent,) = mlflow.search_runs(experiment_names=["truthsteer"], output_format="list",
                                   filter_string=f"tags.`{TAG_STAGE}` = 'tune'")
    assert parent.info.status == "FINISHED" and parent.data.tags[artifacts.TAG_STOPPED] == f"signal {signal.SIGTERM}"
    run_tiny(cfg, tune_storage.TuneSettings(n_trials=1, storage=storage, heartbeat=0, axes={"layers": "0:2", "scales": "0:8"}))
    rerun = load_study(tune_storage.TuneSettings(storage=storage), cfg).trials[queued.number]
    assert rerun.state == TrialState.COMPLETE and rerun.params == stopped.params  # resuming ran the queued trial


@pytest.mark.long
def test_a_killed_journal_worker_is_requeued_on_the_same_machine(tracking: str, outputs: Path,
                                                                 tmp_path: Path) -> None:
    settings = tune_storage.TuneSettings(n_trials=0, total_trials=3, storage=f"journal:{tmp_path / 'study.log'}", heartbeat=0, axes={"layers": "0:2", "scales": "0:8"})
    worker = start_worker(dataclasses.asdict(settings), worker_env(outputs), ["data.val=60"])
    cut = running_trial_of(worker, "truthsteer-tiny-llama-mc", settings.storage)
    worker.send_signal(signal.SIGKILL)
    worker.communicate(timeout=120)
    cfg = tiny_cfg("data.val=60")
    outcome, _ = run_tiny(cfg, settings)  # the journal has no heartbeat, but the dead pid was on this machine
    study = load_study(settings, cfg)
    assert outcome.counts.complete == 3 and not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    dead = study.trials[cut.number]
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == cut.number]
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE and retry.params == dead.params


# ---------------------------------------------------------------- slow: real weights, PostgreSQL


@pytest.mark.slow
def test_entry_point_on_smollm2_then_full_reads_the_best(tracking: str, outputs: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "entrypoints.tune", "--model", "smollm2-135m", "--data", str(DATA_CSV),
         "--n-trials", "2", "--layers", "12:18", "--scales", "1:6", "--overrides", "data.val=4,data.pool=8"],
        cwd=PROJECT_DIR, env=worker_env(outputs), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (parent,) = mlflow.search_runs(experiment_names=["truthsteer"], output_format="list",
                                   filter_string=f"tags.`{TAG_STAGE}` = 'tune'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 2
    layer, scale = int(parent.data.tags[artifacts.TAG_BEST_LAYER]), float(parent.data.tags[artifacts.TAG_BEST_SCALE])
    plan = subprocess.run(
        [sys.executable, "-m", "entrypoints.full", "--model", "smollm2-135m", "--data", str(DATA_CSV),
         "--tuned", parent.info.run_id, "--dry-run"],
        cwd=PROJECT_DIR, env=worker_env(outputs), capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert f"steering layer {layer}, scale {scale}" in plan.stdout


@pytest.mark.slow
def test_three_postgres_workers_survive_a_sigkill(tracking: str, outputs: Path) -> None:
    url = os.environ.get("TRUTHSTEER_TEST_PG_URL", "")
    if not url:
        pytest.skip("TRUTHSTEER_TEST_PG_URL is not set; run .ci/postgres.sh and export its URL")
    name = f"test-kill-{uuid.uuid4().hex[:8]}"
    from sqlalchemy.engine import make_url

    parsed = make_url(url)  # the workers get the URL without its password, and the password as libpq reads it
    bare = parsed._replace(password=None).render_as_string(hide_password=False)
    settings = {"n_trials": 0, "total_trials": 8, "storage": bare, "study_name": name,
                "axes": {"layers": "0:2", "scales": "0:8"}, "heartbeat": 1}
    env = {**worker_env(outputs), **({"PGPASSWORD": parsed.password} if parsed.password else {})}
    overrides = ["data.val=60", "data.pool=12"]  # trials long enough to be killed in the middle of one
    workers = [start_worker(settings, env, overrides) for _ in range(3)]
    victim = workers[0]
    tag = f"{socket.gethostname()}:{victim.pid}"
    killed = running_trial_of(victim, name, url)
    victim.send_signal(signal.SIGKILL)
    logs = [w.communicate(timeout=600)[0] for w in workers]
    storage = tune_storage.open_storage(url, heartbeat=0)
    assert victim.returncode == -signal.SIGKILL
    assert [w.returncode for w in workers[1:]] == [0, 0], "\n".join(log[-3000:] for log in logs[1:])
    assert not any("no heartbeat" in log for log in logs)  # the survivors waited for the dead trial's retry
    study = optuna.load_study(study_name=name, storage=storage)
    counted = [t for t in study.trials if not t.user_attrs.get(tune_storage.ATTR_SURPLUS)]
    assert sum(t.state == TrialState.COMPLETE for t in counted) == 8
    assert not [t for t in counted if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    dead = study.trials[killed.number]
    assert dead.state == TrialState.FAIL and dead.user_attrs[tune_storage.ATTR_WORKER] == tag
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == dead.params
    # The retry completes, unless the survivors filled the total between the dead trial's FAIL and its
    # re-queueing: then it is pruned as surplus before it samples (a race; the total is exact either way).
    assert retry.state == TrialState.COMPLETE or (retry.state == TrialState.PRUNED
                                                  and retry.user_attrs.get(tune_storage.ATTR_SURPLUS))
    dead_run = mlflow.get_run(dead.system_attrs[tune_storage.MLFLOW_RUN_ATTR])
    assert dead_run.info.status == "KILLED"
    # the dead worker's own tune run is ended by a surviving worker, not left RUNNING for its host to reap
    assert mlflow.get_run(dead_run.data.tags["mlflow.parentRunId"]).info.status == "KILLED"
    optuna.delete_study(study_name=name, storage=storage)
