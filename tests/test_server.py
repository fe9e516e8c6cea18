"""The lab's tracking server (``core.server``), started for real: ``mlflow server`` with the basic-auth app on a fresh
PostgreSQL database (``TRUTHSTEER_TEST_PG_URL``, which .ci/postgres.sh prints; its role needs CREATEDB) and an
artifact folder in tmp_path, on a free loopback port.

A request without credentials or with a wrong password is refused (401); the read-only account reads but cannot
write (403); three ``data`` stages log at once through the server, each as its own user; an artifact downloaded
through the server equals the one logged (byte for byte, and the server's own copy); the admin and user passwords
appear in no param, tag, artifact, server log line or process argument list, and the auth ini the server reads is
private. A server SIGKILLed between two ``data`` stage runs and started again on the same database loses no run,
param, metric or artifact, and keeps its admin; the ini a killed launcher leaves behind holds no password. A server
SIGKILLed while a smoke ``full`` generates, and started again, costs nothing: the run goes on (MLflow's client retries),
every stage's artifacts and every variant's metrics equal those of the same pipeline on a sqlite store, no answer is
generated twice, a second ``full`` reuses every stage, and ``analyze`` writes the same tables and report from both.
Without PostgreSQL: the settings, the private ini and the server's arguments and environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import requests

from core import server as lab_server
from core.config import ConfigError
from tests.conftest import DATA_CSV, PROJECT_DIR

LAB = "lab"
USERS = ("alice", "bob", "carol")
SCREEN = "screen"


def test_settings_move_the_database_password_out_of_the_url_and_read_the_admin_password_from_a_file(
        tmp_path: Path) -> None:
    secret_file = tmp_path / "admin.txt"
    secret_file.write_text("s3cret-from-a-file\n")
    settings = lab_server.settings_from_env({lab_server.DB_ENV: "postgresql://mlflow:pg-pass@db.lab:5433/mlflow",
                                             lab_server.ADMIN_PASSWORD_FILE_ENV: str(secret_file),
                                             lab_server.ARTIFACTS_ENV: str(tmp_path / "art")})
    assert settings.db == settings.auth_db == "postgresql+psycopg2://mlflow@db.lab:5433/mlflow"
    assert (settings.db_password, settings.admin_password) == ("pg-pass", "s3cret-from-a-file")
    assert (settings.host, settings.port, settings.loopback) == ("127.0.0.1", 5000, True)
    assert "pg-pass" not in repr(settings) and "s3cret" not in repr(settings)
    command = lab_server.server_command(settings)
    assert not [arg for arg in command if "pg-pass" in arg or "s3cret" in arg]
    assert command[command.index("--app-name") + 1] == "basic-auth" and "--serve-artifacts" in command
    assert command[command.index("--gunicorn-opts") + 1] == lab_server.GUNICORN_OPTS  # not uvicorn: see there
    ini = lab_server.write_auth_ini(tmp_path, settings)
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600 and "default_permission = READ" in ini.read_text()
    assert "admin_password = s3cret-from-a-file" in ini.read_text()
    assert lab_server.write_auth_ini(tmp_path, settings, with_password=False) == ini  # replaced, still 0600
    assert "s3cret" not in ini.read_text() and stat.S_IMODE(ini.stat().st_mode) == 0o600
    env = lab_server.server_env(settings, ini, {lab_server.ADMIN_PASSWORD_ENV: "x", "MLFLOW_TRACKING_URI": "sqlite://"})
    assert env["PGPASSWORD"] == "pg-pass" and env["MLFLOW_AUTH_CONFIG_PATH"] == str(ini)
    assert lab_server.ADMIN_PASSWORD_ENV not in env and "MLFLOW_TRACKING_URI" not in env
    assert not lab_server.ServerSettings(settings.db, settings.auth_db, settings.artifacts, admin_password="x" * 12,
                                         host="0.0.0.0").loopback


@pytest.mark.parametrize(("env", "error"), [
    ({}, "set TRUTHSTEER_SERVER_DB"),
    ({lab_server.DB_ENV: "sqlite:///x.db", lab_server.ADMIN_PASSWORD_ENV: "x" * 12}, "must be a PostgreSQL URL"),
    ({lab_server.DB_ENV: "postgresql://m@h/d"}, "set TRUTHSTEER_ADMIN_PASSWORD, or TRUTHSTEER_ADMIN_PASSWORD_FILE"),
    ({lab_server.DB_ENV: "postgresql://m@h/d", lab_server.ADMIN_PASSWORD_ENV: "short"}, "has 5 characters"),
    ({lab_server.DB_ENV: "postgresql://m@h/d", lab_server.ADMIN_PASSWORD_ENV: "x" * 12, lab_server.PORT_ENV: "http"},
     "must be integers"),
])
def test_bad_settings_fail_with_the_fix(env: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        lab_server.settings_from_env(env)


@pytest.fixture
def pg_url() -> str:
    url = os.environ.get("TRUTHSTEER_TEST_PG_URL", "")
    if not url:
        pytest.skip("TRUTHSTEER_TEST_PG_URL is not set; run .ci/postgres.sh and export its URL (as .ci/run does)")
    return url


@contextlib.contextmanager
def fresh_database(url: str) -> Iterator[tuple[str, str]]:
    """A new database on the server of ``url``, dropped afterwards: its URL without the password, and the password."""
    import psycopg2
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    name = f"ts_server_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host=parsed.host, port=parsed.port, user=parsed.username, password=parsed.password,
                             dbname=parsed.database)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            try:
                cur.execute(f"CREATE DATABASE {name}")
            except psycopg2.errors.InsufficientPrivilege:
                pytest.skip(f"role {parsed.username} may not create databases; rerun .ci/postgres.sh (it grants CREATEDB)")
        bare = parsed._replace(database=name, password=None).render_as_string(hide_password=False)
        yield bare, parsed.password or ""
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        admin.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    uri: str
    env: dict[str, str]  # what the launcher got: the settings, PGPASSWORD and the admin password
    artifacts: Path
    admin_password: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self, log: Path) -> None:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "core.server"], cwd=PROJECT_DIR, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if not lab_server.wait_until_up(lab_server.settings_from_env(self.env), self.proc, timeout=120):
            raise AssertionError(f"the server exited ({self.proc.poll()}) or did not answer /health within 120 s:\n"
                                 f"{log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        if self.proc is not None:  # nothing of its group outlives the test, even after a failed start
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the launcher, ``mlflow server`` and its workers at once (their own process group)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def client_env(self, user: str, password: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRUTHSTEER_SERVER", "TRUTHSTEER_ADMIN"))}
        env.pop("MLFLOW_RUN_ID", None)
        return {**env, "MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": password, "NO_PROXY": "127.0.0.1,localhost"}

    def auth_ini(self) -> Path:
        """The auth ini the launcher wrote: its child, ``mlflow server``, is told it in MLFLOW_AUTH_CONFIG_PATH."""
        assert self.proc is not None
        (child,) = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        environ = Path(f"/proc/{child}/environ").read_bytes().decode().split("\0")
        return Path(next(line.split("=", 1)[1] for line in environ if line.startswith("MLFLOW_AUTH_CONFIG_PATH=")))


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback: no proxy
    return session


@pytest.fixture
def lab(pg_url: str, tmp_path: Path) -> Iterator[Server]:
    """A started server on a fresh database; stopped and dropped afterwards."""
    with fresh_database(pg_url) as (db, pg_password):
        admin_password = secrets.token_urlsafe(18)
        port = _free_port()
        env = {**os.environ, lab_server.DB_ENV: db, lab_server.ARTIFACTS_ENV: str(tmp_path / "artifacts"),
               lab_server.PORT_ENV: str(port), lab_server.WORKERS_ENV: "2", lab_server.ADMIN_PASSWORD_ENV: admin_password,
               "PGPASSWORD": pg_password, "NO_PROXY": "127.0.0.1,localhost"}
        running = Server(f"http://127.0.0.1:{port}", env, tmp_path / "artifacts", admin_password)
        try:
            running.start(tmp_path / "server.log")
            yield running
        finally:
            running.stop()


@contextlib.contextmanager
def as_user(server: Server, user: str, password: str) -> Iterator[mlflow.MlflowClient]:
    """An MLflow client of ``server`` that authenticates as ``user`` for the block."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "NO_PROXY")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password, NO_PROXY="127.0.0.1,localhost")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.uri)
    try:
        yield mlflow.MlflowClient(server.uri)
    finally:
        mlflow.set_tracking_uri(previous)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _status(server: Server, method: str, path: str, auth: tuple[str, str] | None, **kwargs: object) -> int:
    response = _session().request(method, f"{server.uri}/api/2.0/mlflow/{path}", auth=auth, timeout=30, **kwargs)
    return response.status_code


