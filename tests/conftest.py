"""Shared fixtures: the TruthfulQA CSV beside the project, and a throw-away tracking store.

Under pytest-xdist (``make test`` runs ``-n 2``) each worker, and every process a test starts, computes on one
thread: two workers on two cores, not four threads fighting for them.
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # before torch is imported anywhere in this worker
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here, and none wanted
PROJECT_DIR = Path(__file__).resolve().parents[1]
DATA_CSV = (PROJECT_DIR / ".." / "shared" / "data" / "truthfulqa" / "TruthfulQA.csv").resolve()


@pytest.fixture(autouse=True)
def _judge_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own trained-judge cache (``evaluation.judge_cache``): a judge one test trained never
    stands in for another test's training, and none is left in the user's cache."""
    monkeypatch.setenv("TRUTHSTEER_JUDGE_CACHE", str(tmp_path_factory.mktemp("judge-cache")))


@pytest.fixture(scope="session")
def data_csv() -> Path:
    if not DATA_CSV.exists():
        pytest.fail(f"TruthfulQA CSV not found at {DATA_CSV}; tests expect ../shared beside the project")
    return DATA_CSV


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated sqlite store: migrating takes seconds, copying it milliseconds."""
    path = tmp_path_factory.mktemp("store") / "template.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)
    return path


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _migrated_store: Path) -> Iterator[str]:
    """A fresh sqlite tracking store in tmp_path, set as MLFLOW_TRACKING_URI for the test."""
    shutil.copyfile(_migrated_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # artifacts beside the store, not in ./mlruns of the project (a sqlite store's default root)
    mlflow.MlflowClient(uri).create_experiment("truthsteer", artifact_location=(tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id="0")  # forget an experiment id cached from another store
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # set_experiment exports it
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def kill_once_stored(command: list[str], env: dict[str, str], outputs: Path, *, answers: int = 2,
                     timeout: float = 900) -> list[bytes]:
    """Start ``command`` and SIGKILL it as soon as its generation store under ``outputs`` holds
    ``answers`` lines; return the complete lines the store kept (a torn last line is lost)."""
    proc = subprocess.Popen(command, cwd=PROJECT_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, stores = time.time() + timeout, []
    while time.time() < deadline and proc.poll() is None:
        stores = list(outputs.glob("evaluate/*/generations.jsonl"))
        if stores and len(stores[0].read_bytes().splitlines()) >= answers:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"{command[2]} ended ({proc.returncode}) before it could be killed"
    (store,) = stores
    data = store.read_bytes()
    return data[:data.rfind(b"\n") + 1].splitlines()


@pytest.fixture
def outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$TRUTHSTEER_OUTPUTS`` in tmp_path: tune's storage and caches (extractions, head rankings) go there."""
    monkeypatch.setenv("TRUTHSTEER_OUTPUTS", str(tmp_path / "outputs"))
    return tmp_path / "outputs"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow and long tests first, so that xdist's workers start on them and the quick ones fill in around
    them, instead of one worker finishing a long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None and item.get_closest_marker("long") is None)
