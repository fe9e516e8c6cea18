"""TruthfulQA questions: loading, validation, seeded stratified splits, and reading them back from a data run.

`load_questions` reads TruthfulQA through Hugging Face `datasets` (``core.data_sources``: the CSV, a
parquet file in the hub's `generation` format, a copy of the hub dataset's folder, or the hub itself) and
validates it. `split_questions` deals the questions into
the `pool`, `train`, `val` and `test` splits, and `stages.data.log_splits` records them in the active
MLflow run: one dataset input per split, the split sizes as metrics, and the artifact
`SPLITS_ARTIFACT` holding every question, which `load_splits_from_run` reads back.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from core import artifacts
from core.config import Config, ConfigError
from core.data_sources import (
    EXAMPLE_LOCAL_SOURCE,
    HF_CONFIG,
    HF_DATASET_ID,
    HF_SPLIT,
    DataError,
    file_sha256,
    is_local_source,
    load_dataset,
    source_sha256,
)

SPLITS_ARTIFACT = artifacts.SPLITS
SPLIT_NAMES = ("pool", "train", "val", "test")
REQUIRED_COLUMNS = ("type", "category", "question", "best_answer", "correct_answers", "incorrect_answers")


@dataclass(frozen=True)
class Question:
    """One TruthfulQA question with its reference answers; `id` is derived from the text."""

    id: str
    question: str
    category: str
    type: str
    best_answer: str
    correct_answers: tuple[str, ...]
    incorrect_answers: tuple[str, ...]
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["correct_answers"] = list(self.correct_answers)
        record["incorrect_answers"] = list(self.incorrect_answers)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Question:
        """Rebuild a question from `to_dict` output; raises DataError on missing keys or a wrong id."""
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in record]
        if missing:
            raise DataError(f"question record lacks keys {missing}; expected {names}, got {sorted(record)}")
        values = {name: record[name] for name in names}
        values["correct_answers"] = tuple(values["correct_answers"])
        values["incorrect_answers"] = tuple(values["incorrect_answers"])
        q = cls(**values)
        if q.id != question_id(q.question):
            raise DataError(f"question id {q.id!r} does not match its text {q.question!r} "
                            f"(expected {question_id(q.question)!r})")
        return q


def question_id(text: str) -> str:
    """Stable id of a question: 'q' + the first 10 hex digits of sha1 of its stripped text."""
    return "q" + hashlib.sha1(text.strip().encode("utf-8")).hexdigest()[:10]


def load_questions(source: str | Path = HF_DATASET_ID) -> list[Question]:
    """Load and validate TruthfulQA questions, in file order.

    Args:
        source: a local `.csv` (TruthfulQA columns) or `.parquet` (Hugging Face `generation`
            columns) file, a folder holding a copy of the hub dataset, or a Hugging Face dataset id
            whose `generation` configuration's `validation` split is loaded. Column names are matched
            ignoring case, spaces and underscores.

    Raises:
        DataError: missing file, unreachable hub, unsupported suffix, unreadable file, missing
            columns, no rows, a row without question or answers, or duplicate questions.
    """
    return _questions_from_frame(load_dataset(source).to_pandas(), _source_name(source))


def _source_name(source: str | Path) -> str:
    return str(Path(source).expanduser()) if is_local_source(source) else f"hub dataset {str(source)!r}"


def _normalise_column(name: object) -> str:
    return re.sub(r"[\s_]+", "_", str(name).strip().lower())


def _text(value: object) -> str:
    return "" if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)) else str(value).strip()


def _answers(value: object) -> tuple[str, ...]:
    """A '; '-separated string (some CSV cells end in ';') or a list/array of answers, stripped,
    without empties or repeats (two CSV rows list an answer twice)."""
    if isinstance(value, str):
        items: list[object] = list(value.split(";"))
    elif isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
    else:
        items = [] if _text(value) == "" else [value]
    return tuple(dict.fromkeys(a for a in map(_text, items) if a))


def _questions_from_frame(frame: pd.DataFrame, name: str) -> list[Question]:
    columns = [_normalise_column(c) for c in frame.columns]
    found = [str(c) for c in frame.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{name}: missing columns {missing}; expected {list(REQUIRED_COLUMNS)} "
                        f"(+ optional 'source', any case, spaces or underscores), found {found}")
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise DataError(f"{name}: columns {repeated} repeat once case, spaces and underscores are "
                        f"ignored; found {found}")
    if frame.empty:
        raise DataError(f"{name} has no rows")
    frame = frame.set_axis(columns, axis=1)
    questions: list[Question] = []
    rows_by_text: dict[str, list[int]] = {}
    for row, record in enumerate(frame.to_dict("records"), start=1):
        text, best = _text(record["question"]), _text(record["best_answer"])
        correct, incorrect = _answers(record["correct_answers"]), _answers(record["incorrect_answers"])
        problems = [what for what, bad in [("an empty question", not text), ("no best answer", not best),
                                            ("no correct answers", not correct),
                                            ("no incorrect answers", not incorrect)] if bad]
        if problems:
            raise DataError(f"{name}: data row {row} (1-based, header excluded) has "
                            f"{' and '.join(problems)}: question={text!r}")
        rows_by_text.setdefault(text, []).append(row)
        questions.append(Question(
            id=question_id(text), question=text, category=_text(record["category"]),
            type=_text(record["type"]), best_answer=best,
            correct_answers=correct if best in correct else (best, *correct),
            incorrect_answers=incorrect, source=_text(record.get("source")),
        ))
    duplicates = {text: rows for text, rows in rows_by_text.items() if len(rows) > 1}
    if duplicates:
        listed = "; ".join(f"{text!r} in data rows {rows}" for text, rows in duplicates.items())
        raise DataError(f"{name}: duplicate questions: {listed}")
    return questions


def check_sizes(sizes: Mapping[str, int], n_available: int) -> dict[str, int]:
    """Validate split sizes and return them in SPLIT_NAMES order.

    Args:
        sizes: a count per split; keys exactly SPLIT_NAMES, values non-negative ints.
        n_available: number of questions to split.

    Raises:
        ValueError: unknown or missing split names, a bad count, or a total above n_available.
    """
    unknown = [k for k in sizes if k not in SPLIT_NAMES]
    if unknown:
        raise ValueError(f"unknown split {unknown[0]!r}; valid splits: {', '.join(SPLIT_NAMES)}")
    missing = [k for k in SPLIT_NAMES if k not in sizes]
    if missing:
        raise ValueError(f"split sizes lack {missing}; give a size for each of {', '.join(SPLIT_NAMES)}")
    for split in SPLIT_NAMES:
        value = sizes[split]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"sizes[{split!r}]={value!r} must be a non-negative int")
    total = sum(int(sizes[s]) for s in SPLIT_NAMES)
    if total > n_available:
        given = ", ".join(f"data.{s}={int(sizes[s])}" for s in SPLIT_NAMES)
        largest = max(SPLIT_NAMES, key=lambda s: int(sizes[s]))
        room = n_available - (total - int(sizes[largest]))
        raise ConfigError(f"split sizes {given} total {total}, but the data holds {n_available} questions; lower "
                          f"them (e.g. data.{largest}={max(room, 0)}) or use --split smoke / full")
    return {s: int(sizes[s]) for s in SPLIT_NAMES}


def split_questions(
    questions: Sequence[Question], sizes: Mapping[str, int], seed: int
) -> dict[str, list[Question]]:
    """Deal questions into disjoint splits whose category mix matches the whole.

    Questions are sorted by id (so input order does not matter), shuffled within each category,
    and ordered by systematic position (rank_in_category + random_offset) / category_size with a
    random tie-break; the splits are then consecutive chunks in SPLIT_NAMES order, so every
    chunk samples each category evenly. Questions beyond the total size are left out.

    Args:
        questions: distinct questions (unique ids).
        sizes: number of questions per split, keys exactly SPLIT_NAMES (see SPLIT_PRESETS).
        seed: non-negative int seeding numpy's default_rng.
    """
    counts = check_sizes(sizes, len(questions))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    by_category: dict[str, list[Question]] = {}
    for q in sorted(questions, key=lambda q: q.id):
        by_category.setdefault(q.category, []).append(q)
    if len({q.id for q in questions}) != len(questions):
        raise DataError("split_questions needs distinct questions; some ids repeat")
    rng = np.random.default_rng(seed)
    keyed: list[tuple[float, float, Question]] = []
    for category in sorted(by_category):
        members = by_category[category]
        order, offset, ties = rng.permutation(len(members)), rng.random(), rng.random(len(members))
        keyed += [((rank + offset) / len(members), float(ties[rank]), members[i])
                  for rank, i in enumerate(order)]
    keyed.sort(key=lambda item: item[:2])
    splits, start = {}, 0
    for split in SPLIT_NAMES:
        splits[split] = [q for _, _, q in keyed[start:start + counts[split]]]
        start += counts[split]
    return splits


def split_ids(splits: Mapping[str, Sequence[Question]]) -> dict[str, list[str]]:
    """Question ids per split, in split order."""
    return {split: [q.id for q in qs] for split, qs in splits.items()}


def _splits_payload(splits: Mapping[str, Sequence[Question]], source: str, seed: int,
                    sha256: str | None) -> dict[str, Any]:
    return {
        "source": str(source), "sha256": sha256, "seed": int(seed),
        "sizes": {split: len(splits[split]) for split in SPLIT_NAMES},
        "ids": {split: [q.id for q in splits[split]] for split in SPLIT_NAMES},
        "questions": [q.to_dict() for split in SPLIT_NAMES for q in splits[split]],
    }


def _splits_from_payload(payload: object, name: str) -> dict[str, list[Question]]:
    keys = ("source", "sha256", "seed", "sizes", "ids", "questions")
    if not isinstance(payload, dict) or any(k not in payload for k in keys):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise DataError(f"{name}: expected a JSON object with keys {list(keys)}, found {found}")
    ids, sizes = payload["ids"], payload["sizes"]
    if not isinstance(ids, dict) or sorted(ids) != sorted(SPLIT_NAMES):
        raise DataError(f"{name}: 'ids' must map exactly {list(SPLIT_NAMES)}, found {ids!r:.200}")
    by_id = {}
    for record in payload["questions"]:
        q = Question.from_dict(record)
        by_id[q.id] = q
    seen: dict[str, str] = {}
    for split in SPLIT_NAMES:
        if sizes.get(split) != len(ids[split]):
            raise DataError(f"{name}: split {split!r} lists {len(ids[split])} ids "
                            f"but sizes says {sizes.get(split)}")
        for qid in ids[split]:
            if qid not in by_id:
                raise DataError(f"{name}: split {split!r} names id {qid!r} that has no question record")
            if qid in seen:
                raise DataError(f"{name}: id {qid!r} is in both {seen[qid]!r} and {split!r}")
            seen[qid] = split
    return {split: [by_id[qid] for qid in ids[split]] for split in SPLIT_NAMES}


def read_splits(path: str | Path) -> dict[str, list[Question]]:
    """Read and validate a splits file written by stages.data.log_splits.

    Args:
        path: a local copy of SPLITS_ARTIFACT.
    """
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read splits file {str(path)!r}: {err}") from err
    return _splits_from_payload(payload, str(path))


def load_splits_from_run(run_id: str, tracking_uri: str | None = None) -> dict[str, list[Question]]:
    """Download SPLITS_ARTIFACT from an MLflow run and read it.

    Args:
        run_id: the run that called stages.data.log_splits.
        tracking_uri: tracking server or store; the current one when None.
    """
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=SPLITS_ARTIFACT,
                                                        dst_path=tmp, tracking_uri=tracking_uri)
        except (MlflowException, OSError) as err:
            raise DataError(f"run {run_id!r} has no readable {SPLITS_ARTIFACT!r} artifact: {err}") from err
        return read_splits(local)


def splits_for(cfg: Config, data_run: str = "") -> dict[str, list[Question]]:
    """The splits a stage works on: a data run's exactly, or recomputed from ``cfg.data``.

    Args:
        cfg: the run's config (``data.source``, ``data.sizes``, ``data.seed``).
        data_run: an MLflow run id of the ``data`` stage; its ``data/splits.json`` wins over cfg.
    """
    if data_run:
        return load_splits_from_run(data_run)
    questions = load_questions(cfg.data.source)
    return split_questions(questions, cfg.data.sizes, cfg.data.seed)




__all__ = ['EXAMPLE_LOCAL_SOURCE', 'HF_CONFIG', 'HF_DATASET_ID', 'HF_SPLIT', 'REQUIRED_COLUMNS', 'SPLITS_ARTIFACT',
           'SPLIT_NAMES', 'DataError', 'Question', 'check_sizes', 'file_sha256', 'is_local_source', 'load_questions',
           'load_splits_from_run', 'question_id', 'read_splits', 'source_sha256', 'split_ids', 'split_questions',
           'splits_for']
