"""The tune stage's shared source for ``method=iti``: every attention head ranked best first
(``ItiDirections``), from an iti stage run or the on-disk cache
``$TRUTHSTEER_OUTPUTS/tune/iti/<model>-<key>.safetensors``.

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

from core.config import Config
from core.config_io import config_to_dict
from core.data import Question, source_sha256
from core.models import LoadedModel
from core.stores import file_lock as _file_lock
from stages.iti import rank_heads
from stages.tune_storage import outputs_root
from steering.iti import ItiDirections
from steering.methods.iti import read_ranked

ITI_CACHE_VERSION = 2  # 2: the probes hold out whole questions


def heads_key(cfg: Config) -> str:
    """What decides a cached head ranking: the model and data sections, the iti section but for ``k`` and
    ``alpha`` (which only steer) and (for a local file) the data's sha256; 16 hex digits.

    Args:
        cfg: the run's config.
    """
    full = config_to_dict(cfg)
    ranking = {key: value for key, value in full["iti"].items() if key not in ("k", "alpha")}  # steering only
    fields = {"version": ITI_CACHE_VERSION, "model": full["model"], "data": full["data"], "iti": ranking,
              "data_sha256": source_sha256(cfg.data.source) or ""}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def heads_cache_path(cfg: Config) -> Path:
    """``$TRUTHSTEER_OUTPUTS/tune/iti/<model>-<heads key>.safetensors`` (its question ids beside it, ``.json``).

    Args:
        cfg: the run's config.
    """
    return outputs_root() / "tune" / "iti" / f"{cfg.model.alias}-{heads_key(cfg)}.safetensors"


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
        heads, meta = read_ranked(source_run, cfg.model.alias)
        return heads, [str(q) for q in meta.get("question_ids", [])], f"run:{source_run}"
    path = heads_cache_path(cfg)
    meta_path = path.with_suffix(".json")
    with _file_lock(path.with_suffix(".lock")):
        if path.exists() and meta_path.exists():
            return ItiDirections.load(path), json.loads(meta_path.read_text())["question_ids"], "cache"
        ranked, pairs, _ = rank_heads(cfg, list(pool), loaded)
        ids = list(dict.fromkeys(p.question.id for p in pairs))
        meta_path.write_text(json.dumps({"model": cfg.model.alias, "heads_key": heads_key(cfg), "question_ids": ids}))
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        ranked.save(tmp)
        os.replace(tmp, path)  # last: a reader that sees the heads sees their question ids
        return ranked, ids, "computed"


__all__ = ["ITI_CACHE_VERSION", "heads_cache_path", "heads_key", "shared_heads"]
