"""The first hour of a new user: bad input fails before anything runs, in one line that names the value and
the fix, and leaves no run behind; degenerate answers fail their variant instead of being scored.

Each test here failed before its fix: split sizes above the data printed a ValueError traceback (and a dry
run claimed 100000 test questions), ``full --dry-run`` said ``data: would run`` for a missing file or an
unreachable hub, ``eval.max_new_tokens=10**9`` was accepted, and answers that repeat one word were scored.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from core.config import ConfigError
from core.config_io import load_config
from evaluation.degenerate import DegenerateAnswers, answer_rates, is_degenerate
from stages import evaluate
from tests.conftest import DATA_CSV, PROJECT_DIR
from tests.test_evaluate import run_entrypoint, tiny_rows


def no_runs() -> bool:
    return mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.parametrize("argv", [
    ["evaluate", "--variants", "baseline", "--dry-run"],
    ["full", "--dry-run"],
    ["data"],  # a real run
])
def test_split_sizes_above_the_data_fail_in_one_line_naming_the_count(
        tracking: str, outputs: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, _, err = run_entrypoint(argv[0], [*argv[1:], "--data", str(DATA_CSV), "--overrides", "data.test=100000"],
                                  capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "data.test=100000 total 100180, but the data holds 817 questions" in err and "data.test=637" in err
    assert no_runs()


@pytest.mark.parametrize(("data", "message"), [
    ("/nonexistent/TruthfulQA.csv", "data file '/nonexistent/TruthfulQA.csv' does not exist"),
    ("truthfulqa/truthful_qa", "the Hugging Face hub is unreachable, cannot download 'truthfulqa/truthful_qa'"),
])
def test_the_full_dry_run_checks_the_data_source_as_the_run_would(
        tracking: str, outputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], data: str, message: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached copy of the hub file
    code, out, err = run_entrypoint("full", ["--data", data, "--dry-run"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "would run" not in out
    assert no_runs()


def test_lengths_beyond_the_model_context_fail_before_any_weight_loads(
        tracking: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens=1000000000 does not fit smollm2-135m's context of "
                                          r"8192 tokens \(model.context_length\); use at most 8191"):
        load_config("smollm2-135m", "eval.max_new_tokens=1000000000")
    with pytest.raises(ConfigError, match="extract.max_length=40000 does not fit gemma-3-270m's context of 32768"):
        load_config("gemma-3-270m", "extract.max_length=40000")
    code, _, err = run_entrypoint("evaluate", ["--variants", "baseline", "--overrides",
                                               "eval.max_new_tokens=1000000000"], capsys)
    assert code == 2 and err.startswith("error: eval.max_new_tokens=1000000000 does not fit") and err.count("\n") == 1
    assert no_runs()


def test_empty_and_repetitive_answers_are_counted() -> None:
    real = {  # answers seen on gemma-3-270m: caa at relative scale 0.3 (degenerate) and baseline
        "A\n" + "particular\n" * 40: True,
        "A general general answer to this general general answer to this general general\ngeneral general a "
        "general a general a general a": True,
        "   ": True,
        "The law does not require a driver to have a blood test to prove a driver is under the influence.": False,
        "No.": False,
        "no no no": False,  # too short to call repetitive
    }
    assert {a: is_degenerate(a) for a in real} == real
    assert answer_rates(list(real)) == {"empty_answer_rate": 1 / 6, "degenerate_answer_rate": 3 / 6}


def test_a_variant_with_degenerate_answers_fails_its_run_after_logging(tracking: str) -> None:
    cfg = load_config("smollm2-135m", "eval.n_bootstrap=200,eval.batch_size=4,eval.judges=[bleu]")
    rows, _, _ = tiny_rows(cfg)
    for row in rows["caa"]:
        row["answer"] = "the " * 20
    info = {v: {"model": "tiny-llama", "dtype": "float32", "layer": 1 if v == "caa" else None,
                "scale": 1.0 if v == "caa" else None} for v in rows}
    extra = {v: {**answer_rates([str(r["answer"]) for r in rs]), "steered_tokens_per_answer": 1.0}
             for v, rs in rows.items()}
    from core.tracking import stage_run
    from evaluation.judges import make_judge

    judge = make_judge("bleu", cfg)
    with pytest.raises(DegenerateAnswers, match="caa: degenerate_answer_rate=1.000 exceeds eval.degenerate_ceiling"), \
            stage_run("evaluate", cfg) as parent:
        evaluate.judge_and_log(cfg, rows, lambda v: [judge], info, extra_metrics=extra)
    children = {r.data.tags["truthsteer.variant"]: r for r in mlflow.MlflowClient().search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert children["baseline"].info.status == "FINISHED"
    assert children["caa"].info.status == "FAILED" and children["caa"].data.metrics["degenerate_answer_rate"] == 1.0


@pytest.mark.parametrize("alias", ["../../escaped", "a/b", "..", "/abs", "x\\y"])
def test_an_alias_that_is_not_a_plain_name_is_refused_from_any_source(
        tracking: str, capsys: pytest.CaptureFixture[str], alias: str) -> None:
    """The alias names the converted-model cache, stores and run names: no config path leaves its folder."""
    from core.config_io import config_from_dict, config_to_dict

    with pytest.raises(ConfigError, match="must be a plain name"):
        load_config("smollm2-135m", f"model.alias={alias}")
    logged = config_to_dict(load_config("smollm2-135m"))
    logged["model"]["alias"] = alias
    with pytest.raises(ConfigError, match="must be a plain name"):
        config_from_dict(logged)  # a config read back from a run
    code, _, err = run_entrypoint("extract", ["--model", "smollm2-135m", "--data", str(DATA_CSV), "--overrides",
                                              f"model.alias={alias}"], capsys)
    assert code == 2 and "must be a plain name" in err
    assert no_runs()


def test_paths_from_a_valid_alias_stay_in_their_folders(outputs: Path, tmp_path: Path) -> None:
    from core.models import converted_dir
    from evaluation.generation_store import default_store_path

    cfg = load_config("gemma-3-270m", "model.alias=gemma-3-270m.v2_local")
    assert converted_dir(cfg.model, str(tmp_path)).resolve().parent == (tmp_path / "converted").resolve()
    store = default_store_path(cfg.model, "float32", cfg.eval).resolve()
    assert store.parent.parent == (outputs / "evaluate").resolve()


def test_a_launch_that_never_reached_its_entry_point_is_failed_by_the_next_stage(tracking: str) -> None:
    """`mlflow run` without --env-manager local and without conda creates a run, then fails: not left RUNNING."""
    import time

    from core.tracking import TAG_REAPED, stage_run

    cfg = load_config("smollm2-135m", f"data.source={DATA_CSV}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    now = int(time.time() * 1000)
    launch = {"mlflow.project.entryPoint": "full"}
    old = client.create_run(experiment, start_time=now - 2 * 3600 * 1000, tags=launch).info.run_id
    recent = client.create_run(experiment, start_time=now - 60 * 1000, tags=launch).info.run_id  # may still start
    started = client.create_run(experiment, start_time=now - 2 * 3600 * 1000,
                                tags={**launch, "truthsteer.stage": "full"}).info.run_id  # its own process
    with stage_run("data", cfg):
        pass
    assert client.get_run(old).info.status == "FAILED" and "--env-manager local" in client.get_run(old).data.tags[TAG_REAPED]
    assert client.get_run(recent).info.status == client.get_run(started).info.status == "RUNNING"


SENTINEL = "s3ntinel-Pa55"


def test_a_password_in_the_storage_never_reaches_the_store(
        tracking: str, outputs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`mlflow run . -e tune -P storage=postgresql://u:<password>@...` logged the password as a param: the tune
    entry point refuses it, deletes the run the launcher made, and nothing in the store holds it."""
    from stages import tune_storage

    url = f"postgresql://u:{SENTINEL}@127.0.0.1:9/db"
    with pytest.raises(ConfigError, match=r"storage=postgresql://u:\*\*\*@127.0.0.1:9/db holds a password.*PGPASSWORD"):
        tune_storage.TuneSettings(storage=url)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("truthsteer").experiment_id
    launched = client.create_run(experiment, tags={"mlflow.project.entryPoint": "tune"}).info.run_id
    client.log_param(launched, "storage", url)  # what `mlflow run` does with -P storage=...
    monkeypatch.setenv("MLFLOW_RUN_ID", launched)
    code, out, err = run_entrypoint("tune", ["--data", str(DATA_CSV), "--storage", url], capsys)
    assert code == 2 and "holds a password" in err and "mlflow gc" in err and SENTINEL not in out + err
    assert client.get_run(launched).info.lifecycle_stage == "deleted"
    live = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert not any(SENTINEL in str(r.data.params) + str(r.data.tags) for r in live)
    # the password's place: the environment (the whole URL), never an argument
    monkeypatch.setenv(tune_storage.STORAGE_ENV, url)
    assert tune_storage.storage_url("") == url and tune_storage.TuneSettings().storage == ""


