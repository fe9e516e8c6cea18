"""The extract stage: contrastive pairs of the pool questions -> per-layer CAA vectors, logged to MLflow.

``run`` extracts (``steering.extract.extract_caa``), checks the activations are finite and logs
``extract/caa.safetensors`` with its sidecar, the per-layer norms and the provenance; ``load_extraction``
reads them back from a run or a folder; ``plan`` says what a run would do without loading weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric

from core import artifacts, tracking
from core.config import Config, ConfigError
from core.config_io import config_to_dict
from core.data import splits_for
from core.models import LoadedModel, describe_source, load_from_config
from steering.extract import (
    Extraction,
    NonFiniteActivations,
    contrastive_pairs,
    extract_caa,
)
from steering.layers import d_model, n_layers
from steering.scale import RESID_NORM_KEY
from steering.vectors import VECTORS_KEY, SteeringVectors


def config_hash(cfg: Config) -> str:
    """sha256 of the resolved config (canonical JSON), the config's identity in provenance."""
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()


def plan(cfg: Config, data_run: str = "") -> list[str]:
    """What ``run`` would do, for a dry run: no weights are loaded.

    Args:
        cfg: the resolved config.
        data_run: a data stage run whose splits to use.
    """
    source = describe_source(cfg.model, cfg.runtime.cache_dir)
    pool = splits_for(cfg, data_run)["pool"]
    pairs = contrastive_pairs(pool, cfg.extract.pairs_per_question, cfg.data.seed)
    n_batches = math.ceil(len(pairs) / cfg.extract.batch_size)
    return [
        f"model: {cfg.model.alias} from {source}, dtype {cfg.extract_dtype}",
        f"layers: {cfg.model.n_layers} (all recorded), d_model {cfg.model.d_model}",
        f"pool: {len(pool)} questions{f' from data run {data_run}' if data_run else ''} -> {len(pairs)} pairs "
        f"({cfg.extract.pairs_per_question} per question at most)",
        f"batches: {n_batches} of up to {cfg.extract.batch_size} pairs ({2 * cfg.extract.batch_size} sequences "
        f"per forward), max_length {cfg.extract.max_length}",
        f"nan_threshold: {cfg.extract.nan_threshold}",
        f"artifacts: {artifacts.CAA_TENSORS}, {artifacts.CAA_META}",
    ]


def _log_metrics(extraction: Extraction) -> None:
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("extract.run needs an active MLflow run: call it inside tracking.stage_run")
    vectors = extraction.vectors  # (n_layers, d_model)
    norms = vectors.norm(dim=-1).tolist()
    rates = extraction.nan_rate.tolist()
    now = int(time.time() * 1000)
    by_layer = [Metric("nan_rate_by_layer", rates[layer], now, layer) for layer in range(extraction.n_layers)]
    # A layer without valid examples (only when NonFiniteActivations is raised) has no norm: left out.
    by_layer += [Metric("norm_by_layer", norms[layer], now, layer) for layer in range(extraction.n_layers)
                 if math.isfinite(norms[layer])]
    if extraction.resid_norm is not None:  # the residual stream's size, which a relative scale is a fraction of
        by_layer += [Metric("resid_norm_by_layer", value, now, layer)
                     for layer, value in enumerate(extraction.resid_norm.tolist()) if math.isfinite(value)]
    summary = {"nan_rate": extraction.nan_rate_overall, "nan_rate_max": max(rates),
               "n_examples": float(extraction.n_examples), "n_pairs": float(extraction.n_examples),
               "n_questions": float(len(set(extraction.question_ids)))}
    by_layer += [Metric(key, value, now, 0) for key, value in summary.items()]
    client = mlflow.MlflowClient()
    for start in range(0, len(by_layer), 1000):  # MLflow's batch limit
        client.log_batch(run.info.run_id, metrics=by_layer[start:start + 1000])


def norm_meta(extraction: Extraction) -> dict[str, Any]:
    """``{"norms": [...], "resid_norm_by_layer": [...]}``: each layer's vector norm and mean residual norm (left out
    when unmeasured), which a relative scale resolves from (``steering.scale.scales_from_meta``)."""
    norm = extraction.resid_norm
    return {"norms": extraction.vectors.norm(dim=-1).tolist(), **({} if norm is None else {RESID_NORM_KEY: norm.tolist()})}