@pytest.mark.long
def test_accounts_permissions_concurrent_stages_artifacts_and_no_leaked_secret(lab: Server, tmp_path: Path) -> None:
    passwords = {name: secrets.token_urlsafe(15) for name in (*USERS, SCREEN)}
    admin = ("admin", lab.admin_password)
    # the account commands: alice through the CLI (her password from the environment), the others in-process
    made = subprocess.run([sys.executable, "-m", "core.server", "add-user", "alice", "--experiment", LAB,
                           "--permission", "EDIT"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120,
                          env={**lab.client_env(*admin), "TRUTHSTEER_USER_PASSWORD": passwords["alice"]})
    assert made.returncode == 0, made.stderr[-2000:]
    with as_user(lab, *admin):
        for name in ("bob", "carol"):
            lab_server.add_user(lab.uri, name, passwords[name], experiments=[LAB], permission="EDIT")
        lab_server.add_user(lab.uri, SCREEN, passwords[SCREEN])
        lab_id = mlflow.MlflowClient(lab.uri).get_experiment_by_name(LAB).experiment_id

    # strangers and wrong passwords: 401; the screen reads (default_permission = READ) but cannot write: 403
    get_lab = ("GET", "experiments/get-by-name")
    assert _status(lab, *get_lab, None, params={"experiment_name": LAB}) == 401
    assert _status(lab, *get_lab, ("alice", passwords["bob"]), params={"experiment_name": LAB}) == 401
    assert _status(lab, *get_lab, ("mallory", passwords["alice"]), params={"experiment_name": LAB}) == 401
    assert _status(lab, *get_lab, (SCREEN, passwords[SCREEN]), params={"experiment_name": LAB}) == 200
    assert _status(lab, "POST", "runs/create", (SCREEN, passwords[SCREEN]), json={"experiment_id": lab_id}) == 403
    assert _status(lab, "POST", "runs/create", None, json={"experiment_id": lab_id}) == 401

    # three researchers' stages at once, each as its own user, while `ps` watches the argument lists
    stages = [subprocess.Popen([sys.executable, "-m", "entrypoints.data", "--data", str(DATA_CSV), "--overrides",
                                f"tracking.experiment={LAB},data.seed={seed}"], cwd=PROJECT_DIR,
                               env=lab.client_env(user, passwords[user]), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
              for seed, user in enumerate(USERS)]
    process_args = []
    while any(p.poll() is None for p in stages):
        process_args.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)
        time.sleep(1)
    outputs = [p.communicate()[0] for p in stages]
    assert [p.returncode for p in stages] == [0, 0, 0], "\n".join(out[-2000:] for out in outputs)
    process_args.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)

    with as_user(lab, SCREEN, passwords[SCREEN]):  # the read-only account reads every run and artifact
        runs = mlflow.MlflowClient(lab.uri).search_runs([lab_id])
        assert sorted(r.data.tags["mlflow.user"] for r in runs) == sorted(USERS)
        assert {r.info.status for r in runs} == {"FINISHED"}
        assert sorted(r.data.params["data.seed"] for r in runs) == ["0", "1", "2"]
        for run in runs:
            fetched = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data/splits.json",
                                                          dst_path=str(tmp_path / run.info.run_id))
            stored = lab.artifacts / lab_id / run.info.run_id / "artifacts" / "data" / "splits.json"
            assert Path(fetched).read_bytes() == stored.read_bytes()
        own = runs[0]
        # nor may the screen write to a run of the lab
        assert _status(lab, "POST", "runs/set-tag", (SCREEN, passwords[SCREEN]),
                       json={"run_id": own.info.run_id, "key": "x", "value": "y"}) == 403
    with as_user(lab, "bob", passwords["bob"]):  # bytes logged through the server come back unchanged
        payload = secrets.token_bytes(200_000)
        (tmp_path / "blob.bin").write_bytes(payload)
        client = mlflow.MlflowClient(lab.uri)
        blob_run = client.create_run(lab_id).info.run_id
        client.log_artifact(blob_run, str(tmp_path / "blob.bin"), "check")
        client.set_terminated(blob_run)
        assert Path(client.download_artifacts(blob_run, "check/blob.bin", str(tmp_path))).read_bytes() == payload

    with as_user(lab, *admin):  # a grant replaces the permission the user had: bob, down to READ, writes no more
        lab_server.grant(lab.uri, LAB, "bob", "READ")
    assert _status(lab, "POST", "runs/create", ("bob", passwords["bob"]), json={"experiment_id": lab_id}) == 403
    assert _status(lab, "POST", "runs/create", ("carol", passwords["carol"]), json={"experiment_id": lab_id}) == 200

    # the auth ini the server reads is private, and no secret is anywhere else
    ini = lab.auth_ini()
    assert stat.S_IMODE(os.stat(ini).st_mode) == 0o600 and stat.S_IMODE(os.stat(Path(ini).parent).st_mode) == 0o700
    assert "admin_username = admin" in ini.read_text()  # rewritten without the password once the server answered
    secrets_ = [lab.admin_password, *passwords.values()]
    with as_user(lab, *admin):
        everything = mlflow.MlflowClient(lab.uri).search_runs([lab_id])
    texts = {"params and tags": repr([(r.data.params, r.data.tags) for r in everything]),
             "server log": (tmp_path / "server.log").read_text(errors="replace"), "process arguments": "".join(process_args),
             "stage output": "".join(outputs), "auth ini": ini.read_text()}
    for path in lab.artifacts.rglob("*"):
        if path.is_file():
            texts[f"artifact {path}"] = path.read_bytes().decode(errors="replace")
    assert len(texts) > 8 and "mlflow server" in texts["process arguments"]
    assert "entrypoints.data" in texts["process arguments"]  # ps saw the stages, not only the server
    leaks = [(where, i) for where, text in texts.items() for i, secret in enumerate(secrets_) if secret in text]
    assert not leaks, f"secrets found in: {leaks}"


