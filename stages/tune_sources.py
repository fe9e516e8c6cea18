"""What every trial of a study steers with, by the stage that makes a tunable method's source: one all-layer
CAA extraction (``extract``, ``stages.tune_scoring.shared_extraction``) or one ranking of every attention
head (``iti``, ``stages.tune_iti.shared_heads``), each read from a run of that stage or from tune's cache.

A new tunable method whose source another stage makes registers that stage's ``SharedSource`` here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core import artifacts
from core.config import Config
from core.data import Question
from core.models import LoadedModel
from stages.tune_iti import heads_cache_path, heads_key, shared_heads
from stages.tune_scoring import extraction_cache_dir, extraction_key, shared_extraction
from steering.scale import LayerVectors


@dataclasses.dataclass(frozen=True)
class Shared:
    """One study's shared source.

    Args:
        value: what ``Tunable.steer`` takes (CAA's ``LayerVectors``, ITI's ranked heads).
        question_ids: the questions it was made from (none may be a val question).
        source: ``run:<id>``, ``cache`` (read) or ``computed`` (written now).
        what: a description, e.g. ``96 pairs, 30 layers``.
    """

    value: Any
    question_ids: list[str]
    source: str
    what: str


def _extraction(cfg: Config, pool: Sequence[Question], loaded: LoadedModel, source_run: str) -> Shared:
    extraction, source = shared_extraction(cfg, pool, loaded, extract_run=source_run)
    vectors = LayerVectors(extraction.vectors, extraction.resid_norm, f"the extraction ({source})")
    return Shared(vectors, list(extraction.question_ids), source,
                  f"{extraction.n_examples} pairs, {extraction.n_layers} layers")


def _heads(cfg: Config, pool: Sequence[Question], loaded: LoadedModel, source_run: str) -> Shared:
    heads, ids, source = shared_heads(cfg, pool, loaded, source_run=source_run)
    return Shared(heads, ids, source, f"{heads.layers.shape[0]} heads ranked")


@dataclasses.dataclass(frozen=True)
class SharedSource:
    """How tune gets one stage's source.

    Args:
        read: ``(cfg, pool, model, source run or "") -> Shared``; the cache is used (and filled) without a run.
        cache: ``cfg -> path`` of the cache file, for the dry run.
        key: ``cfg -> key`` of the cache, which a study's setup records.
    """

    read: Callable[[Config, Sequence[Question], LoadedModel, str], Shared]
    cache: Callable[[Config], Path]
    key: Callable[[Config], str]


SOURCES = {  # by the stage whose runs hold the source (``Method.stage``)
    "extract": SharedSource(_extraction, lambda cfg: extraction_cache_dir(cfg) / artifacts.CAA_TENSORS, extraction_key),
    "iti": SharedSource(_heads, heads_cache_path, heads_key),
}


def shared_source(stage: str) -> SharedSource:
    """The ``SharedSource`` of runs of ``stage``."""
    if stage not in SOURCES:
        raise ValueError(f"no tune source is registered for stage {stage!r}; add one to stages.tune_sources.SOURCES")
    return SOURCES[stage]


__all__ = ["SOURCES", "Shared", "SharedSource", "shared_source"]
