"""What logging through the lab's tracking server costs (target: < 10% of the wall time), side by side in one run:
the smoke ``full`` run on smollm2-135m against a fresh sqlite store, then the same command against a fresh
``mlflow server`` (``core.server``: PostgreSQL, served artifacts, basic auth) on loopback, as a user of it.

    python -m benchmarks.server [--pg-url URL] [--data PATH] [--overrides "..."]

``--pg-url`` (default ``$TRUTHSTEER_TEST_PG_URL``, as ``.ci/postgres.sh`` prints it) names a PostgreSQL server
whose role may create databases; a fresh database is created and dropped. Each run has its own outputs folder
(no generation is reused between them) and the converted-model cache is warm for both. Writes
``benchmarks/results/server.json``: both wall times, per-stage times, the overhead, and whether the two runs'
variant metrics agree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import mlflow

from benchmarks import DATA_CSV, PROJECT_DIR, RESULTS_DIR, write_report
from core import server as lab_server

RESULTS = RESULTS_DIR / "server.json"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _full(env: dict[str, str], args: argparse.Namespace) -> float:
    command = [sys.executable, "-m", "entrypoints.full", "--data", args.data, "--overrides", args.overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"full failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def _measured(uri: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Per-stage seconds and each variant's metrics (no timing metrics) of the store at ``uri``."""
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    stages = {r.data.tags["truthsteer.pipeline_stage"]: round((r.info.end_time - r.info.start_time) / 1000, 1)
              for r in runs if r.data.tags.get("truthsteer.pipeline_stage")}
    variants = {r.data.tags["truthsteer.variant"]: {k: v for k, v in r.data.metrics.items()
                                                    if "seconds" not in k and not k.startswith("profile/")}
                for r in runs if r.data.tags.get("truthsteer.stage") == "evaluate.variant"}
    return stages, variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg-url", default=os.environ.get("TRUTHSTEER_TEST_PG_URL", ""))
    parser.add_argument("--data", default=str(DATA_CSV))
    parser.add_argument("--overrides", default="")
    args = parser.parse_args()
    if not args.pg_url:
        sys.exit("error: no PostgreSQL: pass --pg-url or set TRUTHSTEER_TEST_PG_URL (bash .ci/postgres.sh prints one)")
    import psycopg2
    from sqlalchemy.engine import make_url

    base = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "NO_PROXY": "127.0.0.1,localhost"}
    base.pop("MLFLOW_RUN_ID", None)
    result: dict[str, Any] = {"command": f"python -m entrypoints.full --data {args.data} --overrides {args.overrides!r}"}
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_uri = f"sqlite:///{tmp}/mlflow.db"
        mlflow.MlflowClient(sqlite_uri).create_experiment("truthsteer", artifact_location=f"file://{tmp}/mlruns")
        sqlite_seconds = _full({**base, "MLFLOW_TRACKING_URI": sqlite_uri, "TRUTHSTEER_OUTPUTS": f"{tmp}/out-sqlite"},
                               args)
        sqlite_stages, sqlite_metrics = _measured(sqlite_uri)

        parsed = make_url(args.pg_url)
        name = f"ts_bench_{uuid.uuid4().hex[:10]}"
        admin = psycopg2.connect(host=parsed.host, port=parsed.port, user=parsed.username, password=parsed.password,
                                 dbname=parsed.database)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        port, admin_password = _free_port(), secrets.token_urlsafe(18)
        server_env = {**base, lab_server.DB_ENV: parsed._replace(database=name, password=None).render_as_string(
            hide_password=False), lab_server.ARTIFACTS_ENV: f"{tmp}/server-artifacts", lab_server.PORT_ENV: str(port),
            lab_server.ADMIN_PASSWORD_ENV: admin_password, "PGPASSWORD": parsed.password or ""}
        uri = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "core.server"], cwd=PROJECT_DIR, env=server_env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if not lab_server.wait_until_up(lab_server.settings_from_env(server_env), proc, timeout=180):
                sys.exit(f"the server did not start:\n{log.read_text()[-3000:]}")
            user_password = secrets.token_urlsafe(18)
            os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=admin_password,
                              NO_PROXY="127.0.0.1,localhost")
            # a researcher of the lab: EDIT on the shared experiment (created by the admin)
            lab_server.add_user(uri, "bench", user_password, experiments=["truthsteer"], permission="EDIT")
            client_env = {**base, "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "bench",
                          "MLFLOW_TRACKING_PASSWORD": user_password, "TRUTHSTEER_OUTPUTS": f"{tmp}/out-server"}
            client_env = {k: v for k, v in client_env.items() if not k.startswith(("TRUTHSTEER_SERVER", "TRUTHSTEER_ADMIN"))}
            server_seconds = _full(client_env, args)
            server_stages, server_metrics = _measured(uri)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
            with contextlib.suppress(ProcessLookupError):  # nothing of the server's group outlives the benchmark
                os.killpg(proc.pid, signal.SIGKILL)
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            admin.close()
    same = sqlite_metrics.keys() == server_metrics.keys() and all(
        sqlite_metrics[v].keys() == server_metrics[v].keys()
        and all(abs(sqlite_metrics[v][k] - server_metrics[v][k]) <= 1e-9 for k in sqlite_metrics[v])
        for v in sqlite_metrics)
    result.update({
        "sqlite_wall_seconds": round(sqlite_seconds, 1), "server_wall_seconds": round(server_seconds, 1),
        "server_overhead": round(server_seconds / sqlite_seconds - 1, 3), "target_overhead": 0.10,
        "sqlite_stage_seconds": dict(sorted(sqlite_stages.items())),
        "server_stage_seconds": dict(sorted(server_stages.items())),
        "variant_metrics_equal": same,
        "note": "the two runs ran one after the other on the same machine; run-to-run variation of a smoke `full` "
                "on this CPU has been up to 15%",
    })
    print(result)
    write_report(RESULTS, result)


if __name__ == "__main__":
    main()
