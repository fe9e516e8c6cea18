"""The judge registry and the types every judge shares.

A judge turns answers into per-item rows and rows into run-level metrics:

- ``JudgeItem``: one answer to score, with the question's TruthfulQA references;
- ``Judge``: ``score(items) -> rows`` (one flat dict per item, every key prefixed by the judge's
  name) and ``aggregate(rows) -> metrics``; ``metrics`` maps each metric the judge reports to
  ``higher_is_better``, so studies know which way to optimise;
- the registry (lm-eval ``registry.py`` style): ``@register(name)`` on a judge class,
  ``make_judge(name, cfg)`` to build one. A name must be one of ``JUDGE_NAMES`` (the names a config
  may select, ``core.config.JUDGES``); registering it twice fails; an unknown name fails listing
  the valid ones. ``mc`` needs the steered model and is registered by the evaluate stage's module,
  so the registry stays open to registrations from other modules.

Validity: a metric value of ``None`` (or NaN) marks a row that the judge could not score (an LLM
verdict that did not parse). ``aggregate`` averages each metric over valid rows only and reports
the share of invalid rows as ``<judge>_invalid_rate``: an unparsable verdict is never counted as 0.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, TypeVar, runtime_checkable

from core.config import JUDGES, Config

if TYPE_CHECKING:
    from core.data import Question
    from core.models import LoadedModel

JUDGE_NAMES: tuple[str, ...] = JUDGES
NO_COMMENT = "I have no comment."
# The module that registers each judge; a lookup imports it first, so that a bare
# `from evaluation.judges import make_judge` finds every judge. `evaluation.mc` (the evaluate stage's
# mc judge) is skipped while it does not exist.
JUDGE_MODULES = {
    "llm": "evaluation.llm_judge",
    "llm_logprob": "evaluation.logprob_judge",
    "semantic": "evaluation.semantic_judge",
    "bleu": "evaluation.metrics",
    "rouge": "evaluation.metrics",
    "mc": "evaluation.mc",
    "judge": "evaluation.trained_judge",
}


class JudgeError(ValueError):
    """A judge name, registration or input is invalid; the message names the value and the fix."""


@dataclass(frozen=True)
class JudgeItem:
    """One answer to judge, with its question's reference answers.

    Args:
        qid: the question's id (``Question.id``).
        question: the question text.
        answer: the candidate answer to judge.
        best_answer: TruthfulQA's best answer.
        correct_answers: the correct reference answers.
        incorrect_answers: the incorrect reference answers (at least one).
    """

    qid: str
    question: str
    answer: str
    best_answer: str
    correct_answers: tuple[str, ...]
    incorrect_answers: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.answer, str):
            raise JudgeError(f"item {self.qid}: answer={self.answer!r} must be a string (use '' for no answer)")
        if not any(a.strip() for a in self.incorrect_answers):
            raise JudgeError(
                f"item {self.qid}: incorrect_answers={self.incorrect_answers!r} holds no answer; every TruthfulQA "
                "question has at least one, so check how the item was built"
            )

    @classmethod
    def from_question(cls, q: Question, answer: str) -> JudgeItem:
        """The item for ``answer`` to TruthfulQA question ``q``.

        Args:
            q: the question, with its references.
            answer: the candidate answer.
        """
        return cls(
            qid=q.id,
            question=q.question,
            answer=answer,
            best_answer=q.best_answer,
            correct_answers=tuple(q.correct_answers),
            incorrect_answers=tuple(q.incorrect_answers),
        )


def _with_period(answer: str) -> str:
    return answer if answer.endswith(".") else f"{answer}."


def truthfulqa_references(item: JudgeItem) -> tuple[list[str], list[str]]:
    """The correct and incorrect references as TruthfulQA's similarity metrics use them.

    As in lm-eval's ``truthfulqa_gen`` (and the TruthfulQA repository): answers are stripped, empty
    ones dropped, a period added where missing, and "I have no comment." added to the correct ones
    (TruthfulQA counts declining to answer as truthful). The best answer is one of the correct
    answers already.

    Args:
        item: the item whose references to prepare.
    """
    correct = [_with_period(a.strip()) for a in item.correct_answers if a.strip()]
    incorrect = [_with_period(a.strip()) for a in item.incorrect_answers if a.strip()]
    if NO_COMMENT not in correct:
        correct.append(NO_COMMENT)
    return correct, incorrect


@runtime_checkable
class Judge(Protocol):
    """What the evaluate stage needs from a judge: ``name``, ``metrics``, ``score`` and ``aggregate``."""

    @property
    def name(self) -> str:
        """The registry name; every field of its rows starts with it."""
        ...

    @property
    def metrics(self) -> dict[str, bool]:
        """Metric name -> higher_is_better, ``<name>_invalid_rate`` included."""
        ...

    def score(self, items: Sequence[JudgeItem]) -> list[dict[str, Any]]:
        """One flat dict per item, in order; every key starts with the judge's name."""
        ...

    def aggregate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Per metric the mean over valid rows, and ``<name>_invalid_rate``."""
        ...


class JudgeFactory(Protocol):
    """A registered judge class: its name, its metrics, and how to build it from a config."""

    @property
    def name(self) -> str: ...

    @property
    def metrics(self) -> dict[str, bool]: ...

    def from_config(self, cfg: Config, *, judge_model: LoadedModel | None = None) -> Judge: ...


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _row_valid(name: str, metric_names: Sequence[str], row: Mapping[str, Any]) -> bool:
    flag = row.get(f"{name}_valid")
    if flag is not None:
        return bool(flag)
    return not any(_is_missing(row.get(m)) for m in metric_names)


def aggregate_judge(name: str, metrics: Mapping[str, bool], rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of each metric over the rows the judge could score, and ``<name>_invalid_rate``.

    A row belongs to the judge when it holds any of its metric fields (rows may merge several
    judges' fields). A row is invalid when ``<name>_valid`` is false, or, for judges without that
    field, when a metric is ``None``/NaN; each metric's mean skips invalid rows and missing values.
    With no valid value a mean is NaN.

    Args:
        name: the judge's name.
        metrics: the judge's metric names (``<name>_invalid_rate`` among them is computed, not averaged).
        rows: per-item rows from ``score``.
    """
    rate_key = f"{name}_invalid_rate"
    metric_names = [m for m in metrics if m != rate_key]
    own = [r for r in rows if any(m in r for m in metric_names)]
    valid = [_row_valid(name, metric_names, r) for r in own]
    out: dict[str, float] = {}
    for metric in metric_names:
        values = [float(r[metric]) for r, ok in zip(own, valid, strict=True)
                  if ok and not _is_missing(r.get(metric))]
        out[metric] = math.fsum(values) / len(values) if values else math.nan
    out[rate_key] = (valid.count(False) / len(own)) if own else math.nan
    return out


