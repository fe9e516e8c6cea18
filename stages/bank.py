"""The bank stage: an extract run's per-example differences -> a vector bank (the base CAA vector plus
bootstrap-resampled vectors, ``steering.vector_bank.build_bank``) with its stability figures, logged to MLflow."""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from torch import Tensor

from core.artifacts import (
    CAA_META,
    CAA_TENSORS,
    TAG_EXTRACT_RUN,
    TAG_MODEL,
    TAG_NOTES,
    TAG_STAGE,
    load_tensors,
)
from core.config import Config, ConfigError
from core.config_io import config_to_dict
from core.tracking import download, log_params_once, tracking_uri
from steering.vector_bank import (
    LAYER_METRICS,
    VectorBank,
    build_bank,
    stability,
)


def require_extract_run(extract_run: str) -> str:
    """The extract run id, or a ConfigError that says where to find one."""
    if not extract_run or not extract_run.strip():
        raise ConfigError("the bank stage needs the extract run to resample: pass --extract-run RUN_ID "
                          "(mlflow run: -P extract_run=RUN_ID), the id of a finished extract run from "
                          "`mlflow runs list --experiment-id ID` or the MLflow UI; or run the `full` entry "
                          "point, which chains extract and bank")
    return extract_run.strip()


def _read_extract_run(cfg: Config, extract_run: str) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``diffs``, ``valid`` and metadata of a finished extract run of ``cfg.model`` (checked through its tags)."""
    try:
        source = mlflow.MlflowClient().get_run(extract_run)
    except MlflowException:
        raise ConfigError(f"no run {extract_run!r} in the tracking store {tracking_uri(cfg)}; pass the id of a "
                          "finished extract run (`mlflow runs list --experiment-id ID` or the MLflow UI)") from None
    stage, status = source.data.tags.get(TAG_STAGE), source.info.status
    if stage not in (None, "extract"):
        raise ConfigError(f"run {extract_run} is a {stage!r} run, not an extract run; pass the id of an extract run")
    if status != RunStatus.to_string(RunStatus.FINISHED):
        raise ConfigError(f"extract run {extract_run} is {status}, not FINISHED; wait for it or re-run extract")
    run_model = source.data.tags.get(TAG_MODEL)
    if run_model not in (None, cfg.model.alias):
        raise ConfigError(f"extract run {extract_run} was made with model {run_model!r}, but this bank is for "
                          f"{cfg.model.alias!r}; pass --model {run_model} or an extract run of {cfg.model.alias}")
    tensors, meta = load_tensors(download(extract_run, CAA_TENSORS), download(extract_run, CAA_META))
    missing = [key for key in ("diffs", "valid") if key not in tensors]
    if missing:
        raise ConfigError(f"extract run {extract_run}: {CAA_TENSORS} lacks {', '.join(missing)} "
                          f"(it has {', '.join(sorted(tensors))}); re-run the extract stage")
    diffs, valid = tensors["diffs"], tensors["valid"]  # (n_examples, n_layers, d_model), (n_examples, n_layers)
    expected = (cfg.model.n_layers, cfg.model.d_model)
    if diffs.ndim != 3 or tuple(diffs.shape[1:]) != expected:
        raise ConfigError(f"extract run {extract_run}: diffs has shape {tuple(diffs.shape)}, but "
                          f"{cfg.model.alias} has (n_layers, d_model) = {expected}; pass the matching --model")
    return diffs, valid, meta


def _log_layer_metrics(figures: list[dict[str, float]]) -> None:
    """Per-layer figures as ``<name>_by_layer`` with ``step=layer``; undefined (NaN) ones are left out."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("logging needs an active MLflow run")
    now = int(time.time() * 1000)
    metrics = [Metric(f"{name}_by_layer", values[name], now, layer)
               for layer, values in enumerate(figures) for name in LAYER_METRICS if not math.isnan(values[name])]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        mlflow.MlflowClient().log_batch(run.info.run_id, metrics=metrics[start:start + 1000])


def run(cfg: Config, extract_run: str) -> VectorBank:
    """The ``bank`` stage: stability at every layer, then the bank at ``cfg.layer``, into the active run.

    Logs metrics ``split_half_cosine``, ``bootstrap_cosine_mean``, ``bootstrap_cosine_min``,
    ``n_valid``, ``sample_size`` (at the steering layer), the same per layer as
    ``<name>_by_layer`` with ``step=layer``; the param ``extract_run`` and tag ``TAG_EXTRACT_RUN``;
    the artifacts ``BANK_TENSORS`` and ``BANK_META``. A clamped sample size is printed and tagged
    (``TAG_NOTES``).

    Args:
        cfg: the resolved config: ``cfg.bank`` and ``cfg.layer`` are read.
        extract_run: the id of a finished extract run of ``cfg.model``.
    """
    extract_run = require_extract_run(extract_run)
    if mlflow.active_run() is None:
        raise RuntimeError("vector_bank.run needs an active MLflow run: call it inside `with stage_run(...)`")
    mlflow.set_tag(TAG_EXTRACT_RUN, extract_run)
    log_params_once({"extract_run": extract_run})
    diffs, valid, extract_meta = _read_extract_run(cfg, extract_run)
    bank_cfg = cfg.bank
    by_layer = [stability(diffs, valid, layer, bank_cfg.seed, n_bootstrap=bank_cfg.n_bootstrap,
                          sample_size=bank_cfg.sample_size, replace=bank_cfg.replace)
                for layer in range(diffs.shape[1])]
    _log_layer_metrics(by_layer)  # before building, so a refused layer still leaves every layer's figures
    bank = build_bank(diffs, valid, cfg.layer, n_bootstrap=bank_cfg.n_bootstrap, sample_size=bank_cfg.sample_size,
                      replace=bank_cfg.replace, seed=bank_cfg.seed, model=cfg.model.alias)
    bank = dataclasses.replace(bank, meta={**bank.meta, "extract_run": extract_run, "extract_meta": extract_meta,
                                           "config": config_to_dict(cfg)})
    figures: dict[str, float] = {"n_valid": bank.meta["n_valid"], "sample_size": bank.meta["sample_size"],
               **{key: value for key, value in bank.meta["stability"].items() if value is not None}}
    mlflow.log_metrics(figures)
    if bank.meta["notes"]:
        mlflow.set_tag(TAG_NOTES, "; ".join(bank.meta["notes"]))
        for note in bank.meta["notes"]:
            print(f"note: {note}")
    with tempfile.TemporaryDirectory() as tmp:
        bank.save(Path(tmp))
        mlflow.log_artifacts(tmp)
    shown = ", ".join(f"{key} {value:.4g}" for key, value in figures.items())
    print(f"bank at layer {bank.layer}: base + {bank.n_bootstrap} vectors; {shown}")
    return bank


__all__ = ['require_extract_run', 'run']
