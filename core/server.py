"""The lab's tracking server: ``mlflow server`` on PostgreSQL, with served artifacts and MLflow's basic-auth app,
and the accounts of the lab on it (docs/team.md).

    make server                                     # = python -m core.server
    python -m core.server add-user alice --experiment truthsteer-alice    # alice MANAGEs her experiment
    python -m core.server add-user screen --read-only                     # the lab's screen: reads only
    python -m core.server grant truthsteer bob EDIT                       # bob logs to a shared experiment

Starting the server reads (environment):
    TRUTHSTEER_SERVER_DB          the backend store, ``postgresql://USER@HOST:PORT/DB`` (required). Its password
                                  comes from PGPASSWORD or ~/.pgpass; one written into the URL is moved there, so
                                  that no process argument carries it.
    TRUTHSTEER_SERVER_AUTH_DB     the users and permissions (default: the same database; own tables).
    TRUTHSTEER_SERVER_ARTIFACTS   the served artifact folder, or an object store (``s3://bucket/path``);
                                  default ``$TRUTHSTEER_OUTPUTS/server/artifacts``.
    TRUTHSTEER_SERVER_HOST        127.0.0.1 by default; any other address prints a warning: put TLS in front.
    TRUTHSTEER_SERVER_PORT        5000; TRUTHSTEER_SERVER_WORKERS: 4.
    TRUTHSTEER_SERVER_AUTH_CACHE  seconds a worker trusts a checked password (60; 0 checks every request, at
                                  ~0.4 s each): a changed password or deleted user may pass for that long.
    TRUTHSTEER_ADMIN_USER         admin; TRUTHSTEER_ADMIN_PASSWORD, or a file TRUTHSTEER_ADMIN_PASSWORD_FILE:
                                  the admin's password, used when the first start creates the admin.
    MLFLOW_FLASK_SERVER_SECRET_KEY  the CSRF key of the sign-up form; a random one per start when unset.

The admin password reaches MLflow in a private ini file (0600, in a 0700 temp folder removed at exit) named by
MLFLOW_AUTH_CONFIG_PATH, never as an argument; once the server answers, the file is rewritten without it. The first start creates the tracking tables and the auth tables
(``first_open``: one of several launchers creates them, the others wait); later starts reuse them.

The account commands talk to a running server (``--uri``, default ``$MLFLOW_TRACKING_URI``) as an admin
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD); the new user's password comes from
TRUTHSTEER_USER_PASSWORD, a file named by TRUTHSTEER_USER_PASSWORD_FILE or ``--password-file``, never the command line.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.config import ConfigError

DB_ENV = "TRUTHSTEER_SERVER_DB"
AUTH_DB_ENV = "TRUTHSTEER_SERVER_AUTH_DB"
ARTIFACTS_ENV = "TRUTHSTEER_SERVER_ARTIFACTS"
HOST_ENV = "TRUTHSTEER_SERVER_HOST"
PORT_ENV = "TRUTHSTEER_SERVER_PORT"
WORKERS_ENV = "TRUTHSTEER_SERVER_WORKERS"
AUTH_CACHE_ENV = "TRUTHSTEER_SERVER_AUTH_CACHE"
ADMIN_USER_ENV = "TRUTHSTEER_ADMIN_USER"
ADMIN_PASSWORD_ENV = "TRUTHSTEER_ADMIN_PASSWORD"
ADMIN_PASSWORD_FILE_ENV = "TRUTHSTEER_ADMIN_PASSWORD_FILE"
USER_PASSWORD_ENV = "TRUTHSTEER_USER_PASSWORD"
USER_PASSWORD_FILE_ENV = "TRUTHSTEER_USER_PASSWORD_FILE"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
DEFAULT_PERMISSION = "READ"  # every account reads every experiment; writing needs EDIT or MANAGE on it
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
MIN_PASSWORD = 12
TLS_WARNING = ("warning: the tracking server listens on {host}, beyond this machine; basic auth sends passwords "
               "in clear text: put a TLS proxy (nginx, caddy) in front, or an SSH tunnel (docs/team.md)")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What ``mlflow server`` is started with; see the module docstring for the environment variables."""

    db: str
    auth_db: str
    artifacts: str
    admin_user: str = "admin"
    admin_password: str = dataclasses.field(default="", repr=False)
    db_password: str = dataclasses.field(default="", repr=False)
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 4
    auth_cache_seconds: int = 60

    def __post_init__(self) -> None:
        if not self.db.startswith("postgresql"):
            raise ConfigError(f"{DB_ENV}={self.db!r} must be a PostgreSQL URL, e.g. postgresql://mlflow@127.0.0.1:5432/"
                              "mlflow (its password in PGPASSWORD or ~/.pgpass)")
        if not 0 < self.port < 65536:
            raise ConfigError(f"{PORT_ENV}={self.port} must be in [1, 65535]")
        if self.auth_cache_seconds < 0:
            raise ConfigError(f"{AUTH_CACHE_ENV}={self.auth_cache_seconds} must be >= 0 (0: check every request)")
        if self.workers < 1:
            raise ConfigError(f"{WORKERS_ENV}={self.workers} must be at least 1")
        if len(self.admin_password) < MIN_PASSWORD:
            raise ConfigError(f"the admin password ({ADMIN_PASSWORD_ENV} or the file {ADMIN_PASSWORD_FILE_ENV}) has "
                              f"{len(self.admin_password)} characters; give at least {MIN_PASSWORD}")

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


