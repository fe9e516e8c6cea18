"""The calibrate stage: agreement with human labels, clustered intervals, and the stage on real labels.

Oracles: accuracy, balanced accuracy and kappa from confusion counts == scikit-learn's on the same
verdicts; the stage's logged kappa for ROUGE == scikit-learn's kappa recomputed from the labels file
and rouge-score verdicts of the same answers.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score

from core.config import ConfigError
from core.config_io import load_config
from core.data import splits_for
from core.tracking import stage_run
from evaluation.human_labels import read_labels
from evaluation.judges import make_judge
from evaluation.statistics import binary_agreement, confusion_counts
from stages import calibrate
from tests.conftest import DATA_CSV


def test_metrics_from_counts_equal_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    verdicts = np.where(rng.random(300) < 0.7, labels, 1 - labels)
    got = binary_agreement(confusion_counts(labels, verdicts).sum(axis=0))
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, verdicts))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, verdicts))
    assert got["kappa"] == pytest.approx(cohen_kappa_score(labels, verdicts))


def test_clustered_intervals_resample_questions() -> None:
    """Ten questions whose answers all agree or all disagree: resampling questions sees 10 units, so the
    interval is wide; the same verdicts as 10 singleton questions give the same point and interval."""
    labels = [1, 0] * 50
    verdicts = [y if i // 10 < 7 else 1 - y for i, y in enumerate(labels)]  # questions 7, 8, 9 all wrong
    groups = [f"q{i // 10}" for i in range(100)]
    out = calibrate.clustered_agreement(labels, verdicts, groups, n_bootstrap=2000, confidence=0.95, seed=0)
    assert out["accuracy"] == pytest.approx(0.7) and out["n"] == 100
    assert out["accuracy_ci_low"] < 0.5 and out["accuracy_ci_high"] > 0.9  # only 10 independent units
    rows = calibrate.clustered_agreement(labels, verdicts, [f"r{i}" for i in range(100)], n_bootstrap=2000,
                                         confidence=0.95, seed=0)
    assert rows["accuracy"] == out["accuracy"] and rows["accuracy_ci_high"] - rows["accuracy_ci_low"] < 0.2


def test_calibrate_on_the_smoke_test_questions_with_lexical_judges(tracking: str) -> None:
    cfg = load_config("smollm2-135m", f"data.source={DATA_CSV},calibrate.judges=[rouge,bleu],eval.n_bootstrap=200")
    with stage_run("calibrate", cfg) as run:
        table = calibrate.run(cfg)
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    assert set(table["judge"]) == {"rouge", "bleu"} and set(table["kind"]) == {"truth"}  # no info verdicts
    test = splits_for(cfg)["test"]
    labelled = read_labels(DATA_CSV.parent / "finetune_truth.jsonl", test, "truth")
    rows = make_judge("rouge", cfg).score([r.item for r in labelled])
    labels, verdicts = [r.label for r in labelled], [int(r["rouge1_acc"]) for r in rows]
    assert metrics["rouge_truth_all_kappa"] == pytest.approx(cohen_kappa_score(labels, verdicts))
    assert metrics["rouge_truth_all_n"] == len(labelled) == metrics["n_truth_labels"]
    nonref = [i for i, r in enumerate(labelled) if not r.verbatim]
    assert metrics["rouge_truth_nonref_n"] == len(nonref) < len(labelled)
    assert metrics["rouge_truth_nonref_kappa"] == pytest.approx(
        cohen_kappa_score([labels[i] for i in nonref], [verdicts[i] for i in nonref]))
    assert metrics["rouge_truth_all_kappa_ci_low"] < metrics["rouge_truth_all_kappa"] < metrics[
        "rouge_truth_all_kappa_ci_high"]


def test_mc_and_an_untrained_judge_are_refused(tracking: str) -> None:
    with pytest.raises(ConfigError, match="calibrate.judges='mc' is not one of"):
        load_config("smollm2-135m", "calibrate.judges=[mc]")
    cfg = load_config("smollm2-135m", f"data.source={DATA_CSV},calibrate.judges=[judge]")
    with pytest.raises(ConfigError, match="judge.trained is empty"), stage_run("calibrate", cfg):
        calibrate.run(cfg)
