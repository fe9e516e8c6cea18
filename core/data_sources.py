"""Where TruthfulQA comes from, read through Hugging Face `datasets` and described as MLflow dataset sources.

A source is one of:
- a local ``.csv`` (TruthfulQA's own columns) or ``.parquet`` (the hub's ``generation`` columns) file,
  read with pandas (its malformed-file errors are precise) and wrapped as a ``datasets.Dataset``;
- a local folder holding a copy of the hub dataset (``git clone https://huggingface.co/datasets/truthfulqa/truthful_qa``),
  or a hub id, both read by ``datasets.load_dataset(source, "generation", split="validation")``; a hub id is
  read from the local ``datasets`` cache when ``HF_HUB_OFFLINE`` is set.

`mlflow_source` names the same source as a `HuggingFaceDatasetSource`, so that a logged split says exactly what
was read and ``source.load()`` reads it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    import datasets

HF_DATASET_ID = "truthfulqa/truthful_qa"
HF_CONFIG = "generation"
HF_SPLIT = "validation"
EXAMPLE_LOCAL_SOURCE = "../shared/data/truthfulqa/TruthfulQA.csv"
SUFFIXES = (".csv", ".parquet")
SKIPPED_FOLDERS = (".git", ".cache", ".huggingface")


class DataError(ValueError):
    """The questions or a splits file are missing, malformed or inconsistent."""


def is_local_source(source: str | Path) -> bool:
    """True for an existing file or folder, or anything that looks like a path (a suffix or a path
    separator beyond the one in `owner/name`); False for a Hugging Face dataset id."""
    text = str(source)
    return (isinstance(source, Path) or Path(text).expanduser().exists() or bool(Path(text).suffix)
            or text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_sha256(source: str | Path) -> str | None:
    """sha256 of a local file; of each file's relative path and sha256 for a folder (its `.git` and caches
    left out); None for a hub id, whose content the hub's revision names instead."""
    if not is_local_source(source):
        return None
    path = Path(source).expanduser()
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if not set(relative.parts) & set(SKIPPED_FOLDERS):
            digest.update(f"{relative.as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def load_dataset(source: str | Path) -> datasets.Dataset:
    """The TruthfulQA rows of `source` (see the module docstring) as a ``datasets.Dataset``, unvalidated.

    Raises:
        DataError: a missing file, an unsupported suffix, an unreadable file, a folder or hub id without
            the ``generation`` configuration, or an unreachable hub.
    """
    import datasets

    if not is_local_source(source):
        return _load_hub_format(str(source), f"Hugging Face dataset {str(source)!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_hub_format(str(path), f"dataset folder {str(source)!r}")
    if not path.is_file():
        raise DataError(f"data file {str(source)!r} does not exist or is not a file (resolved to "
                        f"{path.resolve()}); pass an existing .csv or .parquet file, a copy of the hub dataset's "
                        f"folder or a Hugging Face dataset id, e.g. {EXAMPLE_LOCAL_SOURCE}")
    return datasets.Dataset.from_pandas(read_file(path), preserve_index=False)


def mlflow_source(source: str | Path) -> Any:
    """`source` as MLflow's `HuggingFaceDatasetSource`: the ``load_dataset`` arguments that read it again
    (``csv``/``parquet`` with the absolute file and split ``train`` for a file; the folder or id with its
    config and split)."""
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    path = Path(source).expanduser()
    if is_local_source(source) and not path.is_dir():
        # `load_dataset("csv", data_files=...)` names its one split "train".
        return HuggingFaceDatasetSource(path=path.suffix.lower().lstrip("."), data_files=str(path.resolve()),
                                        split="train")
    where = str(path.resolve()) if is_local_source(source) else str(source)
    return HuggingFaceDatasetSource(path=where, config_name=HF_CONFIG, split=HF_SPLIT)


def read_file(path: Path) -> pd.DataFrame:
    """A local CSV or Parquet file as a frame of its cells (CSV cells as text, nothing read as NaN)."""
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"unsupported file type {path.suffix!r} for {str(path)!r}; "
                        f"expected one of {', '.join(SUFFIXES)} or a folder holding the hub dataset")
    if path.stat().st_size == 0:
        raise DataError(f"data file {str(path)!r} is empty (0 bytes)")
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        # header=None: with a header row, pandas silently turns the extra fields of a too-long
        # first data row into an index and shifts every column; as data it raises instead.
        cells = pd.read_csv(path, dtype=str, keep_default_na=False, header=None)
        return cells.iloc[1:].set_axis(list(cells.iloc[0]), axis=1)
    except pd.errors.EmptyDataError as err:
        raise DataError(f"data file {str(path)!r} is empty (no header row)") from err
    except Exception as err:  # pandas/pyarrow raise many unrelated types for a bad file
        kind = path.suffix[1:].upper()
        raise DataError(f"cannot read {str(path)!r} as {kind}: {type(err).__name__}: {err}") from err


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def _hub_mode(offline: bool) -> Iterator[None]:
    """`datasets` reads HF_HUB_OFFLINE once at import; follow the variable as it is now, so that a cached copy
    is still read offline and an uncached one fails at once instead of retrying the network."""
    import datasets

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _load_hub_format(where: str, name: str) -> datasets.Dataset:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    offline = _offline()
    fix = f"pass a local TruthfulQA file instead, e.g. -P data={EXAMPLE_LOCAL_SOURCE}"
    try:
        with _hub_mode(offline):
            loaded = datasets.load_dataset(where, HF_CONFIG, split=HF_SPLIT)
    except DatasetNotFoundError as err:
        raise DataError(f"{name} was not found ({err}); use {HF_DATASET_ID!r}, a copy of its folder or a local "
                        f"file, e.g. -P data={EXAMPLE_LOCAL_SOURCE}") from err
    except ConnectionError as err:
        why = "HF_HUB_OFFLINE is set and the dataset is not in the local cache" if offline else str(err)
        raise DataError(f"the Hugging Face hub is unreachable, cannot download {where!r} ({why}); {fix}") from err
    except (ValueError, OSError) as err:  # no `generation` config or split, unreadable files
        raise DataError(f"{name} has no readable {HF_CONFIG!r} configuration with a {HF_SPLIT!r} split "
                        f"({type(err).__name__}: {err}); {fix}") from err
    assert isinstance(loaded, datasets.Dataset)
    return loaded


__all__ = ['DataError', 'file_sha256', 'is_local_source', 'load_dataset', 'mlflow_source', 'read_file',
           'source_sha256']
