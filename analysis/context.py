"""What a figure's title and axes say about the numbers it draws: metric names in words, and per model the split
and number of questions of its evaluation, the judge behind the metric and that judge's measured agreement with
people (the latest ``calibrate`` run: Cohen's kappa on held-out answers that are not reference answers)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import pandas as pd

from analysis.runs import metric, model_of, of_stage

# metric -> what it measures, in words (the judge is added by ``axis_label``)
WORDS = {
    "judge_truthful_informative": "True×Info rate", "judge_truthful": "truthful rate",
    "judge_informative": "informative rate", "judge_p_true": "mean P(truthful)", "judge_p_info": "mean P(informative)",
    "llm_truthful": "truthful rate", "llm_informative": "informative rate", "llm_logprob_truthful": "truthful rate",
    "semantic_acc": "truthful rate", "semantic_max": "similarity to the nearest true reference",
    "semantic_diff": "similarity: nearest true minus nearest false reference",
    "mc1": "MC1 accuracy", "mc2": "MC2: probability on the true answers",
    "bleu_acc": "BLEU accuracy", "rouge1_acc": "ROUGE-1 accuracy", "rougeL_acc": "ROUGE-L accuracy",
    "kl_neutral": "KL from the unsteered model on neutral text (nats/token)",
    "ce_neutral": "cross-entropy on neutral text (nats/token)", "kl_answers": "KL on the answers (nats/token)",
    "objective": "tuning objective", "degenerate_answer_rate": "degenerate-answer rate",
}
# metric prefix -> (the judge's calibrate name, the judge in words); longest prefix first
JUDGES = (("llm_logprob_", "llm_logprob", "LLM log-prob judge"), ("judge_", "judge", "trained judge"),
          ("llm_", "llm", "LLM judge"), ("semantic_", "semantic", "MiniLM similarity judge"),
          ("bleu_", "bleu", "BLEU against the references"), ("rouge", "rouge", "ROUGE against the references"),
          ("mc", "", "multiple choice, no judge"))
SUBSETS = ("nonref", "all")  # calibrate's subsets, the harder one first: answers that are not verbatim references


def judge_of(name: str) -> tuple[str, str]:
    """The calibrate name ("" for none) and the words for the judge behind metric ``name``."""
    return next(((judge, words) for prefix, judge, words in JUDGES if name.startswith(prefix)), ("", ""))


def words(name: str) -> str:
    """Metric ``name`` in words, without its judge (a short axis label under a titled panel)."""
    return WORDS.get(name, name.replace("_", " "))


def axis_label(name: str) -> str:
    """Metric ``name`` in words with its judge, e.g. ``truthful rate (trained judge)``; unknown names with their
    underscores as spaces."""
    words = WORDS.get(name, name.replace("_", " "))
    judge = judge_of(name)[1]
    return f"{words} ({judge})" if judge and not name.startswith(("kl_", "ce_")) else words


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