def split_password(url: str) -> tuple[str, str]:
    """``url`` without its password (and with psycopg2 as its driver), and the password ('' when it has none)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):  # SQLAlchemy 2.1's default driver is psycopg 3; ours is psycopg2
        parsed = parsed._replace(drivername="postgresql+psycopg2")
    bare = parsed._replace(password=None).render_as_string(hide_password=False)
    return bare, parsed.password or ""


def read_secret(env: Mapping[str, str], name: str, file_name: str) -> str:
    """The value of the variable ``name``, else the first line of the file the variable ``file_name`` names."""
    if env.get(name):
        return env[name]
    if env.get(file_name):
        path = Path(env[file_name]).expanduser()
        try:
            return (path.read_text().splitlines() or [""])[0].strip()
        except OSError as err:
            raise ConfigError(f"{file_name}={path} cannot be read ({err.strerror}); give a readable file") from None
    raise ConfigError(f"set {name}, or {file_name} to a file that holds it (not a command-line argument)")


def settings_from_env(env: Mapping[str, str]) -> ServerSettings:
    """The server's settings from the environment variables of the module docstring."""
    if not env.get(DB_ENV):
        raise ConfigError(f"set {DB_ENV} to the PostgreSQL database of the tracking store, e.g. "
                          "postgresql://mlflow@127.0.0.1:5432/mlflow (its password in PGPASSWORD or ~/.pgpass)")
    db, db_password = split_password(env[DB_ENV])
    auth_db, auth_password = split_password(env.get(AUTH_DB_ENV) or env[DB_ENV])
    if auth_password and db_password and auth_password != db_password:
        raise ConfigError(f"{DB_ENV} and {AUTH_DB_ENV} carry different passwords; leave them out of the URLs and "
                          "put them in ~/.pgpass")
    artifacts = env.get(ARTIFACTS_ENV) or str(Path(env.get("TRUTHSTEER_OUTPUTS") or "outputs") / "server" / "artifacts")
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).expanduser().resolve())
    try:
        port, workers = int(env.get(PORT_ENV) or 5000), int(env.get(WORKERS_ENV) or 4)
        auth_cache = int(env.get(AUTH_CACHE_ENV) or 60)
    except ValueError:
        raise ConfigError(f"{PORT_ENV}={env.get(PORT_ENV)!r}, {WORKERS_ENV}={env.get(WORKERS_ENV)!r} and "
                          f"{AUTH_CACHE_ENV}={env.get(AUTH_CACHE_ENV)!r} must be integers") from None
    return ServerSettings(db=db, auth_db=auth_db, artifacts=artifacts, admin_user=env.get(ADMIN_USER_ENV) or "admin",
                          admin_password=read_secret(env, ADMIN_PASSWORD_ENV, ADMIN_PASSWORD_FILE_ENV),
                          db_password=db_password or auth_password, host=env.get(HOST_ENV) or "127.0.0.1",
                          port=port, workers=workers, auth_cache_seconds=auth_cache)


