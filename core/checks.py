"""The checks every config section runs on its values, each failing with a ``ConfigError`` that names the key,
the value and the fix (the nearest valid name for a misspelt choice)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and the fix."""


def _nearest(name: str, valid: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {match[0]}?)" if match else ""


def _positive(section: str, **values: int | float | None) -> None:
    for key, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{key}={value} must be > 0")


def _finite(section: str, **values: float) -> None:
    for key, value in values.items():
        if not math.isfinite(value):
            raise ConfigError(f"{section}.{key}={value} must be a finite number")


def _probability(section: str, **values: float) -> None:
    for key, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{section}.{key}={value} must be a probability in [0, 1]")


def _choice(section: str, key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{section}.{key}={value!r} is not one of {', '.join(allowed)}{_nearest(value, allowed)}"
        )


__all__ = ["ConfigError"]
