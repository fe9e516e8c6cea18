"""The steering methods, one registered module each, like the judges' registry.

A ``Method`` says which stage's run holds its source (the param ``run.<stage>`` of an evaluation),
which config section it reads, how to load its intervention (``steering.methods.intervention``)
from that run, and the fields of its generation cache key without loading anything. The variant
list, the ``full`` pipeline's stages, ``evaluate``'s sources and the analysis orderings all come
from here. A new method is a module in this package whose ``METHOD`` is ``register``'s result, and one
line in ``METHOD_MODULES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

from core.config import Config, ConfigError
from steering.methods.tuning import Tunable

METHOD_MODULES = ("baseline", "caa", "mlp_mc", "mlp_gen", "mlp_joint", "iti")  # registration order: the variants' order everywhere
_REGISTRY: dict[str, Method] = {}


@dataclasses.dataclass(frozen=True)
class Method:
    """One steering method.

    Args:
        name: the variant name (``eval.variants``).
        stage: the stage whose run holds the method's source ("" for none); an evaluation's param
            ``run.<stage>`` names that run.
        section: the config section its intervention reads at evaluation besides ``steering`` ("" for none;
            what its source stage reads is that stage's own).
        needs: what the source run must be, for error messages.
        load: ``(cfg, source run, model or None) -> Steering``; the model places a module on its layer's device.
        key_fields: ``(cfg, source run) -> dict``: the intervention's ``key_fields()`` without loading it.
        tune: how ``tune`` searches it (``steering.methods.tuning``); None when it is not tuned.
    """

    name: str
    stage: str
    section: str
    needs: str
    load: Callable[[Config, str, Any], Any]
    key_fields: Callable[[Config, str], dict[str, Any]]
    tune: Tunable | None = None


def register(method: Method) -> Method:
    """Add ``method`` to the registry (once per name)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"steering method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def methods() -> dict[str, Method]:
    """Every registered method by name, in ``METHOD_MODULES`` order (whatever order they were imported in);
    each module's ``METHOD``."""
    ordered = [import_module(f"{__name__}.{module}").METHOD for module in METHOD_MODULES]
    return {m.name: m for m in ordered}


def method(name: str) -> Method:
    """The method called ``name``; a ConfigError lists the others."""
    known = methods()
    if name not in known:
        raise ConfigError(f"variant {name!r} is not a steering method; choose from {', '.join(known)}")
    return known[name]


def check_variants(variants: tuple[str, ...] | list[str]) -> None:
    """Fail, naming the value and the choices, when a variant is not a registered method."""
    known = methods()
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise ConfigError(f"eval.variants={list(variants)} has {', '.join(map(repr, unknown))}, which is not a "
                          f"steering method; choose from {', '.join(known)}")


def variant_order(variants: list[str] | set[str] | tuple[str, ...]) -> list[str]:
    """``variants`` in registration order, unknown names after them, sorted."""
    known = list(methods())
    return [v for v in known if v in variants] + sorted(set(variants) - set(known))


def tunable(name: str) -> Method:
    """The method called ``name``, which ``tune`` can search; a ConfigError lists those it can."""
    known = {n: m for n, m in methods().items() if m.tune is not None}
    if name not in known:
        raise ConfigError(f"method={name!r} cannot be tuned; choose from {', '.join(known)}")
    return known[name]


def tunable_methods() -> dict[str, Method]:
    """Every method ``tune`` can search, in registration order."""
    return {n: m for n, m in methods().items() if m.tune is not None}


def tuned_params() -> list[str]:
    """Every searched param name of every tunable method, in registration order (the trials tables' columns)."""
    return list(dict.fromkeys(a.name for m in tunable_methods().values() for a in m.tune.axes))  # type: ignore[union-attr]


def method_of_params(params: Mapping[str, Any] | set[str]) -> Method | None:
    """The tunable method whose axes are exactly ``params``' names (a trial's params, a best config); None if none."""
    names = set(params)
    return next((m for m in tunable_methods().values() if {a.name for a in m.tune.axes} == names), None)  # type: ignore[union-attr]


__all__ = ["METHOD_MODULES", "Method", "check_variants", "method", "methods", "method_of_params", "register", "tunable", "tunable_methods", "tuned_params",
           "variant_order"]
