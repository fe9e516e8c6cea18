"""The data stage: the TruthfulQA questions split into pool, train, val and test (``core.data``), logged
as an MLflow dataset input and the ``data/splits.json`` artifact that every later stage reads."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import mlflow
import pandas as pd
from mlflow.data.pandas_dataset import from_pandas

from core.config import Config
from core.data import (
    HF_CONFIG,
    HF_SPLIT,
    SPLIT_NAMES,
    SPLITS_ARTIFACT,
    Question,
    _splits_from_payload,
    _splits_payload,
    file_sha256,
    is_local_source,
    load_questions,
    split_questions,
)


def _dataset_source(source: str) -> Any:
    if is_local_source(source):
        return source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    return HuggingFaceDatasetSource(path=source, config_name=HF_CONFIG, split=HF_SPLIT)


def log_splits(
    splits: Mapping[str, Sequence[Question]], *, source: str, seed: int, sha256: str | None
) -> None:
    """Record the splits in the active MLflow run.

    Logs one dataset input `truthfulqa-<split>` (context `<split>`) per split, the metrics
    `n_pool`, `n_train`, `n_val`, `n_test`, `n_categories`, and the artifact SPLITS_ARTIFACT
    with source, sha256, seed, sizes, ids per split and every question record.

    Args:
        splits: questions per split, keys exactly SPLIT_NAMES (as from split_questions).
        source: where the questions came from (a path or Hugging Face dataset id).
        seed: the seed given to split_questions.
        sha256: sha256 of the source file, or None when unknown.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("log_splits needs an active MLflow run: call it inside `with mlflow.start_run():`")
    if sorted(splits) != sorted(SPLIT_NAMES):
        raise ValueError(f"splits must have exactly the keys {list(SPLIT_NAMES)}, got {list(splits)}")
    payload = _splits_payload(splits, source, seed, sha256)
    _splits_from_payload(json.loads(json.dumps(payload)), "splits to log")  # never write what cannot be read
    columns = [f.name for f in fields(Question)]
    dataset_source = _dataset_source(source)
    for split in SPLIT_NAMES:
        # object dtype: MLflow's schema inference fails on an empty pandas-3 `str` column.
        frame = pd.DataFrame([q.to_dict() for q in splits[split]], columns=columns, dtype=object)
        with warnings.catch_warnings():
            # MLflow registers the local-file source twice and warns that a path is ambiguous.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = from_pandas(frame, source=dataset_source, name=f"truthfulqa-{split}")
        mlflow.log_input(dataset, context=split)
    categories = {q.category for qs in splits.values() for q in qs}
    mlflow.log_metrics({**{f"n_{split}": float(len(splits[split])) for split in SPLIT_NAMES},
                        "n_categories": float(len(categories))})
    mlflow.log_dict(payload, SPLITS_ARTIFACT)


def run(cfg: Config) -> dict[str, list[Question]]:
    """The ``data`` stage: load, split and record the splits in the active MLflow run."""
    questions = load_questions(cfg.data.source)
    splits = split_questions(questions, cfg.data.sizes, cfg.data.seed)
    sha = file_sha256(cfg.data.source) if is_local_source(cfg.data.source) else None
    log_splits(splits, source=str(cfg.data.source), seed=cfg.data.seed, sha256=sha)
    mlflow.log_metric("n_questions", float(len(questions)))
    if sha:
        mlflow.set_tag("truthsteer.data_sha256", sha)
    for split, items in splits.items():
        print(f"{split:>5}: {len(items)} questions")
    return splits


__all__ = ['log_splits', 'run']
