"""The evaluate stage's tables on its parent run: the generations table (MLflow table, JSONL, CSV), the
per-category table and the summary (markdown, CSV)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from core import artifacts
from evaluation.variant_metrics import flat_frame


def log_tables(rows: Sequence[Mapping[str, Any]], categories: pd.DataFrame, summary: pd.DataFrame,
               markdown: str) -> None:
    """Log the generations table (MLflow table, JSONL, CSV), the per-category table and the summary
    (markdown, CSV) to the active run.

    Args:
        rows: every variant's judged rows.
        categories: ``category_table`` of every variant.
        summary: ``summary_frame`` output.
        markdown: ``summary_markdown`` output.
    """
    flat = flat_frame(rows)
    mlflow.log_table(data=flat, artifact_file=artifacts.GENERATIONS_TABLE)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = {
            artifacts.GENERATIONS: "".join(json.dumps(dict(r), ensure_ascii=False, default=str) + "\n" for r in rows),
            artifacts.GENERATIONS_CSV: flat.to_csv(index=False),
            artifacts.PER_CATEGORY: categories.to_csv(index=False),
            artifacts.SUMMARY_CSV: summary.to_csv(index=False),
            artifacts.SUMMARY_MD: markdown,
        }
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text, encoding="utf-8")
        mlflow.log_artifacts(tmp)


__all__ = ['log_tables']
