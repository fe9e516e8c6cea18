"""The ``calibrate`` stage: how well each judge agrees with people, on questions held out from it.

The human labels of ``finetune_truth.jsonl`` and ``finetune_info.jsonl`` (answers by other models to
TruthfulQA's questions, each labelled true or not, informative or not) are kept for the questions of
``eval.split`` (the test split by default: the questions ``evaluate`` judges), and every judge of
``calibrate.judges`` that gives a verdict on a label (``verdicts`` of its class: ``truth`` and/or
``info``) scores those answers. A trained judge trained on any of these questions is refused.

Per judge, label kind and subset (``all`` answers, ``nonref``: the answers that are not verbatim
reference answers, where similarity to the references is no shortcut), the metrics
``<judge>_<kind>_<subset>_<accuracy|balanced_accuracy|kappa>`` with ``_ci_low``/``_ci_high`` (a
percentile bootstrap that resamples questions, since a question's answers are not independent) and
``_n``. Artifacts: ``calibrate/agreement.csv`` (the same table, also an MLflow table),
``calibrate/confusion.csv`` (counts per judge, kind and subset), ``calibrate/per_category.csv``
(kappa and n per category), ``calibrate/agreement.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from core import artifacts
from core.config import Config, ConfigError
from core.data import Question, load_questions, splits_for
from evaluation.human_labels import LABEL_FILES, Labelled, read_labels
from evaluation.judges import Judge, JudgeError, make_judge
from evaluation.statistics import binary_agreement, confusion_counts

SUBSETS = ("all", "nonref")
METRICS = ("accuracy", "balanced_accuracy", "kappa")


def clustered_agreement(labels: Sequence[int], verdicts: Sequence[int], groups: Sequence[str], *,
                        n_bootstrap: int, confidence: float, seed: int) -> dict[str, float]:
    """Each of ``METRICS`` with a percentile bootstrap interval that resamples whole groups (questions).

    Args:
        labels: human labels, 0/1.
        verdicts: the judge's verdicts, 0/1.
        groups: each row's question id.
        n_bootstrap: resamples.
        confidence: interval coverage.
        seed: seeds the resampling.
    """
    out: dict[str, float] = {"n": float(len(labels))}
    if not labels:
        return {**out, **{f"{m}{s}": math.nan for m in METRICS for s in ("", "_ci_low", "_ci_high")}}
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    per_group = np.zeros((len(names), 4))  # (groups, 4)
    np.add.at(per_group, [index[g] for g in groups], confusion_counts(labels, verdicts))
    point = binary_agreement(per_group.sum(axis=0))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(n_bootstrap, len(names)))  # (B, groups)
    resampled = binary_agreement(per_group[draws].sum(axis=1))  # each (B,)
    alpha = (1 - confidence) / 2
    for metric in METRICS:
        values = resampled[metric][np.isfinite(resampled[metric])]
        low, high = (np.quantile(values, [alpha, 1 - alpha]) if len(values) else (math.nan, math.nan))
        out.update({metric: float(point[metric]), f"{metric}_ci_low": float(low), f"{metric}_ci_high": float(high)})
    return out


def plan(cfg: Config, data_run: str = "") -> list[str]:
    """What ``run`` would do, checked without reading labels or loading a judge."""
    from stages.train_judge import labels_folder

    folder = labels_folder(cfg)
    judges = list(cfg.calibrate.judges)
    return [f"labels: {folder}", f"questions: the {cfg.eval.split} split of "
            + (f"data run {data_run}" if data_run else str(cfg.data.source)),
            f"judges: {', '.join(judges)}" + (f" (trained judge {cfg.judge.trained})" if "judge" in judges else ""),
            f"intervals: {cfg.eval.n_bootstrap} bootstrap resamples of questions, {cfg.eval.confidence:.0%}"]


def calibration_questions(cfg: Config, data_run: str) -> list[Question]:
    return splits_for(cfg, data_run)[cfg.eval.split]


def score_labelled(judge: Judge, labelled: Sequence[Labelled]) -> list[dict[str, Any]]:
    rows = judge.score([r.item for r in labelled])
    if len(rows) != len(labelled):
        raise RuntimeError(f"judge {judge.name!r} returned {len(rows)} rows for {len(labelled)} answers")
    return rows


def agreement_table(cfg: Config, judges: Sequence[Judge], labelled: Mapping[str, Sequence[Labelled]]
                    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The agreement, confusion and per-category tables of ``judges`` on ``labelled`` (kind -> answers)."""
    agreement_rows, confusion_rows, category_rows = [], [], []
    for judge in judges:
        for kind, field in getattr(type(judge), "verdicts", {}).items():
            answers = labelled[kind]
            scored = score_labelled(judge, answers)
            keep = [i for i, row in enumerate(scored) if row.get(field) is not None]  # invalid verdicts dropped
            for subset in SUBSETS:
                rows = [i for i in keep if subset == "all" or not answers[i].verbatim]
                y = [answers[i].label for i in rows]
                v = [int(scored[i][field]) for i in rows]
                values = clustered_agreement(y, v, [answers[i].item.qid for i in rows],
                                             n_bootstrap=cfg.eval.n_bootstrap, confidence=cfg.eval.confidence,
                                             seed=cfg.eval.seed)
                agreement_rows.append({"judge": judge.name, "kind": kind, "subset": subset, **values,
                                       "n_invalid": float(len(answers) - len(keep))})
                tp, fp, fn, tn = confusion_counts(y, v).sum(axis=0)
                confusion_rows.append({"judge": judge.name, "kind": kind, "subset": subset, "tp": tp, "fp": fp,
                                       "fn": fn, "tn": tn})
            by_category: dict[str, list[int]] = {}
            for i in keep:
                by_category.setdefault(answers[i].category, []).append(i)
            for category, rows in sorted(by_category.items()):
                values = binary_agreement(confusion_counts([answers[i].label for i in rows],
                                                           [int(scored[i][field]) for i in rows]).sum(axis=0))
                category_rows.append({"judge": judge.name, "kind": kind, "category": category, "n": float(len(rows)),
                                      "kappa": float(values["kappa"]), "accuracy": float(values["accuracy"])})
    return pd.DataFrame(agreement_rows), pd.DataFrame(confusion_rows), pd.DataFrame(category_rows)


