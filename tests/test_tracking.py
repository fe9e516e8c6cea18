"""Stage runs end in the right state, log the config once, and refuse to overwrite params."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
import yaml

from core.artifacts import TAG_STAGE
from core.config import ConfigError
from core.config_io import config_from_dict, load_config
from core.tracking import CONFIG_ARTIFACT, log_params_once, stage_run
from tests.conftest import PROJECT_DIR


def _only_run() -> mlflow.entities.Run:
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return run


def test_stage_run_logs_config_params_artifact_and_tags(tracking: str) -> None:
    cfg = load_config(None, "steering.layer=7")
    with stage_run("extract", cfg) as run:
        run_id = run.info.run_id
    finished = mlflow.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.params["steering.layer"] == "7"
    assert finished.data.tags[TAG_STAGE] == "extract"
    assert finished.info.run_name == "smollm2-135m-extract"
    logged = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/{CONFIG_ARTIFACT}"))
    assert config_from_dict(logged) == cfg


def test_a_crash_marks_the_run_failed_and_ctrl_c_killed(tracking: str) -> None:
    cfg = load_config()
    with pytest.raises(RuntimeError), stage_run("data", cfg):
        raise RuntimeError("boom")
    assert _only_run().info.status == "FAILED"
    with pytest.raises(KeyboardInterrupt), stage_run("data", cfg) as run:
        raise KeyboardInterrupt
    assert mlflow.get_run(run.info.run_id).info.status == "KILLED"
    assert mlflow.active_run() is None


def test_params_are_write_once_with_a_clear_error(tracking: str) -> None:
    with mlflow.start_run():
        log_params_once({"a": "1"})
        log_params_once({"a": "1", "b": "2"})  # same value again: fine
        with pytest.raises(ConfigError, match="already has different params \\(a: logged '1', now '3'\\)"):
            log_params_once({"a": "3"})


def test_a_stage_run_refreshes_its_heartbeat_while_it_runs(tracking: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from core.artifacts import TAG_HEARTBEAT

    monkeypatch.setenv("TRUTHSTEER_HEARTBEAT_SECONDS", "0.2")
    client = mlflow.MlflowClient()
    with stage_run("data", load_config()) as run:
        first = float(client.get_run(run.info.run_id).data.tags[TAG_HEARTBEAT])  # set with the run
        assert abs(first - time.time()) < 60
        client.set_tag(run.info.run_id, TAG_HEARTBEAT, "0")  # as if it were old: the next beat replaces it
        deadline = time.time() + 30
        while client.get_run(run.info.run_id).data.tags[TAG_HEARTBEAT] == "0" and time.time() < deadline:
            time.sleep(0.05)
        assert float(client.get_run(run.info.run_id).data.tags[TAG_HEARTBEAT]) >= first
    assert not [t for t in threading.enumerate() if t.name.startswith("truthsteer-heartbeat")]
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.long
def test_sigterm_ends_a_stage_run_killed(tracking: str, tmp_path) -> None:
    script = tmp_path / "sleeper.py"
    script.write_text(
        "import time, signal\n"
        "from entrypoints import _cli\n"
        "from core.config_io import load_config\n"
        "from core.tracking import stage_run\n"
        "def main():\n"
        "    with stage_run('data', load_config()):\n"
        "        print('started', flush=True)\n"
        "        time.sleep(60)\n"
        "_cli.main(main)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    proc.terminate()
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert _only_run().info.status == "KILLED"
