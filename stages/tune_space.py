"""The tune stage's search space (named axes: CAA's layer and scale, or ITI's k and alpha), its objectives,
samplers and pruners."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import GridSampler, RandomSampler, TPESampler
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.study import Study
from optuna.trial import FrozenTrial, Trial

from core.config import ConfigError, ModelSpec
from evaluation.side_effects import NEUTRAL_COSTS
from steering.methods import tunable

if TYPE_CHECKING:
    from stages.tune_storage import TuneSettings

SAMPLERS = ("tpe", "grid")
PRUNING_CHUNK = 8  # questions scored between two pruning checks
PRUNERS = ("auto", "wilcoxon", "median", "none")
@dataclasses.dataclass(frozen=True)
class Objective:
    """What a study optimises: a judge's metric on the val split, per question.

    Args:
        name: the ``--objective`` name.
        judge: the registered judge that scores the trial.
        metric: the judge metric averaged over the val questions.
        generates: whether the judge scores generated answers (else the teacher-forced model).
    """

    name: str
    judge: str
    metric: str
    generates: bool

    @property
    def higher_is_better(self) -> bool:
        """The metric's ``higher_is_better``, as the judge registry declares it."""
        from evaluation.judges import metric_directions

        directions = metric_directions()
        if self.metric not in directions:
            raise ConfigError(f"objective {self.name!r}: metric {self.metric!r} is not registered by any judge; "
                              f"registered: {', '.join(sorted(directions))}")
        return directions[self.metric]

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        return "maximize" if self.higher_is_better else "minimize"


OBJECTIVES = {
    "mc": Objective("mc", judge="mc", metric="mc2", generates=False),
    "mc2": Objective("mc2", judge="mc", metric="mc2", generates=False),
    "judge": Objective("judge", judge="semantic", metric="semantic_diff", generates=True),
    "truth_info": Objective("truth_info", judge="judge", metric="judge_truthful_informative", generates=True),
}
COSTS = NEUTRAL_COSTS  # what a trial can measure steering to cost, on neutral text (evaluation.side_effects)


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A bound on a cost of steering, e.g. ``kl_neutral<=0.5``: trials above it are infeasible (Optuna's
    ``constraints_func``), and the study reports its best *feasible* trial.

    Args:
        metric: one of ``COSTS``.
        op: ``<=`` or ``>=``.
        bound: the bound.
    """

    metric: str
    op: str
    bound: float

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """``metric<=bound`` or ``metric>=bound``."""
        match = re.fullmatch(r"\s*(\w+)\s*(<=|>=)\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*", text)
        if not match:
            raise ConfigError(f"constraint={text!r} must read metric<=bound or metric>=bound, e.g. kl_neutral<=0.5")
        metric, op, bound = match.group(1), match.group(2), float(match.group(3))
        if metric not in COSTS:
            raise ConfigError(f"constraint={text!r}: {metric} is not a cost a trial measures; use one of "
                              f"{', '.join(COSTS)}, e.g. kl_neutral<=0.5")
        return cls(metric, op, bound)

    def violation(self, value: float) -> float:
        """How far ``value`` is past the bound (<= 0: feasible), as ``constraints_func`` wants it."""
        return value - self.bound if self.op == "<=" else self.bound - value

    def describe(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"


def parse_directions(text: str) -> tuple[Objective, str]:
    """``<objective>:max,<cost>:min`` (e.g. ``truth_info:max,kl_neutral:min``): a two-objective study of
    an objective (its direction must be the metric's) and a cost of steering (minimised); the Pareto front."""
    parts = [p.strip().split(":") for p in text.split(",") if p.strip()]
    if len(parts) != 2 or any(len(p) != 2 or p[1] not in ("max", "min") for p in parts):
        raise ConfigError(f"directions={text!r} must read <objective>:max|min,<cost>:min, e.g. "
                          "truth_info:max,kl_neutral:min")
    (name, way), (cost, cost_way) = parts
    if name not in OBJECTIVES:
        raise ConfigError(f"directions={text!r}: {name} is not an objective; choose from {', '.join(OBJECTIVES)}")
    objective = OBJECTIVES[name]
    if ("max" if objective.higher_is_better else "min") != way:
        raise ConfigError(f"directions={text!r}: {objective.metric} ({name}) is "
                          f"{'maximised' if objective.higher_is_better else 'minimised'}; write {name}:"
                          f"{'max' if objective.higher_is_better else 'min'}")
    if cost not in COSTS or cost_way != "min":
        raise ConfigError(f"directions={text!r}: the second must be a cost to minimise, one of "
                          f"{', '.join(f'{c}:min' for c in COSTS)}")
    return objective, cost


def _number(name: str, text: str, integer: bool, example: str, unit: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} value {text!r} is not a number; write e.g. {example}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} value {text!r} must be finite")
    if integer and not value.is_integer():
        raise ConfigError(f"{name} value {text!r} must be an integer{f' {unit}' if unit else ''}, e.g. {example}")
    return value