def metric_dict(table: pd.DataFrame) -> dict[str, float]:
    """``<judge>_<kind>_<subset>_<metric>`` (and ``_ci_low``/``_ci_high``/``_n``) from the agreement table."""
    out = {}
    for row in table.to_dict("records"):
        prefix = f"{row['judge']}_{row['kind']}_{row['subset']}"
        out[f"{prefix}_n"] = float(row["n"])
        for metric in METRICS:
            for suffix in ("", "_ci_low", "_ci_high"):
                out[f"{prefix}_{metric}{suffix}"] = float(row[f"{metric}{suffix}"])
    return out


def markdown(table: pd.DataFrame) -> str:
    lines = ["| judge | label | answers | n | accuracy | balanced accuracy | Cohen's kappa [95% CI] |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in table.to_dict("records"):
        subset = "all" if r["subset"] == "all" else "not verbatim references"
        lines.append(f"| {r['judge']} | {r['kind']} | {subset} | {int(r['n'])} | {r['accuracy']:.3f} | "
                     f"{r['balanced_accuracy']:.3f} | {r['kappa']:.3f} [{r['kappa_ci_low']:.3f}, {r['kappa_ci_high']:.3f}] |")
    return "\n".join(lines) + "\n"


def run(cfg: Config, *, data_run: str = "") -> pd.DataFrame:
    """The ``calibrate`` stage, in the active MLflow run.

    Args:
        cfg: the resolved config (``calibrate.judges``, ``eval.split``, ``eval.n_bootstrap``, ``judge``).
        data_run: a data stage run whose split to use ("" recomputes it from ``cfg.data``).

    Returns:
        The agreement table.
    """
    from evaluation.judge_loading import check_trained_judge, load_judge_model
    from stages.train_judge import labels_folder

    if mlflow.active_run() is None:
        raise RuntimeError("calibrate.run needs an active MLflow run: call it inside tracking.stage_run")
    questions = calibration_questions(cfg, data_run)
    if not questions:
        raise ConfigError(f"eval.split={cfg.eval.split} has no questions; set data.{cfg.eval.split} > 0")
    names = list(dict.fromkeys(cfg.calibrate.judges))
    check_trained_judge(cfg, [q.id for q in questions], names)
    folder = labels_folder(cfg)
    all_questions = load_questions(cfg.data.source)
    wanted = {q.id for q in questions}
    kept = [q for q in all_questions if q.id in wanted]
    labelled = {kind: read_labels(folder / name, kept, kind) for kind, name in LABEL_FILES.items()}
    judge_model = load_judge_model(cfg, names, None)
    judges = []
    for name in names:
        judge = make_judge(name, cfg, judge_model=judge_model)
        if not getattr(type(judge), "verdicts", {}):
            raise JudgeError(f"judge {name!r} gives no verdict on an answer (mc scores the model); calibrate the "
                             "answer judges, e.g. calibrate.judges=[judge,semantic,rouge,bleu]")
        judges.append(judge)
    table, confusion, categories = agreement_table(cfg, judges, labelled)
    mlflow.log_metrics(metric_dict(table))
    mlflow.log_metrics({f"n_{kind}_labels": float(len(rows)) for kind, rows in labelled.items()})
    mlflow.log_metric("n_questions", float(len(kept)))
    mlflow.log_table(data=table, artifact_file=artifacts.CALIBRATION_TABLE)
    mlflow.log_text(table.to_csv(index=False), artifacts.CALIBRATION_CSV)
    mlflow.log_text(confusion.to_csv(index=False), artifacts.CALIBRATION_CONFUSION)
    mlflow.log_text(categories.to_csv(index=False), artifacts.CALIBRATION_CATEGORIES)
    text = markdown(table)
    mlflow.log_text(text, artifacts.CALIBRATION_MARKDOWN)
    print(text)
    return table


__all__ = ["clustered_agreement", "metric_dict", "plan", "run"]