def _data_stage(server: Server, user: tuple[str, str], seed: int) -> str:
    """Run the ``data`` stage through ``server`` as ``user``; return its run id."""
    done = subprocess.run([sys.executable, "-m", "entrypoints.data", "--data", str(DATA_CSV), "--overrides",
                           f"tracking.experiment=restart,data.seed={seed}"], cwd=PROJECT_DIR,
                          env=server.client_env(*user), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with as_user(server, *user) as client:
        (run,) = client.search_runs([client.get_experiment_by_name("restart").experiment_id],
                                    f"params.`data.seed` = '{seed}'")
    return str(run.info.run_id)


@pytest.mark.long
def test_a_server_killed_between_two_stage_runs_loses_nothing_and_keeps_its_admin(lab: Server, tmp_path: Path) -> None:
    admin = ("admin", lab.admin_password)
    before = _data_stage(lab, admin, seed=0)
    with as_user(lab, *admin) as client:
        logged = client.get_run(before)
        splits = mlflow.artifacts.load_text(f"runs:/{before}/data/splits.json")
    ini = lab.auth_ini()
    lab.kill()  # SIGKILL, all of it: the launcher cannot clean up
    assert lab.admin_password not in ini.read_text()  # the ini it left behind holds no password
    shutil.rmtree(ini.parent)
    lab.env[lab_server.ADMIN_PASSWORD_ENV] = "another-password-ignored"  # the admin exists: its password stays
    lab.start(tmp_path / "server2.log")
    assert "Created admin user" not in (tmp_path / "server2.log").read_text()
    after = _data_stage(lab, admin, seed=1)
    with as_user(lab, *admin) as client:
        kept = client.get_run(before)
        assert (kept.info.status, kept.data.params, kept.data.metrics) == ("FINISHED", logged.data.params,
                                                                           logged.data.metrics)
        assert mlflow.artifacts.load_text(f"runs:/{before}/data/splits.json") == splits
        assert client.get_run(after).info.status == "FINISHED"
    second_ini = lab.auth_ini()
    lab.stop()  # SIGTERM: the launcher removes its folder
    assert not second_ini.parent.exists()


# one question per generate call and four per variant, so that the kill lands between two appended answers
EVAL_OVERRIDES = ("data.pool=4,data.train=4,data.val=2,data.test=4,mlp.steps=2,mlp.batch_size=2,eval.max_new_tokens=8,"
                  "eval.judges=[semantic,bleu],eval.n_bootstrap=50,effects.n_passages=2,eval.batch_size=1")
HEX_ID = re.compile(r"[0-9a-f]{32}")


def _stage(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def _artifact_paths(client: mlflow.MlflowClient, run_id: str, path: str = "") -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path or None):
        found.extend(_artifact_paths(client, run_id, item.path) if item.is_dir else [item.path])
    return sorted(found)


def _pipeline(client: mlflow.MlflowClient) -> tuple[dict[str, list[str]], dict[str, dict[str, float]], list[str]]:
    """What a store holds of the smoke pipeline: each stage's artifact paths, each variant's metrics (no timing),
    and the statuses of all its runs."""
    runs = client.search_runs([client.get_experiment_by_name("truthsteer").experiment_id], max_results=1000)
    stages = {r.data.tags["truthsteer.pipeline_stage"]: _artifact_paths(client, r.info.run_id)
              for r in runs if "truthsteer.pipeline_stage" in r.data.tags}
    variants = {r.data.tags["truthsteer.variant"]: {k: v for k, v in r.data.metrics.items() if "seconds" not in k}
                for r in runs if r.data.tags.get("truthsteer.stage") == "evaluate.variant"}
    return stages, variants, sorted({r.info.status for r in runs})


def _report(out: Path) -> dict[str, str]:
    """The files ``analyze`` wrote that hold numbers and text (not the images), with run ids and times masked."""
    texts = {}
    for path in sorted(out.iterdir()):
        if path.suffix in (".csv", ".md"):
            text = HEX_ID.sub("<run>", path.read_text())
            texts[path.name] = re.sub(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?(\+00:00)?", "<time>", text)
    return texts


@pytest.mark.long
def test_a_server_restarted_during_an_evaluation_loses_nothing_and_analyze_reads_it_as_from_sqlite(
        lab: Server, tmp_path: Path) -> None:
    full = [sys.executable, "-m", "entrypoints.full", "--data", str(DATA_CSV), "--overrides", EVAL_OVERRIDES]
    analyze = [sys.executable, "-m", "entrypoints.analyze", "--experiment", "truthsteer"]
    # the reference: the same pipeline on a sqlite store
    sqlite_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    sqlite_env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", TRUTHSTEER_OUTPUTS=str(tmp_path / "sq"))
    _stage(full, sqlite_env)

    password = secrets.token_urlsafe(15)
    with as_user(lab, "admin", lab.admin_password):
        lab_server.add_user(lab.uri, "alice", password, experiments=["truthsteer"], permission="EDIT")
    outputs = tmp_path / "out"
    # a beat every second, so that requests meet the dead server; MLflow's client retries them with backoff
    env = {**lab.client_env("alice", password), "TRUTHSTEER_OUTPUTS": str(outputs), "TRUTHSTEER_HEARTBEAT_SECONDS": "1"}
    with open(tmp_path / "full.log", "wb") as log:
        proc = subprocess.Popen(full, cwd=PROJECT_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline, store = time.time() + 900, None
    while time.time() < deadline and proc.poll() is None:
        store = next(outputs.glob("evaluate/*/generations.jsonl"), None)
        if store is not None and len(store.read_bytes().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None and store is not None, (tmp_path / "full.log").read_text()[-3000:]
    answered = len(store.read_bytes().splitlines())
    lab.kill()  # the whole server, while the evaluation generates
    with pytest.raises(requests.ConnectionError):
        _session().get(f"{lab.uri}/health", timeout=5)
    time.sleep(5)
    lab.start(tmp_path / "server2.log")
    restarted = time.time()
    assert proc.wait(timeout=900) == 0, (tmp_path / "full.log").read_text()[-4000:]

    with as_user(lab, "alice", password) as client:
        stages, variants, statuses = _pipeline(client)
    reference = _pipeline(mlflow.MlflowClient(sqlite_env["MLFLOW_TRACKING_URI"]))
    assert statuses == ["FINISHED"] and answered < 4 * 4  # the kill came mid-evaluation; nothing is left RUNNING
    assert (stages, variants) == reference[:2]  # every stage's artifacts, every variant's metrics
    assert sorted(variants) == ["baseline", "caa", "mlp_gen", "mlp_mc"]
    keys = [(r["variant"], r["qid"]) for r in map(json.loads, store.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == 4 * 4  # no answer generated twice
    with as_user(lab, "alice", password) as client:  # the evaluation went on after the restart, in the same run
        (evaluation,) = client.search_runs([client.get_experiment_by_name("truthsteer").experiment_id],
                                           "tags.`truthsteer.stage` = 'evaluate'")
        assert evaluation.info.start_time / 1000 < restarted < evaluation.info.end_time / 1000

    again = _stage(full, env)  # a second run reuses every stage logged across the restart
    with as_user(lab, "alice", password) as client:
        (last,) = client.search_runs([client.get_experiment_by_name("truthsteer").experiment_id],
                                     "tags.`truthsteer.stage` = 'full'", order_by=["attributes.start_time DESC"],
                                     max_results=1)
        assert "reusing finished run" in again and set(last.data.tags["truthsteer.reused"].split(",")) == set(stages)
    _stage(full, sqlite_env)  # so that both stores hold the same runs

    _stage([*analyze, "--out-dir", str(tmp_path / "report-sqlite")], sqlite_env)
    _stage([*analyze, "--out-dir", str(tmp_path / "report-server")], env)
    from_sqlite, from_server = _report(tmp_path / "report-sqlite"), _report(tmp_path / "report-server")
    assert "variant_metrics.csv" in from_sqlite and "report.md" in from_sqlite
    assert from_server == from_sqlite
