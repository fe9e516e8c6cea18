"""What a steering method says about being tuned: its searched axes, where the best values go, and
how one trial's values steer the model from the study's shared source.

A method that ``tune`` can search declares a ``Tunable`` in its ``Method`` (``steering.methods``):
``caa`` searches ``layer`` and ``scale`` on one all-layer extraction, ``iti`` searches ``k`` and ``alpha``
on one ranking of every head. The tune stage asks the registry for these, so it holds no branch per
method; the shared source itself is read by the stage that produces it (``stages.tune_sources``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from core.config import Config, ModelSpec


def per_sampler(tpe: str, grid: str) -> Callable[[ModelSpec, str], str]:
    """A default spec that depends only on the sampler: ``grid`` for the grid (finitely many values), else ``tpe``."""
    return lambda spec, sampler: grid if sampler == "grid" else tpe


def no_check(low: float, high: float, spec: ModelSpec) -> str:
    """Every value is allowed (a scale, an alpha)."""
    return ""


@dataclasses.dataclass(frozen=True)
class TuneAxis:
    """One searched value of a method.

    Args:
        name: the trial's param, and the key it sets in the method's config section (``layer``, ``k``).
        flag: tune's setting (and ``--flag``) that gives its values (``layers``, ``ks``).
        integer: whether its values are ints.
        default: ``(model, sampler) -> spec``: the values searched when the flag is not given.
        example: specs to show in errors, e.g. ``1:48 or 4,8,16,32``.
        check: ``(low, high, model) -> error`` ("" when the bounds are allowed for the model).
        unit: what an integer value is, for errors (``layer index``).
        help: the flag's help text.
        relative_default: the default when ``steering.scale_mode`` is ``relative`` (a scale's range as a fraction
            of the residual norm); None: ``default`` in both modes.
    """

    name: str
    flag: str
    integer: bool
    default: Callable[[ModelSpec, str], str]
    example: str
    help: str
    check: Callable[[float, float, ModelSpec], str] = no_check
    unit: str = ""
    relative_default: Callable[[ModelSpec, str], str] | None = None


@dataclasses.dataclass(frozen=True)
class Tunable:
    """How ``tune`` searches a method.

    Args:
        axes: the searched values, in the order trials suggest them.
        section: the config section the best values set (``{section: {axis: value}}``, ``full --tuned``).
        noun: what the shared source holds, for messages (``vectors``, ``heads``).
        steer: ``(cfg, shared source, source id, params) -> Steering``: one trial's intervention.
        check_source: ``(shared source, {axis: (low, high)}, where) -> {axis: error}`` for the values the
            source does not allow (e.g. more heads than were ranked); empty when it allows them all.
        named: whether study names and setups name the method (caa's studies predate methods and
            keep their names, ``truthsteer-<model>-<objective>``, and their keys).
    """

    axes: tuple[TuneAxis, ...]
    section: str
    noun: str
    steer: Callable[[Config, Any, str, Mapping[str, float]], Any]
    check_source: Callable[[Any, Mapping[str, tuple[float, float]], str], Mapping[str, str]] = (
        lambda source, bounds, where: {})
    named: bool = True

    def fragment(self, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The config fragment of a trial's ``params``: ``{section: {axis: value}}``, ints cast."""
        return {self.section: {a.name: int(params[a.name]) if a.integer else float(params[a.name])
                               for a in self.axes}}


__all__ = ["TuneAxis", "Tunable", "no_check", "per_sampler"]
