"""The full pipeline: stage keys, reuse of finished stages, stale runs marked KILLED, and (slow)
a ``full`` run killed with SIGKILL during evaluation that continues when started again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from core import artifacts
from core.artifacts import TAG_HEARTBEAT, TAG_HOST, TAG_PID, TAG_REAPED
from core.config_io import load_config, model_aliases, model_spec
from stages import pipeline
from tests.conftest import DATA_CSV, PROJECT_DIR, kill_once_stored

SMALL = ("data.pool=4,data.train=4,data.val=2,data.test=2,mlp.steps=2,mlp.batch_size=2,"
         "eval.max_new_tokens=8,eval.judges=[semantic,bleu],eval.n_bootstrap=50,effects.n_passages=2")


def test_stage_keys_change_with_what_the_stage_reads() -> None:
    cfg = load_config(None, "steering.layer=10")
    params = pipeline.stage_params("bank", cfg, {"extract": "run1"})
    assert params["steering.layer"] == "10" and params["run.extract"] == "run1"
    same = pipeline.stage_key("bank", pipeline.stage_params("bank", load_config(None, "steering.layer=10,eval.seed=3"),
                                                            {"extract": "run1"}))
    assert same == pipeline.stage_key("bank", params)  # eval settings do not touch the bank
    for changed in ("steering.layer=11", "bank.n_bootstrap=3"):
        other = pipeline.stage_params("bank", load_config(None, changed), {"extract": "run1"})
        assert pipeline.stage_key("bank", other) != pipeline.stage_key("bank", params)
    assert pipeline.stage_key("bank", pipeline.stage_params("bank", cfg, {"extract": "run2"})) != \
        pipeline.stage_key("bank", params)
    assert pipeline.stage_config("train_mc", cfg).mlp.branch == "mc"


@pytest.mark.parametrize("alias", [a for a in model_aliases() if model_spec(a).source == "hub"])
def test_dry_run_of_every_hub_alias_resolves_its_preset_offline_without_weights(
        alias: str, tracking: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache: nothing downloaded

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run must not load weights")

    for name in ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", no_weights)
    cfg = load_config(alias, f"data.source={DATA_CSV}")
    lines = pipeline.plan(cfg)
    spec = model_spec(alias)
    assert lines[0].startswith(f"model: {alias} ({spec.n_layers} layers) from NOT AVAILABLE HERE:")
    assert f"hf download {spec.hf_id}" in lines[0]
    assert lines[1].startswith(f"dtype {cfg.model.dtype}, device {cfg.runtime.device}")
    assert 0 <= cfg.layer < spec.n_layers and lines[2].startswith(f"steering layer {cfg.layer},")
    assert [line.split(":")[0] for line in lines[3:]] == list(pipeline.stages_of(cfg))  # iti only on request


def test_runs_of_dead_processes_are_marked_killed(tracking: str) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client = mlflow.MlflowClient()
    experiment = mlflow.set_experiment("truthsteer").experiment_id
    import socket

    stale = client.create_run(experiment, tags={TAG_HOST: socket.gethostname(), TAG_PID: str(dead.pid)})
    alive = client.create_run(experiment, tags={TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())})
    other_host = client.create_run(experiment, tags={TAG_HOST: "elsewhere", TAG_PID: str(dead.pid)})
    assert pipeline.mark_stale_runs(experiment) == [stale.info.run_id]
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(other_host.info.run_id).info.status == "RUNNING"


def test_runs_of_other_hosts_are_reaped_only_when_their_heartbeat_is_older_than_the_lease(
        tracking: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    client = mlflow.MlflowClient()
    experiment = mlflow.set_experiment("truthsteer").experiment_id
    now = time.time()

    def other_host(beat_age: float | None) -> str:
        beat = {} if beat_age is None else {TAG_HEARTBEAT: f"{now - beat_age:.0f}"}
        return client.create_run(experiment, tags={TAG_HOST: "node-7", TAG_PID: "1", **beat}).info.run_id

    silent, fresh, old_code = other_host(11 * 60), other_host(30), other_host(None)
    almost = other_host(9 * 60)  # within the default lease of 10 min
    assert pipeline.mark_stale_runs(experiment) == [silent]
    assert client.get_run(silent).info.status == "KILLED"
    assert "node-7 sent no heartbeat for 11 min" in client.get_run(silent).data.tags[TAG_REAPED]
    assert [client.get_run(r).info.status for r in (fresh, old_code, almost)] == ["RUNNING"] * 3
    monkeypatch.setenv("TRUTHSTEER_LEASE_SECONDS", "480")  # a shorter lease: 9 min is now too old
    assert pipeline.mark_stale_runs(experiment) == [almost]
    assert pipeline.mark_stale_runs(experiment, lease=60) == []  # fresh: its beat is 30 s old
    assert pipeline.mark_stale_runs(experiment, lease=10) == [fresh]
    assert client.get_run(old_code).info.status == "RUNNING"  # no heartbeat: nothing says it is dead


def _full_command(overrides: str = SMALL, *extra: str) -> list[str]:
    return [sys.executable, "-m", "entrypoints.full", "--data", str(DATA_CSV), "--overrides", overrides, *extra]


def _full(tmp_path: Path, tracking: str, *extra: str, overrides: str = SMALL) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "TRUTHSTEER_OUTPUTS": str(tmp_path / "outputs")}
    return subprocess.run(_full_command(overrides, *extra), cwd=PROJECT_DIR, env=env, capture_output=True, text=True,
                          timeout=1200)


def small_labels(folder: Path, overrides: str) -> Path:
    """The first 1,500 human labels of each file, plus every label of the val and test questions: the
    trained judge trains in seconds and calibrate has labels to score."""
    from core.data import splits_for

    splits = splits_for(load_config("smollm2-135m", f"data.source={DATA_CSV},{overrides}"))
    held_out = [q.question.strip() for split in ("val", "test") for q in splits[split]]
    folder.mkdir()
    for name in ("finetune_truth.jsonl", "finetune_info.jsonl"):
        lines = (DATA_CSV.parent / name).read_text(encoding="utf-8").splitlines()
        kept = [line for i, line in enumerate(lines)
                if i < 1500 or any(json.loads(line)["prompt"].startswith(f"Q: {q}\nA:") for q in held_out)]
        (folder / name).write_text("\n".join(kept) + "\n", encoding="utf-8")
    return folder


@pytest.mark.slow
def test_full_runs_every_stage_then_reuses_them(tracking: str, tmp_path: Path) -> None:
    """With the trained judge: train_judge and calibrate run too, and evaluate judges with that judge."""
    overrides = SMALL.replace("eval.judges=[semantic,bleu]", "eval.judges=[judge,bleu]")
    # a judge from 1,500 labels is not the point here (train_judge's floor is tested in test_trained_judge)
    overrides += f",judge.labels={small_labels(tmp_path / 'labels', SMALL)},judge.hidden=[8],judge.folds=2,judge.min_kappa=0"
    first = _full(tmp_path, tracking, overrides=overrides)
    assert first.returncode == 0, first.stderr[-4000:]
    expected = [s for s in pipeline.STAGES if s not in ("iti", "train_joint")]  # what the default variants need
    runs = mlflow.search_runs(experiment_names=["truthsteer"], output_format="list")
    stages = sorted(r.data.tags.get("truthsteer.pipeline_stage", "") for r in runs if r.info.status == "FINISHED")
    assert [s for s in stages if s] == sorted(expected)
    variants = [r for r in runs if r.data.tags.get("truthsteer.stage") == "evaluate.variant"]
    assert {r.data.tags.get("truthsteer.variant") for r in variants} == {"baseline", "caa", "mlp_mc", "mlp_gen"}
    assert all({"judge_truthful", "judge_truthful_informative_ci_low"} <= set(r.data.metrics) for r in variants)
    (judge_run,) = [r for r in runs if r.data.tags.get("truthsteer.pipeline_stage") == "train_judge"]
    (evaluate_run,) = [r for r in runs if r.data.tags.get("truthsteer.pipeline_stage") == "evaluate"]
    assert evaluate_run.data.params["judge.trained"] == f"runs:/{judge_run.info.run_id}/judge"
    (calibrate_run,) = [r for r in runs if r.data.tags.get("truthsteer.pipeline_stage") == "calibrate"]
    assert {"judge_truth_all_kappa", "bleu_truth_nonref_accuracy"} <= set(calibrate_run.data.metrics)
    plan = subprocess.run([sys.executable, "-m", "entrypoints.full", "--data", str(DATA_CSV), "--overrides", overrides,
                           "--dry-run"], cwd=PROJECT_DIR, env={**os.environ, "MLFLOW_TRACKING_URI": tracking},
                          capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0 and plan.stdout.count("would reuse run") == len(expected), plan.stdout
    second = _full(tmp_path, tracking, overrides=overrides)
    assert second.returncode == 0, second.stderr[-4000:]
    parents = mlflow.search_runs(experiment_names=["truthsteer"], output_format="list",
                                 filter_string="tags.`truthsteer.stage` = 'full'", order_by=["attributes.start_time DESC"])
    assert parents[0].data.tags[artifacts.TAG_REUSED] == ",".join(expected)
    assert parents[1].data.tags[artifacts.TAG_REUSED] == "none"


@pytest.mark.slow
def test_full_killed_during_evaluation_continues_where_it_stopped(tracking: str, tmp_path: Path) -> None:
    # one question per generate call, so that the kill lands between two appended answers
    overrides = SMALL.replace("data.test=2", "data.test=6") + ",eval.batch_size=1"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "TRUTHSTEER_OUTPUTS": str(tmp_path / "outputs")}
    done = kill_once_stored(_full_command(overrides), env, tmp_path / "outputs")
    store = next((tmp_path / "outputs").glob("evaluate/*/generations.jsonl"))
    running = mlflow.search_runs(experiment_names=["truthsteer"], output_format="list",
                                 filter_string="attributes.status = 'RUNNING'")
    assert {r.data.tags.get("truthsteer.stage") for r in running} >= {"full", "evaluate"}  # what the kill left

    restarted = _full(tmp_path, tracking, overrides=overrides)
    assert restarted.returncode == 0, restarted.stderr[-4000:]
    runs = mlflow.search_runs(experiment_names=["truthsteer"], output_format="list")
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    assert {r.info.run_id for r in running} <= {r.info.run_id for r in runs if r.info.status == "KILLED"}
    parent = next(r for r in runs if r.data.tags.get("truthsteer.stage") == "full" and r.info.status == "FINISHED")
    stages = pipeline.stages_of(load_config("smollm2-135m", overrides))
    assert parent.data.tags[artifacts.TAG_REUSED] == ",".join(s for s in stages if s != "evaluate")
    evaluate = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                    and r.data.tags.get("truthsteer.stage") == "evaluate")
    variants = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == evaluate.info.run_id]
    assert sorted(r.data.tags["truthsteer.variant"] for r in variants) == ["baseline", "caa", "mlp_gen", "mlp_mc"]
    assert sum(r.data.metrics["n_reused"] for r in variants) == len(done)  # nothing finished was regenerated
    assert sum(r.data.metrics["n_generated"] for r in variants) == 4 * 6 - len(done)
    keys = [(r["variant"], r["qid"]) for r in map(json.loads, store.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == 4 * 6