OPEN_AND_LOG = """
import sys
from core.config_io import load_config
from core.tracking import stage_run
from stages.tune_storage import open_storage
kind, uri = sys.argv[1], sys.argv[2]
if kind == "mlflow":
    cfg = load_config("smollm2-135m", "tracking.uri=" + uri)
    with stage_run("data", cfg) as run:
        print(run.info.run_id)
else:
    open_storage(uri, heartbeat=0).get_all_studies()
    print("opened")
"""


def start_together(kind: str, uri: str, n: int = 4) -> list[subprocess.CompletedProcess[str]]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri if kind == "mlflow" else os.environ["MLFLOW_TRACKING_URI"]}
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AND_LOG, kind, uri], cwd=PROJECT_DIR, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


@pytest.mark.long
def test_four_processes_on_a_brand_new_sqlite_store_all_succeed(tracking: str, tmp_path: Path) -> None:
    """3 of 4 processes used to crash on the alembic migration of a new MLflow store; Optuna's too."""
    for kind, uri in (("mlflow", f"sqlite:///{tmp_path}/fresh/mlflow.db"), ("optuna", f"sqlite:///{tmp_path}/o.db")):
        done = start_together(kind, uri)
        assert [p.returncode for p in done] == [0] * 4, "\n".join(p.stderr[-2000:] for p in done)
    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path}/fresh/mlflow.db").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{tmp_path}/fresh/mlflow.db").get_experiment_by_name("truthsteer").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
