"""The ablations of a sweep (``stages.sweep``): its variant runs by knob, averaged over seeds, and the tables of
the four ablation figures (scale, layer, MLP width and branch, seed spread).

A sweep's variant runs are ``evaluate.variant`` runs tagged ``sweep.name``, ``sweep.reference`` (JSON: the value
each knob is held at in a figure that does not vary it) and ``sweep.<knob>`` for the knobs their result depends
on (``core.artifacts.SWEEP_KNOBS``; a knob a variant does not depend on is untagged: NaN, or "" for
``branch``). Several runs of one cell (a sweep killed and started again) count once: per model, sweep name,
variant and knob values the latest FINISHED run.

Which metrics: ``METRICS`` (``mc1``, ``judge_truthful_informative``), those of them that some variant run of the
(model, sweep) logged; where it logged neither, the first of ``FALLBACK_METRICS`` (``judge_truthful``, then
``semantic_acc``) that it logged. Each metric is its own panel.

Which point a figure holds the other knobs at: the sweep's ``sweep.reference`` (of its latest run); a knob
absent from it (or an unreadable tag) is held at its most frequent value, recorded as missing. A run matches
the reference on a knob when it has the reference value or the knob is untagged on it (the variant does not
depend on it). ``branch`` names the MLP arm (``mlp_gen`` has branch ``gen``), so a variant with one branch keeps
its own, and only a variant with several branches is held at the reference branch.

Seeds: every point (variant and knobs but the seed) averages its runs over seeds: ``seed_mean``, ``seed_sd``
(the sample standard deviation across seeds, ddof 1; NaN for one seed), ``n_seeds``, ``seeds``, and the
per-question percentile bootstrap interval of each seed's run averaged over the seeds, ``ci_low_seed_mean`` and
``ci_high_seed_mean`` (NaN when a seed's run has no interval). A variant that does not depend on the seed
(greedy baseline, CAA) is one run: ``n_seeds`` 1.

A figure is drawn for each (model, sweep) that varied its knob at the reference point (two or more values), one
panel per (model, sweep, metric); a sweep that did not is recorded as missing, and a figure with no such sweep
is not drawn, with the reason in ``AblationTables.reasons``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from analysis.frames import ABLATION_FIGURES
from analysis.runs import (
    FINISHED,
    Missing,
    as_float,
    column,
    metric,
    model_of,
    of_stage,
    param,
    tag,
    variant_tag,
)
from analysis.tables import _empty, _latest
from core.artifacts import (
    ANALYSIS_SWEEP_LAYER,
    ANALYSIS_SWEEP_MLP_ARMS,
    ANALYSIS_SWEEP_POINTS,
    ANALYSIS_SWEEP_RUNS,
    ANALYSIS_SWEEP_SCALE,
    ANALYSIS_SWEEP_SEEDS,
    SWEEP_KNOBS,
    TAG_PARENT,
    TAG_SWEEP_NAME,
    TAG_SWEEP_REFERENCE,
    VARIANT_STAGE,
    sweep_tag,
)

METRICS = ("mc1", "judge_truthful_informative")
FALLBACK_METRICS = ("judge_truthful", "semantic_acc")  # the first present, where a sweep logged no METRICS
NUMERIC_KNOBS = tuple(k for k in SWEEP_KNOBS if k != "branch")
POINT_KNOBS = tuple(k for k in SWEEP_KNOBS if k != "seed")  # what tells a point apart once seeds are averaged
BRANCH_ORDER = ("mc", "gen", "joint")

RUN_COLUMNS = ["model", "sweep", "variant", *SWEEP_KNOBS, "metric", "value", "ci_low", "ci_high", "split",
               "n_questions", "run_id", "evaluation", "start_time"]
POINT_COLUMNS = ["model", "sweep", "variant", *POINT_KNOBS, "metric", "seed_mean", "seed_sd", "n_seeds", "seeds",
                 "ci_low_seed_mean", "ci_high_seed_mean", "n_questions", "run_ids"]
FIGURE_COLUMNS = ["role", *POINT_COLUMNS]  # role: "line" or "bar" (drawn against the knob), "reference" (a level)
SEED_COLUMNS = ["model", "sweep", "variant", *POINT_KNOBS, "metric", "seed", "value", "ci_low", "ci_high",
                "seed_mean", "seed_sd", "n_seeds", "ci_low_seed_mean", "ci_high_seed_mean", "n_questions", "run_id"]

NO_SWEEP = "no sweep variant runs selected (evaluate.variant runs tagged sweep.name: mlflow run . -e sweep)"

Reference = dict[str, Any]  # knob -> the value held: a float, or a str for branch


@dataclasses.dataclass(frozen=True)
class AblationTables:
    """The sweep tables of a run frame.

    Args:
        runs: ``sweep_runs``: one row per sweep variant run and metric.
        points: ``seed_points``: the runs averaged over seeds.
        references: (model, sweep) -> its reference point.
        figures: figure stem -> the table it plots (empty: not drawn).
        reasons: figure stem -> why it is not drawn ("" where it is).
    """

    runs: pd.DataFrame
    points: pd.DataFrame
    references: dict[tuple[str, str], Reference]
    figures: dict[str, pd.DataFrame]
    reasons: dict[str, str]


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:g}"


def sweep_metric_names(variant_frame: pd.DataFrame) -> list[str]:
    """The metrics the ablations of a sweep report: those of ``METRICS`` some run logged, else the first of
    ``FALLBACK_METRICS`` that one did (empty: none).

    Args:
        variant_frame: the sweep's variant runs, with their ``metrics.*`` columns.
    """
    logged = [m for m in (*METRICS, *FALLBACK_METRICS) if metric(variant_frame, m).notna().any()]
    return [m for m in logged if m in METRICS] or [m for m in logged if m in FALLBACK_METRICS][:1]


def sweep_runs(runs: pd.DataFrame, missing: Missing) -> pd.DataFrame:
    """One row per sweep variant run and metric: model, sweep name, variant, the knobs (``RUN_COLUMNS``; NaN, or ""
    for ``branch``, where untagged), the metric's value and interval, the run's split, questions and parent
    evaluation; the latest FINISHED run per (model, sweep, variant, knobs).

    Args:
        runs: the run frame.
        missing: records sweeps without any metric of ``METRICS`` or ``FALLBACK_METRICS``, and runs without a
            chosen metric or its interval.
    """
    selected = of_stage(runs, VARIANT_STAGE)
    if "status" in selected:
        selected = selected[selected["status"] == FINISHED]
    selected = selected[tag(selected, TAG_SWEEP_NAME).notna()]
    if selected.empty:
        return _empty([*RUN_COLUMNS, "reference"])
    frame = pd.DataFrame({
        "model": model_of(selected).fillna(""), "sweep": tag(selected, TAG_SWEEP_NAME).astype(str),
        "variant": variant_tag(selected).fillna(""),
        **{k: tag(selected, sweep_tag(k)).map(as_float) for k in NUMERIC_KNOBS},
        "branch": tag(selected, sweep_tag("branch")).map(_text),
        "reference": tag(selected, TAG_SWEEP_REFERENCE).map(_text),
        "split": param(selected, "eval.split").map(_text), "n_questions": metric(selected, "n_questions"),
        "run_id": column(selected, "run_id").astype(str), "evaluation": tag(selected, TAG_PARENT).map(_text),
        "start_time": column(selected, "start_time"),
    })
    metrics = selected[[c for c in selected.columns if c.startswith("metrics.")]]
    latest = _latest(pd.concat([frame, metrics], axis=1), ["model", "sweep", "variant", *SWEEP_KNOBS])
    records = []
    for (model, sweep), group in latest.groupby(["model", "sweep"], sort=True):
        names = sweep_metric_names(group)
        if not names:
            missing.add(f"sweep {sweep}: no metric {', '.join((*METRICS, *FALLBACK_METRICS))} in its variant runs: "
                        "no ablation figures", model=str(model))
        for row in group.to_dict("records"):
            for name in names:
                value = as_float(row.get(f"metrics.{name}"))
                if math.isnan(value):
                    missing.add(f"sweep {sweep}: {row['variant']} run without metric {name}: left out of the "
                                "ablations", model=str(model), run_id=row["run_id"])
                    continue
                low, high = as_float(row.get(f"metrics.{name}_ci_low")), as_float(row.get(f"metrics.{name}_ci_high"))
                if math.isnan(low) or math.isnan(high):
                    missing.add(f"sweep {sweep}: {row['variant']} run without an interval for {name}",
                                model=str(model), run_id=row["run_id"])
                records.append({**{c: row[c] for c in RUN_COLUMNS if c in row}, "reference": row["reference"],
                                "metric": name, "value": value, "ci_low": low, "ci_high": high})
    columns = [*RUN_COLUMNS, "reference"]
    if not records:
        return _empty(columns)
    out = pd.DataFrame(records, columns=columns)
    return out.sort_values(["model", "sweep", "metric", "variant", *SWEEP_KNOBS], kind="stable").reset_index(drop=True)


def sweep_references(table: pd.DataFrame, missing: Missing) -> dict[tuple[str, str], Reference]:
    """Per (model, sweep) its reference point: the ``sweep.reference`` tag of its latest run; a knob it lacks (or
    an unreadable tag) is held at the knob's most frequent value over the sweep's runs (ties: the smallest),
    recorded in ``missing``.

    Args:
        table: ``sweep_runs`` output.
        missing: records knobs without a reference value.
    """
    out: dict[tuple[str, str], Reference] = {}
    for (model, sweep), group in table.groupby(["model", "sweep"], sort=True):
        runs = group.drop_duplicates("run_id").sort_values("start_time", kind="stable")
        texts = [t for t in runs["reference"] if t]
        parsed: Mapping[str, Any] = {}
        if texts:
            try:
                loaded = json.loads(texts[-1])
                parsed = loaded if isinstance(loaded, dict) else {}
            except json.JSONDecodeError:
                parsed = {}
        reference: Reference = {}
        for knob in SWEEP_KNOBS:
            given = parsed.get(knob)
            tagged = runs[knob][runs[knob] != ""] if knob == "branch" else runs[knob].dropna()
            if knob == "branch" and given:
                reference[knob] = str(given)
            elif knob != "branch" and not math.isnan(as_float(given)):
                reference[knob] = as_float(given)
            elif tagged.empty:
                reference[knob] = "" if knob == "branch" else math.nan  # no run has the knob: nothing to hold
            else:
                counts = tagged.value_counts()
                reference[knob] = sorted(counts[counts == counts.max()].index)[0]
                if knob != "branch":  # sweep.reference has branch null: its arms are variants, each with its own
                    missing.add(f"sweep {sweep}: no {knob} in its {TAG_SWEEP_REFERENCE} tag: held at its most "
                                f"frequent value {_text(reference[knob])}", model=str(model))
        out[(str(model), str(sweep))] = reference
    return out


def seed_points(table: pd.DataFrame) -> pd.DataFrame:
    """The sweep's runs averaged over seeds: per model, sweep, variant, knobs but the seed, and metric, the mean
    (``seed_mean``), the standard deviation across seeds (``seed_sd``, ddof 1; NaN for one seed), ``n_seeds``,
    ``seeds`` (``|``-separated; "" for an untagged seed), and the per-question bootstrap interval averaged over
    the seeds (``ci_low_seed_mean``, ``ci_high_seed_mean``).

    Args:
        table: ``sweep_runs`` output.
    """
    if table.empty:
        return _empty(POINT_COLUMNS)
    records = []
    keys = ["model", "sweep", "variant", *POINT_KNOBS, "metric"]
    for key, group in table.groupby(keys, sort=True, dropna=False):
        values = group["value"].astype(float)
        seeds = sorted(group["seed"].astype(float), key=lambda s: (math.isnan(s), s))
        records.append({
            **dict(zip(keys, key, strict=True)), "seed_mean": float(values.mean()),
            "seed_sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan, "n_seeds": len(values),
            "seeds": "|".join(_number(s) for s in seeds),
            "ci_low_seed_mean": float(group["ci_low"].astype(float).mean(skipna=False)),
            "ci_high_seed_mean": float(group["ci_high"].astype(float).mean(skipna=False)),
            "n_questions": float(group["n_questions"].astype(float).max()),
            "run_ids": "|".join(group["run_id"].astype(str)),
        })
    return pd.DataFrame(records, columns=POINT_COLUMNS)


def at_reference(frame: pd.DataFrame, reference: Reference, free: frozenset[str] = frozenset()) -> pd.Series:
    """Which rows hold every knob but ``free`` (and the seed) at ``reference``: the reference value, or untagged.
    ``branch`` is held only for a variant with several branches (an ``mlp_<branch>`` arm has its own).

    Args:
        frame: ``sweep_runs`` or ``seed_points`` rows of one (model, sweep).
        reference: its reference point.
        free: the knobs left free (the figure's axes).
    """
    keep = pd.Series(True, index=frame.index)
    for knob in (k for k in POINT_KNOBS if k not in free and k != "branch"):
        values = frame[knob].astype(float)
        keep &= values.isna() | (values == as_float(reference.get(knob)))
    if "branch" not in free:
        branches = frame[frame["branch"] != ""].groupby("variant")["branch"].nunique()
        several = frame["variant"].isin(set(branches[branches > 1].index))
        keep &= ~several | (frame["branch"] == reference.get("branch", "")) | (frame["branch"] == "")
    return keep


def _figure_frame(rows: pd.DataFrame, role: pd.Series) -> pd.DataFrame:
    return rows.assign(role=role)[FIGURE_COLUMNS]


def knob_table(points: pd.DataFrame, references: Mapping[tuple[str, str], Reference], knob: str,
               missing: Missing) -> pd.DataFrame:
    """The points of the scale or layer figure: per (model, sweep) that varied ``knob`` at its reference point,
    every variant with the other knobs at the reference; ``role`` "line" where the variant has the knob, else
    "reference" (baseline, ITI: a level).

    Args:
        points: ``seed_points`` output.
        references: ``sweep_references`` output.
        knob: ``scale`` or ``layer``.
        missing: records sweeps that did not vary ``knob``.
    """
    frames = []
    for (model, sweep), group in points.groupby(["model", "sweep"], sort=True):
        held = group[at_reference(group, references[(str(model), str(sweep))], frozenset({knob}))]
        tried = sorted(held[knob].dropna().unique())
        if len(tried) < 2:
            missing.add(f"sweep {sweep}: {knob} not varied at its reference point (values: "
                        f"{', '.join(_number(v) for v in tried) or 'none'}): no {knob} panel", model=str(model))
            continue
        frames.append(_figure_frame(held, held[knob].notna().map({True: "line", False: "reference"})))
    return _sorted(frames, knob)


def mlp_arms_table(points: pd.DataFrame, references: Mapping[tuple[str, str], Reference],
                   missing: Missing) -> pd.DataFrame:
    """The points of the MLP width and branch figure: per (model, sweep) that varied ``mlp_expansion`` or
    ``branch`` at its reference scale and layer, the MLP arms (role "bar") and the variants without a width
    (baseline, CAA, ITI: role "reference") at the reference point.

    Args:
        points: ``seed_points`` output.
        references: ``sweep_references`` output.
        missing: records sweeps that varied neither.
    """
    frames = []
    for (model, sweep), group in points.groupby(["model", "sweep"], sort=True):
        held = group[at_reference(group, references[(str(model), str(sweep))], frozenset({"mlp_expansion", "branch"}))]
        bars = held[held["mlp_expansion"].notna()]
        widths, branches = bars["mlp_expansion"].nunique(), bars["branch"].nunique()
        if widths < 2 and branches < 2:
            missing.add(f"sweep {sweep}: neither mlp_expansion nor branch varied at its reference point "
                        f"({widths} width, {branches} branch): no MLP arms panel", model=str(model))
            continue
        frames.append(_figure_frame(held, held["mlp_expansion"].notna().map({True: "bar", False: "reference"})))
    return _sorted(frames, "mlp_expansion")


def _sorted(frames: list[pd.DataFrame], knob: str) -> pd.DataFrame:
    if not frames:
        return _empty(FIGURE_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["model", "sweep", "metric", "role", "variant", knob, "branch"],
                           kind="stable").reset_index(drop=True)


def seeds_table(table: pd.DataFrame, points: pd.DataFrame, references: Mapping[tuple[str, str], Reference],
                missing: Missing) -> pd.DataFrame:
    """The runs of the seed figure: per (model, sweep) with two or more seeds at its reference point, each run at
    that point (one row per seed) beside its point's mean, ``seed_sd`` and interval averaged over seeds.

    Args:
        table: ``sweep_runs`` output.
        points: ``seed_points`` output.
        references: ``sweep_references`` output.
        missing: records sweeps with one seed at the reference point.
    """
    frames = []
    keys = ["model", "sweep", "variant", *POINT_KNOBS, "metric"]
    for (model, sweep), group in table.groupby(["model", "sweep"], sort=True):
        held = group[at_reference(group, references[(str(model), str(sweep))])]
        mine = points[(points["model"] == model) & (points["sweep"] == sweep)]
        merged = held.drop(columns=["n_questions"]).merge(mine.drop(columns=["run_ids"]), on=keys, how="left")
        if merged.empty or merged["n_seeds"].max() < 2:
            missing.add(f"sweep {sweep}: one seed per variant at its reference point: no seed panel", model=str(model))
            continue
        frames.append(merged[SEED_COLUMNS])
    if not frames:
        return _empty(SEED_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["model", "sweep", "metric", "variant", "seed"], kind="stable").reset_index(drop=True)


def ablation_tables(runs: pd.DataFrame, missing: Missing) -> AblationTables:
    """Every sweep table of a run frame, and why each ablation figure is not drawn where it is not.

    Args:
        runs: the run frame (``runs.select_runs``).
        missing: collects what is missing.
    """
    table = sweep_runs(runs, missing)
    points = seed_points(table)
    references = sweep_references(table, missing)
    figures = {
        ANALYSIS_SWEEP_SCALE: knob_table(points, references, "scale", missing),
        ANALYSIS_SWEEP_LAYER: knob_table(points, references, "layer", missing),
        ANALYSIS_SWEEP_MLP_ARMS: mlp_arms_table(points, references, missing),
        ANALYSIS_SWEEP_SEEDS: seeds_table(table, points, references, missing),
    }
    sweeps = ", ".join(f"{s} of {m}" for m, s in references) or "none"
    reasons = {spec.stem: "" if not figures[spec.stem].empty else NO_SWEEP if table.empty
               else f"{spec.needs}; sweeps selected: {sweeps}" for spec in ABLATION_FIGURES}
    return AblationTables(runs=table[RUN_COLUMNS], points=points, references=references, figures=figures,
                          reasons=reasons)


__all__ = ["ABLATION_FIGURES", "ANALYSIS_SWEEP_LAYER", "ANALYSIS_SWEEP_MLP_ARMS", "ANALYSIS_SWEEP_POINTS",
           "ANALYSIS_SWEEP_RUNS", "ANALYSIS_SWEEP_SCALE", "ANALYSIS_SWEEP_SEEDS", "FALLBACK_METRICS", "METRICS",
           "AblationTables", "ablation_tables", "at_reference", "knob_table", "mlp_arms_table", "seed_points",
           "seeds_table", "sweep_metric_names", "sweep_references", "sweep_runs"]
