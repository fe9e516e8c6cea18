"""The train stage: MLP steering modules (``steering.mlp``) trained on a bank run's vectors, one child run per
branch (``mc``: answer log-probabilities with a margin; ``gen``: generated answers; ``joint``: one module on the
weighted sum of both losses), logged to MLflow."""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Any

import mlflow
import torch
from torch import Tensor

from core.artifacts import MLP_DIR, TAG_BRANCH, TAG_BRANCH_RUN
from core.config import Config, ConfigError
from core.config_io import config_to_dict
from core.data import Question
from steering.layers import d_model
from steering.mlp import BRANCHES, LOSS_BRANCHES, Branch, MLPSteering, MLPSteeringConfig, save_mlp
from steering.scale import RELATIVE_SCALE_METRIC, SCALE_METRIC, scales_from_meta
from steering.sequences import Sequences, encode_examples
from steering.train import train_branch


def branches_of(branch: str) -> tuple[Branch, ...]:
    """``both`` -> ``("mc", "gen")``; ``mc``/``gen``/``joint`` -> itself."""
    if branch == "both":
        return LOSS_BRANCHES
    for name in BRANCHES:
        if branch == name:
            return (name,)
    raise ConfigError(f"mlp.branch={branch!r} is not one of mc, gen, both, joint")


def check_bank_run(bank_run: str) -> None:
    """A missing bank run is a ConfigError that says where one comes from."""
    if not bank_run:
        raise ConfigError(
            "train needs a vector bank: pass --bank-run <run id> (-P bank_run=... under mlflow run), the id "
            "of a finished `bank` run (python -m entrypoints.bank --extract-run <extract run id>)"
        )


def plan(cfg: Config, *, bank_run: str, data_run: str = "", branch: str | None = None) -> list[str]:
    """Validate what ``run`` needs without loading anything, and describe it for a dry run."""
    check_bank_run(bank_run)
    branches = branches_of(branch or cfg.mlp.branch)
    m = cfg.mlp
    return [
        f"branches: {', '.join(branches)} (artifacts {', '.join(MLP_DIR.format(branch=b) for b in branches)})",
        f"model: {cfg.model.alias}, layer {cfg.layer}, scale {cfg.steering.scale}, positions {cfg.steering.positions}",
        f"bank run: {bank_run}",
        f"data: {'splits of run ' + data_run if data_run else cfg.data.source} (train {cfg.data.sizes['train']}, "
        f"val {cfg.data.sizes['val']})",
        f"mlp: expansion {m.expansion}, {m.steps} steps of {m.batch_size}, {m.optimizer} lr {m.lr} "
        f"wd {m.weight_decay}, margin {m.margin}, seed {m.seed}"
        + (f", loss {m.mc_weight} x mc + {m.gen_weight} x gen" if "joint" in branches else ""),
    ]


def bank_scales(cfg: Config, bank_meta: dict[str, Any], bank_run: str) -> tuple[float, float | None]:
    """``(multiplier, relative scale or None)`` of ``steering.scale`` for a module mixing the bank's vectors: in
    relative mode a fraction of the layer's mean residual norm over the CAA vector's norm (the bank's extract
    run measured both), as for ``caa``."""
    extract_meta = bank_meta.get("extract_meta") or {}
    if "norms" not in extract_meta:
        if cfg.steering.scale_mode == "relative":
            raise ConfigError(f"bank run {bank_run} does not record its extraction's norms; build the bank again "
                              "from a current extract run, or use steering.scale_mode=absolute")
        return cfg.steering.scale, None
    return scales_from_meta(cfg.steering.scale, cfg.steering.scale_mode, extract_meta, cfg.layer,
                            f"the extract run of bank run {bank_run}")


