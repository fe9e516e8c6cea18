"""The iti stage: every attention head ranked by how well a probe on its output tells true from false
answers, with the head's mass-mean direction and sigma (ITI, Li et al., 2023), logged to MLflow.

For each pool question, ``iti.pairs_per_question`` (correct, incorrect) answer pairs (the best answer
first, ``steering.extract.contrastive_pairs`` seeded by ``iti.seed``) run through the frozen model in
batches; each head's output (the input of ``o_proj``) at the answer's last token is one example,
labelled 1 for the correct answer and 0 for the incorrect one. ``steering.iti.select_heads`` fits a
logistic probe per head on a seeded split by question (no question on both sides) and ranks all heads by held-out accuracy. The
``iti`` method steers the best ``iti.k`` of them at evaluation, so K is chosen without running this again.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch

from core import artifacts, tracking
from core.config import Config, ConfigError
from core.data import Question, splits_for
from core.models import LoadedModel, describe_source, load_from_config
from steering.extract import Pair, contrastive_pairs, encode_pairs, length_sorted_batches
from steering.iti import ItiDirections, attention_heads, record_head_inputs, select_heads
from steering.layers import n_layers


def head_activations(loaded: LoadedModel, pairs: list[Pair], batch_size: int,
                     max_length: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every head's output at the last answer token, for the correct and the incorrect answer of each pair.

    Returns:
        ``(2 * n_pairs, n_layers, n_heads, head_dim)`` float32 activations, ``(2 * n_pairs,)`` labels
        (1 correct, 0 incorrect) and each example's question id.
    """
    model, (n_heads, head_dim) = loaded.model, attention_heads(loaded.model)
    acts, labels, questions = [], [], []
    for indices in length_sorted_batches(loaded, pairs, batch_size, max_length):
        batch = encode_pairs(loaded, [pairs[i] for i in indices], max_length)  # left-padded: answers end at -1
        with torch.no_grad(), record_head_inputs(model) as recorded:
            model(input_ids=batch["input_ids"].to(loaded.device),
                  attention_mask=batch["attention_mask"].to(loaded.device))
        last = torch.stack([recorded[layer][:, -1] for layer in sorted(recorded)], dim=1)  # (2B, n_layers, H*D)
        acts.append(last.float().cpu().reshape(len(last), len(recorded), n_heads, head_dim).numpy())
        labels += [1] * len(indices) + [0] * len(indices)
        questions += [pairs[i].question.id for i in indices] * 2
    return np.concatenate(acts), np.array(labels), questions


def plan(cfg: Config, data_run: str = "") -> list[str]:
    """What ``run`` would do, for a dry run: no weights are loaded."""
    pool = splits_for(cfg, data_run)["pool"]
    pairs = contrastive_pairs(pool, cfg.iti.pairs_per_question, cfg.iti.seed)
    return [
        f"model: {cfg.model.alias} from {describe_source(cfg.model, cfg.runtime.cache_dir)}",
        f"pool: {len(pool)} questions -> {len(pairs)} pairs, {2 * len(pairs)} probe examples "
        f"({math.ceil(len(pairs) / cfg.iti.batch_size)} batches)",
        f"probes: one per head of every layer, {cfg.iti.val_fraction:.0%} held out (seed {cfg.iti.seed}); "
        f"the iti variant steers the best iti.k={cfg.iti.k} at iti.alpha={cfg.iti.alpha}",
        f"artifacts: {artifacts.ITI_HEADS}, {artifacts.ITI_META}",
    ]


def rank_heads(cfg: Config, pool: list[Question], loaded: LoadedModel) -> tuple[ItiDirections, list[Pair], np.ndarray]:
    """Every head of ``loaded`` ranked best first on ``pool``'s answer pairs (the iti stage's, and tune's
    cached ranking), with the pairs and the ``(2 * n_pairs, n_layers, n_heads, head_dim)`` activations.

    Args:
        cfg: the run's config (``iti`` section).
        pool: the pool split's questions.
        loaded: the model.
    """
    pairs = contrastive_pairs(pool, cfg.iti.pairs_per_question, cfg.iti.seed)
    if not pairs:
        raise ConfigError("the pool split gives no (correct, incorrect) pair to rank the ITI heads on; "
                          "set data.pool > 0 (e.g. --overrides data.pool=40)")
    acts, labels, questions = head_activations(loaded, pairs, cfg.iti.batch_size, cfg.iti.max_length)
    layers = n_layers(loaded.model)
    ranked = select_heads(acts, labels, k=layers * acts.shape[2], layers=list(range(layers)), seed=cfg.iti.seed,
                          val_fraction=cfg.iti.val_fraction, groups=questions)
    return ranked, pairs, acts


def run(cfg: Config, data_run: str = "") -> ItiDirections:
    """The ``iti`` stage, inside the active MLflow run: logs ``n_examples``, ``best_accuracy``,
    ``top_k_accuracy`` (mean of the best ``iti.k``), ``best_accuracy_by_layer`` (step = layer) and the
    artifacts ``ITI_HEADS`` (every head, best first) and ``ITI_META``.

    Args:
        cfg: the resolved config (``iti``, ``data`` for the pool, ``model``, ``runtime``).
        data_run: a data stage run whose splits to use; recomputed from cfg when empty.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("iti.run needs an active MLflow run: call it inside tracking.stage_run")
    loaded = load_from_config(cfg)
    ranked, pairs, acts = rank_heads(cfg, splits_for(cfg, data_run)["pool"], loaded)
    layers = acts.shape[1]
    accuracy = ranked.accuracies.numpy()
    mlflow.log_metrics({"n_examples": float(len(acts)), "best_accuracy": float(accuracy[0]),
                        "top_k_accuracy": float(accuracy[:cfg.iti.k].mean())})
    for layer in range(layers):
        mlflow.log_metric("best_accuracy_by_layer", float(accuracy[ranked.layers.numpy() == layer].max()), step=layer)
    tracking.log_params_once({"iti.data_run": data_run or "none", "iti.prompt_format": loaded.prompt_format})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ranked.save(folder / Path(artifacts.ITI_HEADS).name)
        (folder / Path(artifacts.ITI_META).name).write_text(json.dumps({
            "model": cfg.model.alias, "n_layers": layers, "n_heads": int(acts.shape[2]),
            "head_dim": int(acts.shape[3]), "n_examples": len(acts), "data_run": data_run,
            "question_ids": [p.question.id for p in pairs]}, indent=1))
        mlflow.log_artifacts(tmp, str(Path(artifacts.ITI_HEADS).parent))
    return ranked


__all__ = ["head_activations", "plan", "rank_heads", "run"]