def test_four_workers_on_a_brand_new_postgres_schema_all_succeed(tracking: str) -> None:
    """2 of 3 tune workers used to fail on a new PostgreSQL database (UniqueViolation ... CREATE TYPE
    studydirection); a fresh schema of the CI database is just as new."""
    import uuid

    import sqlalchemy

    url = os.environ.get("TRUTHSTEER_TEST_PG_URL", "")
    if not url:
        pytest.skip("TRUTHSTEER_TEST_PG_URL is not set; run .ci/postgres.sh and export its URL")
    url = url.replace("postgresql://", "postgresql+psycopg2://", 1)  # MLflow's SQLAlchemy would pick psycopg 3
    schemas = {kind: f"fresh_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("optuna", "mlflow")}  # each its own:
    engine = sqlalchemy.create_engine(url)  # both keep an alembic_version table
    with engine.begin() as conn:
        for schema in schemas.values():
            conn.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    try:
        for kind, schema in schemas.items():
            done = start_together(kind, f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}")
            assert [p.returncode for p in done] == [0] * 4, "\n".join(p.stderr[-2000:] for p in done)
    finally:
        with engine.begin() as conn:
            for schema in schemas.values():
                conn.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))


def test_an_unreachable_tracking_server_fails_in_seconds_in_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    started = time.monotonic()
    code, _, err = run_entrypoint("data", ["--data", str(DATA_CSV)], capsys)
    assert time.monotonic() - started < 15
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: tracking server http://127.0.0.1:9 is unreachable")


def _data_stage(store: Path, *, read_only: bool = False, file_limit: int = 0) -> subprocess.Popen[str]:
    """The data stage on a sqlite store at `store`, unable to pass the folders' permissions (as root too: the
    process loses CAP_DAC_OVERRIDE) or to write any file beyond `file_limit` bytes (a full disk)."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    command = [sys.executable, "-m", "entrypoints.data", "--data", str(DATA_CSV)]
    if read_only and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("as root, a read-only folder needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    return subprocess.Popen(command, cwd=store.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=limit if file_limit else None)


@pytest.mark.long
def test_a_read_only_or_full_store_fails_in_one_line(tmp_path: Path) -> None:
    existing = tmp_path / "existing" / "mlflow.db"
    existing.parent.mkdir()
    mlflow.MlflowClient(f"sqlite:///{existing}").search_experiments()  # created (and migrated) beforehand
    fresh = tmp_path / "fresh" / "mlflow.db"
    fresh.parent.mkdir()
    for folder in (existing.parent, fresh.parent):
        folder.chmod(0o555)
    existing.chmod(0o444)
    full = tmp_path / "full" / "mlflow.db"
    full.parent.mkdir()
    later = tmp_path / "later" / "mlflow.db"  # the store opens, then the disk fills mid-run
    shutil.copytree(existing.parent, later.parent)
    later.parent.chmod(0o755)
    later.chmod(0o644)
    # No file may grow past 100 kB: the store's pages beyond it and the 240 kB splits artifact are refused.
    started = {"read-only store": _data_stage(existing, read_only=True),
               "fresh store in a read-only folder": _data_stage(fresh, read_only=True),
               "full disk on a fresh store": _data_stage(full, file_limit=64 * 1024),
               "full disk mid-run": _data_stage(later, file_limit=100 * 1024)}
    results = {case: (proc.wait(timeout=300), proc.communicate()[1]) for case, proc in started.items()}
    for case, (code, err) in results.items():
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code in (1, 2) and "Traceback" not in err, (case, err[-2000:])
        assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], (case, err)
    for case in ("read-only store", "fresh store in a read-only folder", "full disk on a fresh store"):
        assert results[case][1].strip().endswith("or set MLFLOW_TRACKING_URI to another store, e.g. "
                                                 "sqlite:///mlflow.db"), case
    assert "error: a write was refused (" in results["full disk mid-run"][1]


SLEEPING_STAGE = """
import time
from core.config_io import load_config
from core.tracking import stage_run
from entrypoints import _cli

def work():
    with stage_run("data", load_config("smollm2-135m")) as run:
        print(run.info.run_id, flush=True)
        time.sleep(120)

_cli.main(work)
"""


@pytest.mark.long
def test_sigterm_ends_the_run_killed_with_one_line_and_no_traceback(tracking: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SLEEPING_STAGE], cwd=PROJECT_DIR, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1].startswith(f"stopped (signal {signal.SIGTERM}): the run is marked KILLED")
    assert mlflow.get_run(run_id).info.status == "KILLED"