def write_auth_ini(folder: Path, settings: ServerSettings, *, with_password: bool = True) -> Path:
    """MLflow's auth settings (``mlflow/server/auth/basic_auth.ini``'s keys) as a 0600 file in ``folder``, replacing
    the one there. The admin password is needed only until ``mlflow server`` has created the admin (or found it):
    ``serve`` rewrites the file without it once the server answers."""
    ini = configparser.ConfigParser(interpolation=None)
    ini["mlflow"] = {"default_permission": DEFAULT_PERMISSION, "database_uri": settings.auth_db,
                     "admin_username": settings.admin_user,
                     **({"admin_password": settings.admin_password} if with_password else {}),
                     "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
                     # a checked password is trusted for this long per worker: PBKDF2 costs ~0.4 s a request
                     "auth_cache_ttl_seconds": str(settings.auth_cache_seconds)}
    path, fresh = folder / "basic_auth.ini", folder / "basic_auth.ini.new"
    with os.fdopen(os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        ini.write(handle)
    os.replace(fresh, path)
    return path


def wait_until_up(settings: ServerSettings, proc: subprocess.Popen[bytes], timeout: float = 600) -> bool:
    """Whether the server answers ``/health`` within ``timeout`` seconds (False when it exits first)."""
    import time
    import urllib.error
    import urllib.request

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a proxy never sees the own server
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with opener.open(f"http://{host}:{settings.port}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    return False


# MLflow's gunicorn server rather than its default, uvicorn: uvicorn's --workers N leaves Nagle's algorithm on the
# connections (uvicorn issue #3149), so each request on a kept-alive connection waited ~44 ms for a delayed ACK,
# ~60 ms a request in all against ~10 ms here (benchmarks.server). Gunicorn's sync workers close each connection
# and set TCP_NODELAY; a request may take 10 minutes (a large artifact on a slow link) before its worker is recycled.
GUNICORN_OPTS = "--timeout 600 --graceful-timeout 30"


def server_command(settings: ServerSettings) -> list[str]:
    """``mlflow server`` with the store, the served artifacts and the auth app: no secret among the arguments."""
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    return [str(mlflow_cli), "server", "--backend-store-uri", settings.db, "--serve-artifacts",
            "--artifacts-destination", settings.artifacts, "--app-name", "basic-auth",
            "--host", settings.host, "--port", str(settings.port), "--workers", str(settings.workers),
            "--gunicorn-opts", GUNICORN_OPTS]


def server_env(settings: ServerSettings, ini: Path, base: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: ``base`` with the auth ini named, and without the admin password (the ini holds it)."""
    dropped = (ADMIN_PASSWORD_ENV, "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_URI",
               "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # the server is no client of a store
    env = {k: v for k, v in base.items() if k not in dropped}
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
    env[SECRET_KEY_ENV] = base.get(SECRET_KEY_ENV) or secrets.token_hex(32)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # GenAI jobs: unused here, and 15 s more to stop
    if settings.db_password:
        env["PGPASSWORD"] = settings.db_password
    return env


def create_stores(settings: ServerSettings) -> None:
    """Create (or migrate) the tracking and auth tables once, before the workers start: when several launchers
    start on a fresh database at once, one creates them and the others wait (``core.stores.first_open``)."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore as AuthStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from core.stores import first_open

    try:
        first_open(settings.db, lambda: SqlAlchemyStore(settings.db, "mlflow-artifacts:/"))
        first_open(settings.auth_db, lambda: AuthStore().init_db(settings.auth_db))
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ConfigError(f"the server's database {settings.db} cannot be opened: {first}; check that PostgreSQL "
                          "runs, the database exists and its password is in PGPASSWORD or ~/.pgpass") from None


def serve(settings: ServerSettings, base_env: Mapping[str, str] | None = None) -> int:
    """Run ``mlflow server`` until it exits or this process is stopped (SIGTERM, Ctrl-C); return its exit code.

    Args:
        settings: the server's settings.
        base_env: the environment the server inherits (``os.environ`` by default).
    """
    if not settings.loopback:
        print(TLS_WARNING.format(host=settings.host), file=sys.stderr, flush=True)
    if "://" not in settings.artifacts:
        Path(settings.artifacts).mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="truthsteer-server-"))  # 0700
    try:
        env = server_env(settings, write_auth_ini(folder, settings), os.environ if base_env is None else base_env)
        if settings.db_password:
            os.environ["PGPASSWORD"] = settings.db_password
        create_stores(settings)
        print(f"tracking server: http://{settings.host}:{settings.port} (store {settings.db}, artifacts "
              f"{settings.artifacts}, admin {settings.admin_user})", file=sys.stderr, flush=True)
        proc = subprocess.Popen(server_command(settings), env=env)
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.terminate())
        try:
            if wait_until_up(settings, proc):  # the admin exists now: the password leaves the disk
                write_auth_ini(folder, settings, with_password=False)
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            return proc.wait(timeout=60)
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- accounts


