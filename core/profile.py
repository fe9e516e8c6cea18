"""Where a stage's time and memory go: named steps, timed with ``step`` and logged as metrics by ``log``.

A stage wraps its parts in ``with profile.step("generate.decode"):``; times of the same name add up
(one step per variant, per batch, ...). ``log`` writes each total to the active run as
``profile/<name>_seconds`` (the MLflow UI groups metrics by their ``profile/`` prefix) and starts
over. Steps may nest; a parent's time includes its children's. The timer is process-wide, so a
stage must not run in two threads at once.

On Linux each ``step`` also notes the resident memory it peaked at, logged as ``profile/<name>_peak_rss_gib``
(the highest over the step's runs; a parent's includes its children's), so that a run's peak memory is placed
in the step that held it. A thread reads the resident memory every ``SAMPLE_SECONDS`` while a step runs; a step
in which the process's own high-water mark (``VmHWM``, what ``getrusage`` reports) rose peaked at that mark
exactly, so the step that set the process's peak is never under-read. The mark itself is never reset. Where
``/proc`` cannot be read (not Linux), no peak is logged.

``python -m benchmarks.full --profile`` reads these metrics from the smoke run, per stage.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow

PREFIX = "profile/"
SAMPLE_SECONDS = 0.02  # how often a running step's resident memory is read
_totals: dict[str, float] = {}
_peaks: dict[str, float] = {}  # GiB, the highest resident memory while a step of that name ran
_open: list[list[float]] = []  # each running step's peak so far (GiB), outermost first
_lock = threading.Lock()
_sampler: list[threading.Thread] = []
_HWM = re.compile(r"^VmHWM:\s+(\d+) kB", re.MULTILINE)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _high_water() -> float | None:
    """The process's peak resident memory so far (``VmHWM``), in GiB; None where it cannot be read."""
    try:
        with open("/proc/self/status") as status:
            found = _HWM.search(status.read())
    except OSError:
        return None
    return None if found is None else int(found.group(1)) / 2**20


def _resident() -> float:
    """The process's resident memory now, in GiB (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE / 2**30
    except (OSError, IndexError, ValueError):
        return 0.0


def _fold(gib: float) -> None:
    """Raise every running step's peak to ``gib``."""
    with _lock:
        for running in _open:
            running[0] = max(running[0], gib)


def _sample() -> None:
    while True:
        time.sleep(SAMPLE_SECONDS)
        if _open:
            _fold(_resident())


def _reset_after_fork() -> None:  # a forked child has no sampler thread and must not inherit a held lock
    global _lock
    _lock = threading.Lock()
    _sampler.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


@contextmanager
def step(name: str) -> Iterator[None]:
    """Time the body and add it to ``name``'s total (also when the body raises); note its peak memory.

    Args:
        name: the step, e.g. ``generate.prefill`` or ``judge.semantic``.
    """
    mark = _high_water()
    if mark is not None and not _sampler:
        _sampler.append(threading.Thread(target=_sample, name="truthsteer-profile-rss", daemon=True))
        _sampler[0].start()
    with _lock:
        _open.append([_resident()])
    tick = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - tick)
        _fold(_resident())
        end = _high_water()
        if mark is not None and end is not None and end > mark:
            _fold(end)  # this step raised the process's high-water mark: it (and its parents) peaked there
        with _lock:
            peak = _open.pop()[0]
        if mark is not None:
            _peaks[name] = max(_peaks.get(name, 0.0), peak)


def add(name: str, seconds: float) -> None:
    """Add ``seconds`` to ``name``'s total (for times measured elsewhere, e.g. inside a generate call)."""
    _totals[name] = _totals.get(name, 0.0) + seconds


def peaks() -> dict[str, float]:
    """Each step's peak resident memory so far, in GiB (empty where it cannot be read)."""
    return dict(_peaks)


def take() -> dict[str, float]:
    """Every step's total seconds so far, and start over (the peaks too)."""
    out = dict(_totals)
    _totals.clear()
    _peaks.clear()
    return out


def log() -> dict[str, float]:
    """Log every step's total to the active run as ``profile/<name>_seconds`` and its peak memory as
    ``profile/<name>_peak_rss_gib``, start over, and return the totals (seconds)."""
    highest = peaks()
    totals = take()
    metrics = {f"{PREFIX}{name}_seconds": seconds for name, seconds in totals.items()}
    metrics.update({f"{PREFIX}{name}_peak_rss_gib": round(gib, 4) for name, gib in highest.items()})
    if metrics:
        mlflow.log_metrics(metrics)
    return totals


__all__ = ['PREFIX', 'SAMPLE_SECONDS', 'add', 'log', 'peaks', 'step', 'take']
