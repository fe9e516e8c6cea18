"""Which runs an analysis reads: selection by filter strings, the run frame, and what was missing.

A selection is an experiment, optionally narrowed to model aliases (tag ``truthsteer.model``), to
``key=value`` tag (or ``params.key=value`` param) filters, or to one run and all its descendants
(``tags.mlflow.parentRunId``, followed recursively). Only FINISHED runs are read, and never an
``analyze`` run. The result is the frame ``mlflow.search_runs`` returns (``run_id``,
``start_time``, ``tags.*``, ``params.*``, ``metrics.*``): every table of the analysis is computed
from such a frame, so tests can hand one in directly.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import mlflow
import pandas as pd

from core.artifacts import ANALYZE_STAGE, TAG_MODEL, TAG_PARENT, TAG_STAGE, TAG_VARIANT
from core.config import ConfigError
from core.config_io import load_config, model_spec
from core.tracking import ensure_store, tracking_uri

FINISHED = "FINISHED"
# Where a model's size comes from when the registry has no file for it: the resolved config's param.
PARAM_N_PARAMS = "model.n_params_b"


class SelectionError(ConfigError):
    """No run matches a selection, or the selection names something the store does not have."""


def _quote(value: str, what: str) -> str:
    if "'" in value:
        raise SelectionError(f"{what}={value!r} contains a single quote, which MLflow filter strings cannot "
                             f"hold; drop it or match with LIKE on the rest")
    return f"'{value}'"


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which runs to analyze.

    Args:
        experiment: the experiment name; "" for every experiment that holds truthsteer runs (runs started by
            ``mlflow run`` without ``--experiment-name`` land in ``Default``); with ``parent_run``, the
            parent's experiment is used.
        models: model aliases (tag ``truthsteer.model``); empty means every model.
        tags: ``(key, value)`` filters, all of which must hold; a key ``params.x`` filters param ``x``.
        parent_run: a run id: only this run and its descendants.
    """

    experiment: str = ""
    models: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    parent_run: str = ""

    def __post_init__(self) -> None:
        for key, value in self.tags:
            if not key or key == "params.":
                raise SelectionError(f"tag filter {key}={value!r} has no key; write key=value, e.g. truthsteer.variant=caa")
            _quote(value, key)
        for model in self.models:
            _quote(model, "model")

    @classmethod
    def parse(cls, experiment: str, models: str = "", tags: str = "", parent_run: str = "") -> Selection:
        """A selection from command-line text.

        Args:
            experiment: the experiment name.
            models: aliases separated by ``|`` (or ``,``), e.g. ``gemma-2-2b|gemma-2-9b``.
            tags: ``key=value`` pairs separated by ``,``, e.g. ``truthsteer.variant=caa,truthsteer.stage=evaluate.variant``.
            parent_run: a run id, or "".
        """
        aliases = tuple(m.strip() for m in models.replace(",", "|").split("|") if m.strip())
        pairs = []
        for item in (t.strip() for t in tags.split(",") if t.strip()):
            key, sep, value = item.partition("=")
            if not sep:
                raise SelectionError(f"tag filter {item!r} has no '='; write key=value[,key=value...], "
                                     f"e.g. truthsteer.variant=caa")
            pairs.append((key.strip(), value.strip()))
        return cls(experiment=experiment.strip(), models=aliases, tags=tuple(pairs), parent_run=parent_run.strip())

    def clauses(self) -> list[str]:
        """The filter clauses every selected run meets (the model clause comes from ``filter_strings``)."""
        out = [f"attributes.status = '{FINISHED}'", f"tags.`{TAG_STAGE}` IS NOT NULL"]  # the project's runs
        for key, value in self.tags:
            if key.startswith("params."):
                out.append(f"params.`{key.removeprefix('params.')}` = {_quote(value, key)}")
            else:
                out.append(f"tags.`{key.removeprefix('tags.')}` = {_quote(value, key)}")
        return out

    def filter_strings(self) -> list[str]:
        """One MLflow filter string per model (MLflow filters have no OR), or one for every model."""
        base = self.clauses()
        if not self.models:
            return [" and ".join(base)]
        return [" and ".join([*base, f"tags.`{TAG_MODEL}` = {_quote(m, 'model')}"]) for m in self.models]

    def describe(self) -> str:
        """The selection in words, naming every filter."""
        where = (f"run {self.parent_run} and its descendants" if self.parent_run else
                 f"experiment {self.experiment!r}" if self.experiment else "every experiment")
        parts = [where, "status FINISHED"]
        if self.models:
            parts.append(f"{TAG_MODEL} in ({', '.join(self.models)})")
        parts += [f"{k} = {v!r}" for k, v in self.tags]
        return "; ".join(parts)


def connect(uri: str | None = None) -> str:
    """Point MLflow at the store (created if new): ``uri``, else ``MLFLOW_TRACKING_URI``, else
    ``tracking.uri`` of base.yaml.

    Args:
        uri: a tracking URI, or None.
    """
    return ensure_store(uri or tracking_uri(load_config()))