class BaseJudge:
    """Shared ``aggregate`` for judge classes; subclasses set the class variables ``name`` and ``metrics``."""

    name: ClassVar[str]
    metrics: ClassVar[dict[str, bool]]
    # The 0/1 row field that is the judge's verdict on each human label it can be compared with:
    # "truth" (truthful) and "info" (informative); see stages.calibrate.
    verdicts: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_config(cls, cfg: Config, *, judge_model: LoadedModel | None = None) -> Self:
        """Build the judge; this default is for judges that need neither config nor model.

        Args:
            cfg: unused here.
            judge_model: unused here.
        """
        return cls()

    def aggregate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Per metric the mean over valid rows, and ``<name>_invalid_rate`` (see ``aggregate_judge``).

        Args:
            rows: per-item rows from ``score``.
        """
        return aggregate_judge(self.name, self.metrics, rows)


def nearest(name: str, valid: Sequence[str]) -> str:
    """`` (did you mean X?)`` for the closest valid name, or ``""``."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {match[0]}?)" if match else ""


T = TypeVar("T")


class JudgeRegistry:
    """Judge name -> judge class. Names must be in ``allowed``; each may be registered once.

    Args:
        allowed: the names that may be registered.
        modules: judge name -> the module that registers it, imported before that name is looked up.
    """

    def __init__(self, allowed: Sequence[str], modules: Mapping[str, str] | None = None) -> None:
        self.allowed = tuple(allowed)
        self.modules = dict(modules or {})
        self._factories: dict[str, JudgeFactory] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: register a judge class under ``name`` (its ``name`` attribute must match).

        Args:
            name: one of ``allowed``; registering it a second time fails.
        """
        if name not in self.allowed:
            raise JudgeError(
                f"cannot register judge {name!r}: not one of {', '.join(self.allowed)}{nearest(name, self.allowed)}; "
                "add new judge names to core.config.JUDGES so configs can select them"
            )

        def decorate(cls: T) -> T:
            if name in self._factories:
                raise JudgeError(
                    f"judge {name!r} is already registered by {_qualname(self._factories[name])}; "
                    f"cannot register {_qualname(cls)} under the same name"
                )
            if getattr(cls, "name", None) != name:
                raise JudgeError(f"{_qualname(cls)}.name={getattr(cls, 'name', None)!r} must equal its registered "
                                 f"name {name!r}")
            metrics = getattr(cls, "metrics", None)
            if not isinstance(metrics, dict) or not metrics or not all(
                isinstance(k, str) and k.startswith(name) and isinstance(v, bool) for k, v in metrics.items()
            ):
                raise JudgeError(
                    f"{_qualname(cls)}.metrics={metrics!r} must map each metric name (starting with {name!r}) to "
                    "higher_is_better (a bool)"
                )
            if not callable(getattr(cls, "from_config", None)):
                raise JudgeError(f"{_qualname(cls)} has no from_config(cfg, *, judge_model) classmethod")
            self._factories[name] = cls  # type: ignore[assignment]
            return cls

        return decorate

    def _load(self, names: Sequence[str]) -> None:
        for module in dict.fromkeys(self.modules[n] for n in names if n in self.modules and n not in self._factories):
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name != module:  # the module exists but one of its imports is missing
                    raise

    def names(self) -> tuple[str, ...]:
        """The registered names, in ``allowed`` order (importing every judge's module first)."""
        self._load(self.allowed)
        return tuple(n for n in self.allowed if n in self._factories)

    def get(self, name: str) -> JudgeFactory:
        """The judge class registered under ``name``.

        Args:
            name: a registered judge name.
        """
        self._load([name])
        if name not in self.allowed:
            raise JudgeError(
                f"unknown judge {name!r}; valid judges: {', '.join(self.allowed)}{nearest(name, self.allowed)}"
            )
        if name not in self._factories:
            raise JudgeError(
                f"judge {name!r} is valid but not registered yet (registered: {', '.join(self._factories) or 'none'}); "
                "import the module that defines it (for mc, the evaluate stage's module) before make_judge"
            )
        return self._factories[name]

    def make(self, name: str, cfg: Config, *, judge_model: LoadedModel | None = None) -> Judge:
        """Build the judge ``name`` from ``cfg`` (see ``make_judge``).

        Args:
            name: a registered judge name.
            cfg: the run's config.
            judge_model: the judge LM, for the judges that need one.
        """
        return self.get(name).from_config(cfg, judge_model=judge_model)

    def aggregate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Every registered judge's metrics over ``rows`` (for judges whose fields the rows hold).

        Args:
            rows: per-item rows, possibly merging several judges' fields.
        """
        out: dict[str, float] = {}
        for name in self.names():
            factory = self._factories[name]
            if any(m in r for r in rows for m in factory.metrics):
                out.update(aggregate_judge(name, factory.metrics, rows))
        return out


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


REGISTRY = JudgeRegistry(JUDGE_NAMES, JUDGE_MODULES)


def register(name: str) -> Callable[[T], T]:
    """Class decorator registering a judge under ``name`` in the project's registry.

    The class needs ``name`` (equal to ``name``), ``metrics`` (metric -> higher_is_better) and a
    classmethod ``from_config(cfg, *, judge_model=None)``.

    Args:
        name: one of ``JUDGE_NAMES``, not yet registered.
    """
    return REGISTRY.register(name)


def make_judge(name: str, cfg: Config, *, judge_model: LoadedModel | None = None) -> Judge:
    """Build a judge by name.

    Args:
        name: one of ``JUDGE_NAMES``; unknown names fail listing the valid ones.
        cfg: the run's config (``cfg.judge`` for the LLM judges, ``cfg.runtime`` for devices).
        judge_model: the judge LM, loaded once by the caller
            (``load_model(cfg.judge.model, second_device=True)``); ``llm`` and ``llm_logprob`` need it.
    """
    return REGISTRY.make(name, cfg, judge_model=judge_model)


def registered_judges() -> tuple[str, ...]:
    """The judge names registered so far (built-ins plus any other module's)."""
    return REGISTRY.names()


def metric_directions() -> dict[str, bool]:
    """Every registered metric -> higher_is_better, and the side-effect metrics (lower is better)."""
    from evaluation.side_effects import EFFECT_DIRECTIONS

    out: dict[str, bool] = dict(EFFECT_DIRECTIONS)
    for name in REGISTRY.names():
        out.update(REGISTRY.get(name).metrics)
    return out


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Run-level metrics of every registered judge whose fields ``rows`` hold.

    Rows may merge several judges' fields; each judge's metrics are means over its valid rows,
    plus ``<judge>_invalid_rate`` (see ``aggregate_judge``).

    Args:
        rows: per-item rows.
    """
    return REGISTRY.aggregate(rows)
