"""Where a stage's time goes: named steps, timed with ``step`` and logged as metrics by ``log``.

A stage wraps its parts in ``with profile.step("generate.decode"):``; times of the same name add up
(one step per variant, per batch, ...). ``log`` writes each total to the active run as
``profile/<name>_seconds`` (the MLflow UI groups metrics by their ``profile/`` prefix) and starts
over. Steps may nest; a parent's time includes its children's. The timer is process-wide, so a
stage must not run in two threads at once.

``python -m benchmarks.full --profile`` reads these metrics from the smoke run, per stage.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow

PREFIX = "profile/"
_totals: dict[str, float] = {}


@contextmanager
def step(name: str) -> Iterator[None]:
    """Time the body and add it to ``name``'s total (also when the body raises).

    Args:
        name: the step, e.g. ``generate.prefill`` or ``judge.semantic``.
    """
    tick = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - tick)


def add(name: str, seconds: float) -> None:
    """Add ``seconds`` to ``name``'s total (for times measured elsewhere, e.g. inside a generate call)."""
    _totals[name] = _totals.get(name, 0.0) + seconds


def take() -> dict[str, float]:
    """Every step's total so far, and start over."""
    out = dict(_totals)
    _totals.clear()
    return out


def log() -> dict[str, float]:
    """Log every step's total to the active run as ``profile/<name>_seconds``, start over, return the totals."""
    totals = take()
    if totals:
        mlflow.log_metrics({f"{PREFIX}{name}_seconds": seconds for name, seconds in totals.items()})
    return totals


__all__ = ['PREFIX', 'add', 'log', 'step', 'take']