def _search(experiment_ids: list[str], filter_string: str) -> pd.DataFrame:
    found = mlflow.search_runs(experiment_ids=experiment_ids, filter_string=filter_string, output_format="pandas")
    if not isinstance(found, pd.DataFrame):  # the list form, which output_format="pandas" never returns
        raise TypeError(f"mlflow.search_runs returned {type(found).__name__}, not a DataFrame")
    return found


def descendants(run_id: str, experiment_ids: list[str]) -> set[str]:
    """Every run below ``run_id`` (children, their children, ...), from one search of the child runs.

    Args:
        run_id: the ancestor.
        experiment_ids: where to look.
    """
    children = _search(experiment_ids, f"tags.`{TAG_PARENT}` IS NOT NULL")
    if children.empty:
        return set()
    by_parent: dict[str, list[str]] = {}
    for child, parent in zip(children["run_id"], children[f"tags.{TAG_PARENT}"], strict=True):
        by_parent.setdefault(str(parent), []).append(str(child))
    found: set[str] = set()
    frontier = [run_id]
    while frontier:
        nxt = [c for p in frontier for c in by_parent.get(p, []) if c not in found]
        found.update(nxt)
        frontier = nxt
    return found


def _experiment_ids(selection: Selection) -> list[str]:
    client = mlflow.MlflowClient()
    if selection.parent_run:
        try:
            return [client.get_run(selection.parent_run).info.experiment_id]
        except mlflow.exceptions.MlflowException:
            raise SelectionError(f"parent run {selection.parent_run!r} is not in the store {mlflow.get_tracking_uri()}; "
                                 f"pass a run id from `mlflow runs list` or the UI") from None
    if not selection.experiment:  # wherever the project's runs were logged
        return [e.experiment_id for e in client.search_experiments()]
    experiment = mlflow.get_experiment_by_name(selection.experiment)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise SelectionError(f"experiment {selection.experiment!r} is not in the store {mlflow.get_tracking_uri()}; "
                             f"experiments there: {', '.join(names) or 'none'}")
    return [experiment.experiment_id]


def select_runs(selection: Selection) -> pd.DataFrame:
    """The FINISHED runs of a selection, as ``mlflow.search_runs`` frames them, newest first.

    ``analyze`` runs and the active run (or ``MLFLOW_RUN_ID``'s, under ``mlflow run``) are left out.

    Args:
        selection: the experiment, models, tag filters or parent run.

    Raises:
        SelectionError: the experiment or parent run does not exist, or no run matches; the
            message names the filter and the models that do have runs.
    """
    experiment_ids = _experiment_ids(selection)
    frames = [_search(experiment_ids, f) for f in selection.filter_strings()]
    runs = pd.concat([f for f in frames if not f.empty], ignore_index=True) if any(not f.empty for f in frames) \
        else pd.DataFrame(columns=["run_id"])
    runs = runs.drop_duplicates("run_id")
    if selection.parent_run:
        keep = descendants(selection.parent_run, experiment_ids) | {selection.parent_run}
        runs = runs[runs["run_id"].isin(keep)]
    active = mlflow.active_run()
    own = {active.info.run_id if active else "", os.environ.get("MLFLOW_RUN_ID", "")}  # the analysis run itself
    runs = runs[(tag(runs, TAG_STAGE) != ANALYZE_STAGE) & ~runs["run_id"].isin(own)]
    if runs.empty:
        raise SelectionError(_no_match(selection, experiment_ids))
    if "start_time" in runs:
        runs = runs.sort_values("start_time", ascending=False, kind="stable")
    return runs.reset_index(drop=True)


def _no_match(selection: Selection, experiment_ids: list[str]) -> str:
    every = _search(experiment_ids, "")
    finished = every[every["status"] == FINISHED] if not every.empty else every
    models = sorted(set(tag(finished, TAG_MODEL).dropna()))
    filters = " | ".join(selection.filter_strings())
    return (f"no runs match {selection.describe()} (filter: {filters}); {'the experiment holds' if selection.experiment else 'the store holds'} {len(every)} runs, "
            f"{len(finished)} FINISHED, of models: {', '.join(models) or 'none'}; widen --models/--tags, or run the "
            f"pipeline first")


# ---------------------------------------------------------------- reading the frame


def column(runs: pd.DataFrame, name: str) -> pd.Series:
    """``runs[name]``, or a column of None when no run has it."""
    if name in runs:
        return runs[name].astype(object).where(runs[name].notna(), None)
    return pd.Series([None] * len(runs), index=runs.index, dtype=object)


def tag(runs: pd.DataFrame, key: str) -> pd.Series:
    """The tag ``key`` of every run (None where unset)."""
    return column(runs, f"tags.{key}")


def variant_tag(runs: pd.DataFrame, key: str = TAG_VARIANT) -> pd.Series:
    """A variant run's namespaced tag (``truthsteer.variant``, ``truthsteer.layer``, ``truthsteer.scale``), or
    for runs logged before the namespace, the bare one (``variant``, ...)."""
    namespaced, bare = tag(runs, key), tag(runs, key.removeprefix("truthsteer."))
    return namespaced.where(namespaced.notna(), bare)