@dataclasses.dataclass(frozen=True)
class Axis:
    """One searched parameter: a range (``low:high``, optionally ``:step``) or a list of values.

    Args:
        name: the Optuna param name (``layer``, ``scale``, ``k`` or ``alpha``).
        integer: whether values are ints (layers, heads).
        low: range start (inclusive); None for a list.
        high: range end (inclusive); None for a list.
        step: range step; None for a continuous float range (ints step by 1).
        choices: the values of a list; empty for a range.
    """

    name: str
    integer: bool
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.choices:
            if self.low is not None or self.high is not None or self.step is not None:
                raise ConfigError(f"{self.name}: give a range or a list of values, not both")
            return
        if self.low is None or self.high is None:
            raise ConfigError(f"{self.name}: a range needs low and high, e.g. 8:20")
        if self.low > self.high:
            raise ConfigError(f"{self.name} range {self.low:g}:{self.high:g} is empty; write low:high with low <= high")
        if self.step is not None and self.step <= 0:
            raise ConfigError(f"{self.name} step {self.step:g} must be > 0")

    @classmethod
    def parse(cls, name: str, text: str, *, integer: bool, example: str = "8:20 or 6,9,12",
              unit: str = "layer index") -> Axis:
        """``low:high``, ``low:high:step``, ``a,b,c`` or one value.

        Args:
            name: the param name.
            text: the spec.
            integer: ints only (layers).
            example: specs to show in errors.
            unit: what an integer value is, for errors (``layer index``).
        """
        text = text.strip()
        if not text:
            raise ConfigError(f"{name} spec is empty; write low:high, low:high:step or a,b,c")
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3):
                raise ConfigError(f"{name} spec {text!r} must be low:high or low:high:step")
            low, high = (_number(name, p, integer, example, unit) for p in parts[:2])
            step = _number(name, parts[2], integer, example, unit) if len(parts) == 3 else None
            return cls(name, integer, low, high, step)
        values = tuple(dict.fromkeys(_number(name, p, integer, example, unit) for p in text.split(",") if p.strip()))
        if not values:
            raise ConfigError(f"{name} spec {text!r} holds no value")
        return cls(name, integer, choices=values)

    def _cast(self, value: float) -> float | int:
        return int(value) if self.integer else float(value)

    @property
    def finite(self) -> bool:
        """Whether the axis has finitely many values (a list, a stepped or an int range)."""
        return bool(self.choices) or self.integer or self.step is not None

    def values(self) -> list[float | int]:
        """Every value, for the grid; a continuous float range has none to list.

        Raises:
            ConfigError: the axis is a float range without a step.
        """
        if self.choices:
            return [self._cast(v) for v in self.choices]
        if not self.finite or self.low is None or self.high is None:
            raise ConfigError(f"the grid needs finitely many {self.name} values, but {self.describe()} is continuous; "
                              f"give a step (e.g. {self.low:g}:{self.high:g}:1) or a list (e.g. 0.5,1,2,4)")
        step = self.step or 1.0
        count = math.floor((self.high - self.low) / step + 1e-9) + 1
        return [self._cast(round(self.low + k * step, 10)) for k in range(count)]

    def bounds(self) -> tuple[float, float]:
        """The smallest and largest value."""
        if self.choices:
            return min(self.choices), max(self.choices)
        if self.low is None or self.high is None:
            raise ConfigError(f"{self.name}: a range needs low and high")
        return self.low, self.high

    def suggest(self, trial: Trial) -> float | int:
        """Ask ``trial`` for a value: categorical for a list, int/float (stepped) for a range.

        Args:
            trial: the running trial.
        """
        if self.choices:
            return self._cast(trial.suggest_categorical(self.name, [self._cast(v) for v in self.choices]))
        low, high = self.bounds()
        if self.integer:
            return trial.suggest_int(self.name, int(low), int(high), step=int(self.step or 1))
        return trial.suggest_float(self.name, low, high, step=self.step)

    def describe(self) -> str:
        if self.choices:
            return ",".join(f"{v:g}" for v in self.choices)
        low, high = self.bounds()
        return f"{low:g}:{high:g}" + (f":{self.step:g}" if self.step is not None else "")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The named axes of a study of ``method`` (``caa``: ``layer`` and ``scale``; ``iti``: ``k`` and ``alpha``);
    the axis names are the trials' param names.

    Args:
        axes: param name -> axis, in the order trials suggest them.
        method: the tunable method (``steering.methods.tunable``) whose axes these are.
    """

    axes: dict[str, Axis]
    method: str = "caa"

    def __getitem__(self, name: str) -> Axis:
        return self.axes[name]

    @classmethod
    def of(cls, method: str, specs: Mapping[str, str], spec: ModelSpec, sampler: str) -> SearchSpace:
        """``method``'s axes from ``specs`` (flag -> spec; a missing or empty flag takes the axis default for
        the model and sampler), each checked against the model."""
        tune = tunable(method).tune
        assert tune is not None  # tunable() made sure
        space = cls({a.name: Axis.parse(a.name, specs.get(a.flag) or a.default(spec, sampler), integer=a.integer,
                                        example=a.example, unit=a.unit) for a in tune.axes}, method)
        for a in tune.axes:
            error = a.check(*space[a.name].bounds(), spec)
            if error:
                raise ConfigError(f"{a.flag}={space[a.name].describe()} {error}")
        return space

    def check_source(self, source: Any, where: str) -> None:
        """The method's shared ``source`` (e.g. ITI's ranked heads, from ``where``) must allow every value."""
        tune = tunable(self.method).tune
        assert tune is not None
        errors = tune.check_source(source, {name: axis.bounds() for name, axis in self.axes.items()}, where)
        for a in tune.axes:
            if errors.get(a.name):
                raise ConfigError(f"{a.flag}={self[a.name].describe()} {errors[a.name]}")

    def grid(self) -> dict[str, list[float | int]]:
        """``{name: [...]}`` of every axis, as ``GridSampler`` takes it."""
        return {name: axis.values() for name, axis in self.axes.items()}

    @property
    def n_cells(self) -> int:
        return math.prod(len(values) for values in self.grid().values())

    def describe(self) -> str:
        return " x ".join(f"{name} {axis.describe()}" for name, axis in self.axes.items())


ATTR_CONSTRAINTS = "constraints"  # a trial's user attr: its violations (<= 0: feasible), Optuna's convention


def trial_constraints(trial: FrozenTrial) -> list[float]:
    """A finished trial's constraint violations (``Constraint.violation``), as ``constraints_func`` wants."""
    return [float(v) for v in trial.user_attrs.get(ATTR_CONSTRAINTS, [math.inf])]


