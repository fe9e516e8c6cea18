"""The data stage: the TruthfulQA questions split into pool, train, val and test (``core.data``), logged
as MLflow dataset inputs (Hugging Face datasets that name their source and digest) and the
``data/splits.json`` artifact that every later stage reads."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import mlflow
from mlflow.data.huggingface_dataset import from_huggingface

from core.config import Config
from core.data import (
    SPLIT_NAMES,
    SPLITS_ARTIFACT,
    Question,
    _splits_from_payload,
    _splits_payload,
    load_questions,
    source_sha256,
    split_questions,
)
from core.data_sources import mlflow_source


def split_dataset(questions: Sequence[Question]) -> Any:
    """One split as a ``datasets.Dataset`` of question records (typed even when empty)."""
    import datasets

    features = datasets.Features({f.name: datasets.Sequence(datasets.Value("string"))
                                  if f.name.endswith("_answers") else datasets.Value("string")
                                  for f in fields(Question)})
    records = [q.to_dict() for q in questions]
    return datasets.Dataset.from_dict({name: [r[name] for r in records] for name in features}, features=features)


def split_digest(questions: Sequence[Question]) -> str:
    """The split's digest: sha256 of its records in order, as JSON (16 hex digits); equal splits, equal digests."""
    text = json.dumps([q.to_dict() for q in questions], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def log_splits(
    splits: Mapping[str, Sequence[Question]], *, source: str, seed: int, sha256: str | None
) -> None:
    """Record the splits in the active MLflow run.

    Logs one dataset input `truthfulqa-<split>` (context `<split>`) per split: a Hugging Face dataset whose
    source is `source` as ``datasets.load_dataset`` reads it and whose digest is `split_digest`; the metrics
    `n_pool`, `n_train`, `n_val`, `n_test`, `n_categories`, and the artifact SPLITS_ARTIFACT
    with source, sha256, seed, sizes, ids per split and every question record.

    Args:
        splits: questions per split, keys exactly SPLIT_NAMES (as from split_questions).
        source: where the questions came from (a file, a folder or a Hugging Face dataset id).
        seed: the seed given to split_questions.
        sha256: sha256 of the source (`core.data.source_sha256`), or None when unknown.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("log_splits needs an active MLflow run: call it inside `with mlflow.start_run():`")
    if sorted(splits) != sorted(SPLIT_NAMES):
        raise ValueError(f"splits must have exactly the keys {list(SPLIT_NAMES)}, got {list(splits)}")
    payload = _splits_payload(splits, source, seed, sha256)
    _splits_from_payload(json.loads(json.dumps(payload)), "splits to log")  # never write what cannot be read
    dataset_source = mlflow_source(source)
    for split in SPLIT_NAMES:
        dataset = from_huggingface(split_dataset(splits[split]), source=dataset_source,
                                   name=f"truthfulqa-{split}", digest=split_digest(splits[split]))
        mlflow.log_input(dataset, context=split)
    categories = {q.category for qs in splits.values() for q in qs}
    mlflow.log_metrics({**{f"n_{split}": float(len(splits[split])) for split in SPLIT_NAMES},
                        "n_categories": float(len(categories))})
    mlflow.log_dict(payload, SPLITS_ARTIFACT)


def run(cfg: Config) -> dict[str, list[Question]]:
    """The ``data`` stage: load, split and record the splits in the active MLflow run."""
    questions = load_questions(cfg.data.source)
    splits = split_questions(questions, cfg.data.sizes, cfg.data.seed)
    sha = source_sha256(cfg.data.source)
    log_splits(splits, source=str(cfg.data.source), seed=cfg.data.seed, sha256=sha)
    mlflow.log_metric("n_questions", float(len(questions)))
    if sha:
        mlflow.set_tag("truthsteer.data_sha256", sha)
    for split, items in splits.items():
        print(f"{split:>5}: {len(items)} questions")
    return splits


__all__ = ['log_splits', 'run', 'split_dataset', 'split_digest']
