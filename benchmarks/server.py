"""What logging through the lab's tracking server costs (target: < 10% of the wall time), side by side in one run:
the smoke ``full`` run on smollm2-135m against a fresh sqlite store and the same command against a fresh experiment
of an ``mlflow server`` (``core.server``: PostgreSQL, served artifacts, basic auth) on loopback, as a user of it,
each twice, in the order sqlite, server, server, sqlite (a drift of the machine's speed cancels out of the means).

    python -m benchmarks.server [--pg-url URL] [--data PATH] [--overrides "..."]

``--pg-url`` (default ``$TRUTHSTEER_TEST_PG_URL``, as ``.ci/postgres.sh`` prints it) names a PostgreSQL server
whose role may create databases; a fresh database is created and dropped. Each run has its own outputs folder
(no generation is reused between them) and the converted-model cache is warm for both. Writes
``benchmarks/results/server.json``: the four wall times, the means, per-stage means, the overhead of the means,
and whether the four runs' variant metrics agree.
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
# each store twice, in the order A B B A: a machine that slows down (or speeds up) over the hour does so for both
ORDER = (("sqlite", "bench-a"), ("server", "bench-a"), ("server", "bench-b"), ("sqlite", "bench-b"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _full(env: dict[str, str], data: str, overrides: str) -> float:
    command = [sys.executable, "-m", "entrypoints.full", "--data", data, "--overrides", overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"full failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def _measured(uri: str, experiment: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Per-stage seconds and each variant's metrics (no timing metrics) of ``experiment`` in the store at ``uri``."""
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    stages = {r.data.tags["truthsteer.pipeline_stage"]: round((r.info.end_time - r.info.start_time) / 1000, 1)
              for r in runs if r.data.tags.get("truthsteer.pipeline_stage")}
    variants = {r.data.tags["truthsteer.variant"]: {k: v for k, v in r.data.metrics.items()
                                                    if "seconds" not in k and not k.startswith("profile/")}
                for r in runs if r.data.tags.get("truthsteer.stage") == "evaluate.variant"}
    return stages, variants


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 1)


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
    result: dict[str, Any] = {"command": f"python -m entrypoints.full --data {args.data} --overrides {args.overrides!r}",
                              "order": [store for store, _ in ORDER]}
    walls: dict[str, list[float]] = {"sqlite": [], "server": []}
    stages: dict[str, list[dict[str, float]]] = {"sqlite": [], "server": []}
    metrics: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
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
            # a researcher of the lab: EDIT on the shared experiments (created by the admin)
            lab_server.add_user(uri, "bench", user_password, experiments=[exp for _, exp in ORDER], permission="EDIT")
            client_env = {k: v for k, v in base.items() if not k.startswith(("TRUTHSTEER_SERVER", "TRUTHSTEER_ADMIN"))}
            client_env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME="bench",
                              MLFLOW_TRACKING_PASSWORD=user_password)
            for i, (store, experiment) in enumerate(ORDER):
                overrides = ",".join(filter(None, [args.overrides, f"tracking.experiment={experiment}"]))
                if store == "sqlite":  # a fresh store each time, its artifacts in tmp
                    store_uri = f"sqlite:///{tmp}/mlflow-{i}.db"
                    mlflow.MlflowClient(store_uri).create_experiment(experiment,
                                                                     artifact_location=f"file://{tmp}/mlruns-{i}")
                    env = {**base, "MLFLOW_TRACKING_URI": store_uri}
                else:  # a fresh experiment on the same server: nothing to reuse
                    store_uri, env = uri, client_env
                walls[store].append(round(_full({**env, "TRUTHSTEER_OUTPUTS": f"{tmp}/out-{i}"}, args.data, overrides), 1))
                stage_seconds, variant_metrics = _measured(store_uri, experiment)
                stages[store].append(stage_seconds)
                metrics.append(variant_metrics)
                print(f"{i + 1}/{len(ORDER)} {store}: {walls[store][-1]:.1f} s", flush=True)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
            with contextlib.suppress(ProcessLookupError):  # nothing of the server's group outlives the benchmark
                os.killpg(proc.pid, signal.SIGKILL)
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            admin.close()
    first = metrics[0]
    same = all(m.keys() == first.keys() and all(
        m[v].keys() == first[v].keys() and all(abs(m[v][k] - first[v][k]) <= 1e-9 for k in first[v]) for v in first)
        for m in metrics)
    mean = {store: _mean(walls[store]) for store in walls}
    result.update({
        "sqlite_wall_seconds": walls["sqlite"], "server_wall_seconds": walls["server"],
        "sqlite_mean_seconds": mean["sqlite"], "server_mean_seconds": mean["server"],
        "server_overhead": round(mean["server"] / mean["sqlite"] - 1, 3), "target_overhead": 0.10,
        "sqlite_stage_seconds": {k: _mean([s.get(k, 0.0) for s in stages["sqlite"]]) for k in sorted(stages["sqlite"][0])},
        "server_stage_seconds": {k: _mean([s.get(k, 0.0) for s in stages["server"]]) for k in sorted(stages["server"][0])},
        "variant_metrics_equal": same,
        "note": "sqlite, server, server, sqlite on the same machine, so that a drift of its speed over the hour "
                "cancels out of the means; two smoke runs here have differed by up to 15%",
    })
    print(result)
    write_report(RESULTS, result)


if __name__ == "__main__":
    main()