class TrialSeededTPESampler(TPESampler):
    """TPE (multivariate, constant liar) whose randomness in trial ``n`` depends only on ``(seed, n)``.

    One worker is reproducible from its seed, and concurrent workers (all with the same seed) do
    not propose the same startup points, as one shared seed per process would make them.

    Args:
        seed: the study's seed.
        constrained: trials carry constraint violations (``trial_constraints``): TPE favours feasible ones.
    """

    def __init__(self, seed: int, constrained: bool = False) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            super().__init__(seed=seed, multivariate=True, constant_liar=True,
                             constraints_func=trial_constraints if constrained else None)
        self._base_seed = seed

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        super().before_trial(study, trial)
        # Hashed: Mersenne Twister streams of consecutive small seeds start with similar draws.
        trial_seed = int.from_bytes(hashlib.sha256(f"{self._base_seed}/{trial.number}".encode()).digest()[:4], "big")
        # What TPESampler.reseed_rng reseeds, with a seed instead of OS entropy.
        self._rng = LazyRandomState(trial_seed)
        self._random_sampler = RandomSampler(seed=trial_seed)


def make_sampler(settings: TuneSettings, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """TPE seeded per trial, or the grid over ``space`` in the order ``seed`` shuffles it.

    Args:
        settings: the sampler name and seed.
        space: the search space.
    """
    if settings.sampler == "grid":
        return GridSampler(space.grid(), seed=settings.seed)
    return TrialSeededTPESampler(settings.seed, constrained=bool(settings.constraint))


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """``wilcoxon`` (per-question values), ``median`` (running means) or none.

    Args:
        name: ``TuneSettings.resolved_pruner()``.
    """
    if name == "wilcoxon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=PRUNING_CHUNK)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=PRUNING_CHUNK)
    return optuna.pruners.NopPruner()


__all__ = ['ATTR_CONSTRAINTS', 'COSTS', 'trial_constraints', 'Axis', 'Constraint', 'OBJECTIVES', 'parse_directions', 'Objective', 'PRUNERS', 'SAMPLERS', 'SearchSpace', 'TrialSeededTPESampler', 'make_pruner', 'make_sampler']
