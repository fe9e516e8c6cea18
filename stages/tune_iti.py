"""The tune stage's shared source (``shared_source``: CAA's all-layer extraction, or ITI's ranked heads) and,
for ``method=iti``, every attention head ranked best first (``ItiDirections``), from an iti stage run or the
on-disk cache ``$TRUTHSTEER_OUTPUTS/tune/iti/<model>-<key>.safetensors``.

Each trial steers the first ``k`` of the ranked heads (``steering.methods.iti.top_heads``) shifted by ``alpha``,
so the ranking is computed once per cache key (the model, the data and iti sections, the data's sha256), as
the iti stage computes it: ``stages.iti.head_activations`` on the pool's contrastive pairs, then
``steering.iti.select_heads`` over every head.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core import artifacts
from core.config import Config, ConfigError
from core.config_io import config_to_dict
from core.data import Question, file_sha256, is_local_source
from core.models import LoadedModel
from core.tracking import download
from stages.tune_scoring import _file_lock, shared_extraction
from stages.tune_storage import outputs_root
from steering.iti import ItiDirections

ITI_CACHE_VERSION = 1


def heads_key(cfg: Config) -> str:
    """What decides a cached head ranking: the model and data sections, the iti section but for ``k`` and
    ``alpha`` (which only steer) and (for a local file) the data's sha256; 16 hex digits.

    Args:
        cfg: the run's config.
    """
    full = config_to_dict(cfg)
    ranking = {key: value for key, value in full["iti"].items() if key not in ("k", "alpha")}  # steering only
    fields = {"version": ITI_CACHE_VERSION, "model": full["model"], "data": full["data"], "iti": ranking,
              "data_sha256": file_sha256(cfg.data.source) if is_local_source(cfg.data.source) else ""}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def heads_cache_path(cfg: Config) -> Path:
    """``$TRUTHSTEER_OUTPUTS/tune/iti/<model>-<heads key>.safetensors`` (its question ids beside it, ``.json``).

    Args:
        cfg: the run's config.
    """
    return outputs_root() / "tune" / "iti" / f"{cfg.model.alias}-{heads_key(cfg)}.safetensors"


def rank_heads(cfg: Config, pool: Sequence[Question], loaded: LoadedModel) -> tuple[ItiDirections, list[str]]:
    """Every head of ``loaded`` ranked best first, as the iti stage ranks them, and the pool questions used.

    Args:
        cfg: the run's config (``iti`` section, ``data.seed``).
        pool: the pool split's questions.
        loaded: the model.
    """
    from stages.iti import head_activations
    from steering.extract import contrastive_pairs
    from steering.iti import select_heads
    from steering.layers import n_layers

    pairs = contrastive_pairs(list(pool), cfg.iti.pairs_per_question, cfg.iti.seed)
    if not pairs:
        raise ConfigError("the pool split gives no (correct, incorrect) pair to rank the ITI heads on; "
                          "set data.pool > 0 (e.g. --overrides data.pool=40)")
    acts, labels = head_activations(loaded, pairs, cfg.iti.batch_size, cfg.iti.max_length)
    layers = n_layers(loaded.model)
    ranked = select_heads(acts, labels, k=layers * acts.shape[2], layers=list(range(layers)), seed=cfg.iti.seed,
                          val_fraction=cfg.iti.val_fraction)
    return ranked, list(dict.fromkeys(p.question.id for p in pairs))


def shared_heads(cfg: Config, pool: Sequence[Question], loaded: LoadedModel, *,
                 source_run: str = "") -> tuple[ItiDirections, list[str], str]:
    """The ranked heads every trial steers with, the questions they were ranked on, and their source.

    From the iti run ``source_run`` when given; else from the cache file (``heads_cache_path``),
    computed there from the pool split when missing. Workers on one machine compute it once: the
    first takes a file lock and the others wait for it, then read.

    Args:
        cfg: the run's config (model, data, iti sections).
        pool: the pool split's questions.
        loaded: the model.
        source_run: an iti stage run id.

    Returns:
        The heads, the question ids and the source: ``run:<id>``, ``cache`` (read) or ``computed`` (written now).
    """
    if source_run:
        meta = json.loads(download(source_run, artifacts.ITI_META).read_text())
        if meta.get("model") != cfg.model.alias:
            raise ConfigError(f"iti run {source_run} ranked the heads of {meta.get('model')!r}, not "
                              f"{cfg.model.alias!r}; pass an iti run of {cfg.model.alias} as --source-run")
        heads = ItiDirections.load(download(source_run, artifacts.ITI_HEADS))
        return heads, [str(q) for q in meta.get("question_ids", [])], f"run:{source_run}"
    path = heads_cache_path(cfg)
    meta_path = path.with_suffix(".json")
    with _file_lock(path.with_suffix(".lock")):
        if path.exists() and meta_path.exists():
            return ItiDirections.load(path), json.loads(meta_path.read_text())["question_ids"], "cache"
        ranked, ids = rank_heads(cfg, pool, loaded)
        meta_path.write_text(json.dumps({"model": cfg.model.alias, "heads_key": heads_key(cfg), "question_ids": ids}))
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        ranked.save(tmp)
        os.replace(tmp, path)  # last: a reader that sees the heads sees their question ids
        return ranked, ids, "computed"


def shared_source(cfg: Config, method: str, pool: Sequence[Question], loaded: LoadedModel, *,
                  source_run: str = "") -> tuple[Any, list[str], str, str]:
    """What every trial of a ``method`` study steers with: ``(n_layers, d_model)`` CAA vectors
    (``shared_extraction``) or the ranked ITI heads (``shared_heads``); the questions it was made from,
    its source (``run:<id>``, ``cache``, ``computed``) and a description.

    Args:
        cfg: the run's config.
        method: ``caa`` or ``iti``.
        pool: the pool split's questions.
        loaded: the model.
        source_run: an extract run (caa) or an iti run (iti); "" for the cache.
    """
    if method == "iti":
        heads, ids, source = shared_heads(cfg, pool, loaded, source_run=source_run)
        return heads, ids, source, f"{heads.layers.shape[0]} heads ranked"
    extraction, source = shared_extraction(cfg, pool, loaded, extract_run=source_run)
    return (extraction.vectors, list(extraction.question_ids), source,
            f"{extraction.n_examples} pairs, {extraction.n_layers} layers")


__all__ = ["ITI_CACHE_VERSION", "heads_cache_path", "heads_key", "rank_heads", "shared_heads", "shared_source"]
