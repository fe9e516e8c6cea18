"""What a figure's title and axes say about the numbers it draws: metric names in words, and per model the split
and number of questions of its evaluation, the judge behind the metric and that judge's measured agreement with
people (the latest ``calibrate`` run: Cohen's kappa on held-out answers that are not reference answers)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import pandas as pd

from analysis.runs import metric, model_of, of_stage
from evaluation.metric_names import axis_label, judge_of, words

SUBSETS = ("nonref", "all")  # calibrate's subsets, the harder one first: answers that are not verbatim references


def _kinds(name: str) -> tuple[str, ...]:
    if "truthful_informative" in name:
        return ("truth", "info")
    return ("info",) if "info" in name else ("truth",)


@dataclasses.dataclass(frozen=True)
class Context:
    """Per model: its evaluation's split and number of questions, and the latest calibrate run's metrics.

    Args:
        splits: model -> ``eval.split`` of its evaluation.
        questions: model -> the questions its evaluation judged.
        calibration: model -> the metrics of its latest calibrate run.
    """

    splits: Mapping[str, str] = dataclasses.field(default_factory=dict)
    questions: Mapping[str, int] = dataclasses.field(default_factory=dict)
    calibration: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)

    def agreement(self, model: str, name: str) -> str:
        """The judge's measured agreement with people for metric ``name``, in words ("" where not measured)."""
        judge = judge_of(name)[0]
        measured = self.calibration.get(model, {})
        parts, where = [], ""
        for kind in _kinds(name):
            for subset in SUBSETS:
                key = f"{judge}_{kind}_{subset}_kappa"
                if judge and math.isfinite(measured.get(key, math.nan)):
                    low, high = measured.get(f"{key}_ci_low", math.nan), measured.get(f"{key}_ci_high", math.nan)
                    where = "non-reference answers" if subset == "nonref" else "all answers"
                    parts.append(f"{kind} {measured[key]:.2f} [{low:.2f}, {high:.2f}]")
                    break
        return f"κ with people ({where}): {', '.join(parts)}" if parts else ""

    def about(self, model: str, name: str = "") -> str:
        """One line for a title: split and n of the model's evaluation, the judge and its agreement."""
        split, n = self.splits.get(model, ""), self.questions.get(model)
        parts = [f"{split or 'unknown'} split, n={n if n is not None else '?'}"]
        judge = judge_of(name)[1] if name else ""
        if judge:
            agreement = self.agreement(model, name)
            parts.append(f"{judge}" + (f", {agreement}" if agreement else ""))
        return "; ".join(parts)


def build(runs: pd.DataFrame, variants: pd.DataFrame, evaluations: Mapping[str, str]) -> Context:
    """The context of every model with an evaluation, and of every model with a calibrate run.

    Args:
        runs: the run frame.
        variants: ``tables.variant_runs`` output.
        evaluations: model -> its evaluation (``tables.latest_evaluations``).
    """
    splits, questions = {}, {}
    for model, evaluation in evaluations.items():
        mine = variants[(variants["model"] == model) & (variants["evaluation"] == evaluation)]
        split = mine["split"].dropna().astype(str) if "split" in mine else pd.Series(dtype=str)
        splits[model] = split.iloc[0] if len(split) else ""
        n = pd.to_numeric(mine.get("metrics.n_questions", pd.Series(dtype=float)), errors="coerce").dropna()
        if len(n):
            questions[model] = int(n.max())
    calibration: dict[str, dict[str, float]] = {}
    found = of_stage(runs, "calibrate")
    if not found.empty:
        found = found.assign(_model=model_of(found)).sort_values("start_time")
        for model, group in found.groupby("_model", sort=True):
            latest = group.iloc[[-1]]
            keys = [c.removeprefix("metrics.") for c in latest.columns if c.startswith("metrics.") and "kappa" in c]
            values = {k: float(metric(latest, k).iloc[0]) for k in keys}
            calibration[str(model)] = {k: v for k, v in values.items() if math.isfinite(v)}
    return Context(splits=splits, questions=questions, calibration=calibration)


__all__ = ["Context", "axis_label", "build", "judge_of", "words"]