def _train_and_log(cfg: Config, loaded: Any, bank: Tensor, splits: dict[str, list[Question]], branch: Branch,
                   fast_path: bool, scales: tuple[float, float | None]) -> MLPSteering:
    torch.manual_seed(cfg.mlp.seed)
    multiplier, relative = scales
    mlflow.log_metrics({SCALE_METRIC: multiplier, **({RELATIVE_SCALE_METRIC: relative} if relative is not None else {})})
    config = MLPSteeringConfig(model=cfg.model.alias, layer=cfg.layer, d_model=bank.shape[1], n_bank=bank.shape[0],
                               expansion=cfg.mlp.expansion, scale=multiplier)
    module = MLPSteering(config, bank).to(loaded.device)
    loss_branches: tuple[str, ...] = LOSS_BRANCHES if branch == "joint" else (branch,)
    encoded: dict[str, dict[str, Sequences]] = {split: {name: encode_examples(splits[split], loaded.tokenizer, loaded.prompt_format, name,
                                             max_length=cfg.extract.max_length, seed=cfg.mlp.seed)
                       for name in loss_branches}
               for split in ("train", "val")}
    train, val = (encoded[split] if branch == "joint" else encoded[split][branch] for split in ("train", "val"))
    result = train_branch(loaded.model, module, train, val, branch=branch, cfg=cfg.mlp,
                          positions=cfg.steering.positions, pad_id=loaded.tokenizer.pad_token_id,
                          eval_batch_size=cfg.extract.batch_size, fast_path=fast_path)
    print(f"{branch}: train loss {result.initial_train_loss:.4f} -> {result.final_train_loss:.4f}, "
          f"val loss {result.initial_val_loss:.4f} -> {result.final_val_loss:.4f} (fast path {result.fast_path})")
    branch_cfg = dataclasses.replace(cfg, mlp=dataclasses.replace(cfg.mlp, branch=branch))
    with tempfile.TemporaryDirectory() as tmp:
        save_mlp(module.cpu(), tmp, {"branch": branch, "config": config_to_dict(branch_cfg)})
        mlflow.log_artifacts(tmp, MLP_DIR.format(branch=branch))
    return module


def run(cfg: Config, *, bank_run: str, data_run: str = "", branch: str | None = None,
        fast_path: bool = True) -> dict[str, MLPSteering]:
    """The ``train`` stage, in the active MLflow run: one module per branch.

    A single branch trains in the active run. ``both`` trains each branch in a child run (its
    ``mlp.branch`` pinned, so metric names stay ``train_loss``/``val_loss``) and tags the active run
    with ``truthsteer.mlp_<branch>_run`` so that ``load_mlp(<this run>, branch)`` finds it.

    Args:
        cfg: the resolved config (``mlp``, ``steering``, ``model``, ``data``, ``extract.max_length``).
        bank_run: id of the ``bank`` run whose vectors the module mixes.
        data_run: id of a ``data`` run whose splits to use; "" recomputes them from ``cfg.data``.
        branch: ``mc``, ``gen`` or ``both``; None takes ``cfg.mlp.branch``.
        fast_path: use the prefix cache and the answer-only head (switch off only to compare).

    Returns:
        The trained modules (on the CPU, eval mode) by branch.
    """
    from core.data import splits_for
    from core.models import load_from_config
    from core.tracking import stage_run
    from steering.vector_bank import load_bank

    check_bank_run(bank_run)
    branches = branches_of(branch or cfg.mlp.branch)
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("train.run needs an active MLflow run: call it inside `with stage_run('train', cfg):`")
    found = load_bank(bank_run)
    if found.layer != cfg.layer:
        raise ConfigError(
            f"bank run {bank_run!r} holds vectors of layer {found.layer}, but steering.layer={cfg.layer}; train at "
            f"the bank's layer (--overrides steering.layer={found.layer}) or build a bank at layer {cfg.layer}"
        )
    if found.model != cfg.model.alias or found.d_model != cfg.model.d_model:
        raise ConfigError(
            f"bank run {bank_run!r} was built for {found.model!r} (d_model={found.d_model}), not for "
            f"{cfg.model.alias!r} (d_model={cfg.model.d_model}); pass a bank run of {cfg.model.alias} or --model {found.model}"
        )
    bank = found.vectors.detach().float()  # (1 + K, d_model)
    scales = bank_scales(cfg, dict(found.meta), bank_run)
    splits = splits_for(cfg, data_run)
    loaded = load_from_config(cfg)
    if d_model(loaded.model) != bank.shape[1]:
        raise ConfigError(f"{cfg.model.alias} has d_model={d_model(loaded.model)}, the bank {bank.shape[1]}")
    mlflow.set_tags({"truthsteer.bank_run": bank_run, "truthsteer.data_run": data_run})
    modules: dict[str, MLPSteering] = {}
    for name in branches:
        if len(branches) == 1:
            mlflow.set_tag(TAG_BRANCH, name)
            modules[name] = _train_and_log(cfg, loaded, bank, splits, name, fast_path, scales)
            continue
        branch_cfg = dataclasses.replace(cfg, mlp=dataclasses.replace(cfg.mlp, branch=name))
        with stage_run("train", branch_cfg, run_name=f"{cfg.model.alias}-train-{name}",
                       tags={TAG_BRANCH: name, "truthsteer.bank_run": bank_run}) as child:
            modules[name] = _train_and_log(branch_cfg, loaded, bank, splits, name, fast_path, scales)
        mlflow.MlflowClient().set_tag(parent.info.run_id, TAG_BRANCH_RUN.format(branch=name), child.info.run_id)
    return modules


__all__ = ['bank_scales', 'branches_of', 'check_bank_run', 'plan', 'run']