def _log_artifacts(extraction: Extraction, vectors: SteeringVectors, cfg: Config, loaded: LoadedModel) -> None:
    meta = {
        **vectors.to_meta(),
        "n_layers": extraction.n_layers,
        **norm_meta(extraction),
        "n_examples": extraction.n_examples,
        "n_valid_by_layer": extraction.n_valid.tolist(),
        "nan_count_by_layer": extraction.nan_count.tolist(),
        "nan_rate_by_layer": extraction.nan_rate.tolist(),
        "question_ids": list(extraction.question_ids),
        "dtype": cfg.extract_dtype,
        "max_length": cfg.extract.max_length,
        "prompt_format": loaded.prompt_format,
        "config": config_to_dict(cfg),
    }
    tensors = {
        VECTORS_KEY: extraction.vectors,  # (n_layers, d_model)
        "diffs": extraction.diffs,  # (n_examples, n_layers, d_model)
        "valid": extraction.valid.to(torch.uint8),  # (n_examples, n_layers)
        **({"resid_norms": extraction.resid_norms} if extraction.resid_norms is not None else {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        artifacts.save_tensors(Path(tmp) / artifacts.CAA_TENSORS, Path(tmp) / artifacts.CAA_META, tensors, meta)
        mlflow.log_artifacts(tmp)


def run(cfg: Config, data_run: str = "") -> SteeringVectors:
    """The ``extract`` stage: CAA vectors of every layer from the pool split, logged to the active run.

    Logs metrics ``nan_rate`` (all example-layer entries), ``nan_rate_max``, ``nan_rate_by_layer``
    and ``norm_by_layer`` and ``resid_norm_by_layer`` (the mean residual norm; step = layer), ``n_examples``, ``n_pairs``, ``n_questions``; params
    ``extract.prompt_format``, ``extract.device``, ``extract.pair_seed``, ``extract.data_run``; and the
    artifacts ``CAA_TENSORS`` (``vectors`` ``(n_layers, d_model)``, ``diffs``, ``valid`` as uint8) and
    ``CAA_META``. The metrics are logged also when ``NonFiniteActivations`` ends the run.

    Args:
        cfg: the resolved config (``extract`` section, ``data`` for the pool, ``model``, ``runtime``).
        data_run: an MLflow run id of the data stage whose splits to use; recomputed from cfg when empty.
    """
    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("extract.run needs an active MLflow run: call it inside tracking.stage_run")
    pool = splits_for(cfg, data_run)["pool"]
    pairs = contrastive_pairs(pool, cfg.extract.pairs_per_question, cfg.data.seed)
    loaded = load_from_config(cfg, dtype=cfg.extract_dtype)
    found = (n_layers(loaded.model), d_model(loaded.model))
    if found != (cfg.model.n_layers, cfg.model.d_model):
        raise ConfigError(
            f"model {cfg.model.alias!r} has {found[0]} layers and d_model {found[1]}, but its registry entry says "
            f"n_layers={cfg.model.n_layers}, d_model={cfg.model.d_model}; fix configs/models/{cfg.model.alias}.yaml"
        )
    tracking.log_params_once({"extract.prompt_format": loaded.prompt_format, "extract.device": str(loaded.device),
                              "extract.pair_seed": str(cfg.data.seed), "extract.data_run": data_run or "none"})
    try:
        extraction = extract_caa(loaded, pairs, batch_size=cfg.extract.batch_size,
                                 max_length=cfg.extract.max_length, nan_threshold=cfg.extract.nan_threshold)
    except NonFiniteActivations as err:
        _log_metrics(err.extraction)
        raise
    provenance = {"stage": "extract", "run_id": active.info.run_id, "config_sha256": config_hash(cfg),
                  "code_version": tracking.code_version(), "data_run": data_run, "dtype": cfg.extract_dtype,
                  "n_examples": extraction.n_examples}
    extraction = replace(extraction, provenance=provenance)
    vectors = extraction.steering_vectors()
    _log_metrics(extraction)
    _log_artifacts(extraction, vectors, cfg, loaded)
    return vectors


def load_extraction(run_id_or_dir: str | Path) -> Extraction:
    """Read the extract stage's artifacts back, for the bank stage.

    Args:
        run_id_or_dir: an MLflow run id of the extract stage (downloaded through ``tracking.download``),
            or a local directory holding ``CAA_TENSORS`` and ``CAA_META`` (an artifact root).
    """
    root = Path(run_id_or_dir)
    if root.is_dir():
        tensors_path, meta_path = root / artifacts.CAA_TENSORS, root / artifacts.CAA_META
    else:
        tensors_path = tracking.download(str(run_id_or_dir), artifacts.CAA_TENSORS)
        meta_path = tracking.download(str(run_id_or_dir), artifacts.CAA_META)
    tensors, meta = artifacts.load_tensors(tensors_path, meta_path)
    missing = [k for k in ("diffs", "valid") if k not in tensors] + [
        k for k in ("question_ids", "model") if k not in meta]
    if missing:
        raise ConfigError(f"{tensors_path} / {meta_path} lack {missing}; they are not an extract artifact, "
                          "pass the run id of an extract stage run")
    return Extraction(tensors["diffs"], tensors["valid"].bool(), tuple(meta["question_ids"]), str(meta["model"]),
                      dict(meta.get("provenance", {})), resid_norms=tensors.get("resid_norms"))


__all__ = ['config_hash', 'load_extraction', 'plan', 'norm_meta', 'run']