def param(runs: pd.DataFrame, key: str) -> pd.Series:
    """The param ``key`` of every run, as logged (a string; None where unset)."""
    return column(runs, f"params.{key}")


def metric(runs: pd.DataFrame, key: str) -> pd.Series:
    """The last value of metric ``key`` of every run (NaN where unlogged)."""
    name = f"metrics.{key}"
    if name in runs:
        return pd.to_numeric(runs[name], errors="coerce")
    return pd.Series(math.nan, index=runs.index, dtype=float)


def as_float(value: Any) -> float:
    """A param or tag as a number: NaN for None, "" and "None"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def model_of(runs: pd.DataFrame) -> pd.Series:
    """The model alias of every run: tag ``truthsteer.model``, else tag ``model``."""
    primary, fallback = tag(runs, TAG_MODEL), tag(runs, "model")
    return primary.where(primary.notna(), fallback)


def of_stage(runs: pd.DataFrame, *stages: str) -> pd.DataFrame:
    """The runs whose ``truthsteer.stage`` is one of ``stages``."""
    return runs[tag(runs, TAG_STAGE).isin(stages)]


# ---------------------------------------------------------------- what was missing


@dataclasses.dataclass(frozen=True)
class MissingItem:
    """One thing the analysis looked for and did not find.

    Args:
        what: what was missing and what was skipped because of it.
        model: the model alias it concerns, or "".
        run_id: the run it concerns, or "".
    """

    what: str
    model: str = ""
    run_id: str = ""


@dataclasses.dataclass
class Missing:
    """The list of what was missing, in the order found, without repeats."""

    items: list[MissingItem] = dataclasses.field(default_factory=list)

    def add(self, what: str, *, model: str | None = "", run_id: str | None = "") -> None:
        """Record ``what`` for ``model`` and ``run_id`` (once).

        Args:
            what: the missing piece and its consequence, e.g. ``"no metric llm_informative"``.
            model: the model alias, or "".
            run_id: the run, or "".
        """
        item = MissingItem(what, model or "", run_id or "")
        if item not in self.items:
            self.items.append(item)

    def frame(self) -> pd.DataFrame:
        """Columns ``model``, ``run_id``, ``what``."""
        return pd.DataFrame([{"model": i.model, "run_id": i.run_id, "what": i.what} for i in self.items],
                            columns=["model", "run_id", "what"])

    def __len__(self) -> int:
        return len(self.items)


# ---------------------------------------------------------------- models


def model_sizes(runs: pd.DataFrame, missing: Missing | None = None) -> dict[str, float]:
    """Every model's size in billions of parameters: param ``model.n_params_b`` of its runs, else the
    registry's ``configs/models/<alias>.yaml``, else NaN (recorded in ``missing``).

    Args:
        runs: the run frame.
        missing: where to record a model of unknown size.
    """
    models = model_of(runs)
    sizes = param(runs, PARAM_N_PARAMS).map(as_float)
    out: dict[str, float] = {}
    for alias in sorted(set(models.dropna())):
        known = sizes[(models == alias) & sizes.notna()]
        if not known.empty:
            out[alias] = float(known.iloc[0])
            continue
        try:
            out[alias] = float(model_spec(alias).n_params_b)
        except (ConfigError, OSError):
            out[alias] = math.nan
            if missing is not None:
                missing.add(f"size unknown (no param {PARAM_N_PARAMS}, no configs/models/{alias}.yaml): "
                            f"ordered last", model=alias)
    return out


def order_models(models: Iterable[str], sizes: Mapping[str, float]) -> list[str]:
    """Models from smallest to largest; those of unknown size last, by name.

    Args:
        models: model aliases.
        sizes: alias -> billions of parameters (NaN or absent: unknown).
    """
    def key(alias: str) -> tuple[bool, float, str]:
        size = sizes.get(alias, math.nan)
        return (math.isnan(size), 0.0 if math.isnan(size) else size, alias)

    return sorted(dict.fromkeys(models), key=key)


def run_listing(runs: pd.DataFrame) -> pd.DataFrame:
    """The selected runs in brief: ``run_id``, ``stage``, ``model``, ``variant``, ``parent_run``, ``run_name``."""
    return pd.DataFrame({
        "run_id": column(runs, "run_id"), "stage": tag(runs, TAG_STAGE), "model": model_of(runs),
        "variant": variant_tag(runs), "parent_run": tag(runs, TAG_PARENT),
        "run_name": tag(runs, "mlflow.runName"),
    }).reset_index(drop=True)


__all__ = ['Missing', 'MissingItem', 'Selection', 'SelectionError', 'as_float', 'column', 'connect', 'descendants', 'metric', 'model_of', 'model_sizes', 'of_stage', 'order_models', 'param', 'run_listing', 'select_runs', 'tag', 'variant_tag']
