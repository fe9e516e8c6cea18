"""Opening a store that many processes may open first at the same moment, or that may not be there.

A brand-new sqlite file or PostgreSQL schema is created by whoever opens it first: MLflow runs its
alembic migrations, Optuna creates its tables and enum types. Processes that start together race on
that (``UniqueViolation ... CREATE TYPE studydirection``, half-migrated sqlite files). ``first_open``
serialises the processes of one machine on a lock file beside a sqlite file and, for a server
database (where other machines race too), retries while the schema is being created by another. A
tracking server is probed with a short timeout first, so an unreachable one fails in seconds with
one line instead of after minutes of retries.
"""

from __future__ import annotations

import errno
import fcntl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from core.config import ConfigError

T = TypeVar("T")
RACE_MARKERS = ("already exists", "duplicate key", "uniqueviolation", "database is locked", "deadlock detected")
PROBE_TIMEOUT = 5.0  # seconds for a tracking server to answer /health


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created, with its folder) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (None for any other store)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def first_open(uri: str, opener: Callable[[], T], attempts: int = 8) -> T:
    """``opener()``, serialised on this machine for a sqlite file and retried while another process creates a
    server database's schema.

    Args:
        uri: the store's URI (``sqlite:///path``, ``postgresql://...``).
        opener: opens (and so creates or migrates) the store.
        attempts: tries for a server database.
    """
    path = sqlite_path(uri)
    if path is not None and str(path) != ":memory:":
        with file_lock(path.with_name(f"{path.name}.lock")):
            return opener()
    for attempt in range(attempts):
        try:
            return opener()
        except Exception as err:  # the schema is being created by another process: wait for it
            if attempt == attempts - 1 or not any(m in str(err).lower() for m in RACE_MARKERS):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Fail in one line when the tracking server at ``uri`` does not answer ``/health`` within ``timeout``."""
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as err:
        reason = type(err).__name__
        raise ConfigError(f"tracking server {uri} is unreachable ({reason} within {timeout:g} s); start it "
                          "(`make server`, or `mlflow server` on that host) or set MLFLOW_TRACKING_URI to a reachable "
                          "server or a local file, e.g. sqlite:///mlflow.db") from None


__all__ = ["PROBE_TIMEOUT", "RACE_MARKERS", "file_lock", "first_open", "probe_server", "sqlite_path"]


# What a refused write looks like: the OSError numbers, and SQLite's words for the same (it reports its own).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)
SQLITE_WRITE_ERRORS = ("disk I/O error", "database or disk is full", "readonly database", "unable to open database")


def write_refused(err: BaseException) -> str | None:
    """The first line of the refused write (full disk, read-only or unwritable folder) behind `err`, following
    its causes; None when `err` is something else."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = (str(current).strip().splitlines() or [type(current).__name__])[0][:300]
        if isinstance(current, OSError) and current.errno in WRITE_ERRNOS:
            return text
        if any(words in text for words in SQLITE_WRITE_ERRORS):
            return text
        current = current.__cause__ or current.__context__
    return None
