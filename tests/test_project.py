"""The project's own wiring: MLproject, entry points, and the dependency lists kept in step."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_DIR

MLPROJECT = yaml.safe_load((PROJECT_DIR / "MLproject").read_text())
ENTRIES = sorted(MLPROJECT["entry_points"])


def test_mlproject_declares_every_stage() -> None:
    assert set(ENTRIES) == {"data", "extract", "iti", "bank", "train", "train_judge", "calibrate", "evaluate", "score", "full",
                            "tune", "sweep", "analyze"}


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_declared_parameter_reaches_the_command(entry: str) -> None:
    spec = MLPROJECT["entry_points"][entry]
    declared = set(spec["parameters"])
    placeholders = set(re.findall(r"\{(\w+)\}", spec["command"]))
    assert declared == placeholders, f"{entry}: declared {declared ^ placeholders} not matched in command"
    assert spec["command"].startswith(f"python -m entrypoints.{entry} ")


@pytest.mark.parametrize("entry", ENTRIES)
def test_help_documents_every_parameter(entry: str, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # `python -m entrypoints.<entry> --help`, in this process (the imports are shared, not paid per entry).
    monkeypatch.setattr(sys, "argv", [f"entrypoints/{entry}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"entrypoints.{entry}", run_name="__main__", alter_sys=False)
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    command = MLPROJECT["entry_points"][entry]["command"]
    for flag in re.findall(r"(--[\w-]+) \{", command):
        assert flag in out, f"{entry} --help does not document {flag}"
    assert f"{entry}:" in out  # the module docstring is the description


def test_conda_env_lists_the_same_dependencies_as_pyproject() -> None:
    project = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["offline"]
    conda = yaml.safe_load((PROJECT_DIR / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip == wanted
    assert MLPROJECT["conda_env"] == "conda.yaml"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (PROJECT_DIR / "README.md").read_text()
    assert "make test" in readme
    assert re.search(r"^make test$", (PROJECT_DIR / ".ci" / "run").read_text(), re.M)


@pytest.mark.slow
def test_mlflow_run_data_logs_splits(tracking: str, data_csv) -> None:
    import os

    import mlflow

    bin_dir = Path(sys.executable).parent  # `mlflow run --env-manager local` runs `python` from PATH
    out = subprocess.run(
        [str(bin_dir / "mlflow"), "run", ".", "-e", "data", "--env-manager", "local", "--experiment-name",
         "truthsteer", "-P", f"data={data_csv}"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = mlflow.search_runs(experiment_names=["truthsteer"], output_format="list")
    assert run.info.status == "FINISHED"
    assert {k: run.data.metrics[k] for k in ("n_pool", "n_train", "n_val", "n_test")} == {
        "n_pool": 60, "n_train": 80, "n_val": 40, "n_test": 80}
    assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == [
        "truthfulqa-pool", "truthfulqa-test", "truthfulqa-train", "truthfulqa-val"]
    from core.data import load_splits_from_run

    assert [len(v) for v in load_splits_from_run(run.info.run_id).values()] == [60, 80, 40, 80]