def auth_client(uri: str) -> Any:
    """MLflow's basic-auth client for the server at ``uri``, as the admin of MLFLOW_TRACKING_USERNAME/PASSWORD."""
    import mlflow.server

    if not uri.startswith(("http://", "https://")):
        raise ConfigError(f"--uri {uri!r} is not a tracking server; give http://HOST:PORT or set MLFLOW_TRACKING_URI")
    return mlflow.server.get_app_client("basic-auth", tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """The id of experiment ``name`` on the server, created (and so MANAGEd by the caller) when missing."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def grant(uri: str, experiment: str, username: str, permission: str) -> None:
    """Give ``username`` ``permission`` on ``experiment`` (created when missing), replacing the one they had.

    Args:
        uri: the tracking server.
        experiment: the experiment's name.
        username: an existing user.
        permission: one of ``PERMISSIONS``.
    """
    if permission not in PERMISSIONS:
        raise ConfigError(f"unknown permission {permission!r}; known: {', '.join(PERMISSIONS)}")
    from mlflow.exceptions import MlflowException

    client, resource = auth_client(uri), experiment_id(uri, experiment)
    try:
        client.grant_user_permission(username, "experiment", resource, permission)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.revoke_user_permission(username, "experiment", resource)  # a change of permission: replace it
        client.grant_user_permission(username, "experiment", resource, permission)


def add_user(uri: str, username: str, password: str, *, experiments: Sequence[str] = (),
             permission: str = "MANAGE") -> None:
    """Create ``username`` (every user reads every experiment: ``default_permission = READ``) and give them
    ``permission`` on each of ``experiments``; a user with none of them writes nowhere but to experiments they
    create themselves.

    Args:
        uri: the tracking server.
        username: the new account.
        password: its password (from the environment or a file, never argv).
        experiments: experiments the user owns or shares.
        permission: their permission on those experiments.
    """
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"the password of {username!r} has {len(password)} characters; give at least {MIN_PASSWORD}")
    auth_client(uri).create_user(username, password)
    for name in experiments:
        grant(uri, name, username, permission)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    sub.add_parser("serve", help="start the server (the default)")
    user = sub.add_parser("add-user", help="create a user (password: $TRUTHSTEER_USER_PASSWORD or --password-file)")
    user.add_argument("username")
    user.add_argument("--password-file", default="", help="a file whose first line is the password")
    user.add_argument("--experiment", action="append", default=[], help="an experiment the user gets --permission on")
    user.add_argument("--permission", default="MANAGE", choices=PERMISSIONS)
    user.add_argument("--read-only", action="store_true", help="no experiment of its own (the lab's screen)")
    user.add_argument("--uri", default="", help="the server; default $MLFLOW_TRACKING_URI")
    share = sub.add_parser("grant", help="give a user a permission on an experiment (created when missing)")
    share.add_argument("experiment")
    share.add_argument("username")
    share.add_argument("permission", choices=PERMISSIONS)
    share.add_argument("--uri", default="", help="the server; default $MLFLOW_TRACKING_URI")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in (None, "serve"):
            return serve(settings_from_env(os.environ))
        uri = args.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if args.command == "grant":
            grant(uri, args.experiment, args.username, args.permission)
            print(f"{args.username}: {args.permission} on experiment {args.experiment!r}")
            return 0
        if args.read_only and args.experiment:
            raise ConfigError("--read-only takes no --experiment")
        source = {USER_PASSWORD_FILE_ENV: args.password_file} if args.password_file else os.environ
        password = read_secret(source, USER_PASSWORD_ENV, USER_PASSWORD_FILE_ENV)
        add_user(uri, args.username, password, experiments=args.experiment, permission=args.permission)
        owned = f"; {args.permission} on {', '.join(args.experiment)}" if args.experiment else ""
        print(f"created user {args.username} (READ on every experiment{owned})")
        return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the server refused (an existing user, not an admin, wrong password): one line
        from mlflow.exceptions import MlflowException

        if not isinstance(err, MlflowException):
            raise
        print(f"error: the server refused: {err.message.splitlines()[0][:300]} (the admin's credentials are "
              "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)", file=sys.stderr)
        return 2


__all__ = ["DEFAULT_PERMISSION", "PERMISSIONS", "ServerSettings", "add_user", "create_stores", "grant", "main",
           "read_secret", "serve", "server_command", "server_env", "settings_from_env", "split_password",
           "wait_until_up", "write_auth_ini"]

if __name__ == "__main__":
    sys.exit(main())
