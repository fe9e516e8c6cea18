"""CAA extraction: per-layer mean differences of the residual stream, truthful minus untruthful.

For every pool question, ``contrastive_pairs`` draws (correct, incorrect) answer pairs. Pairs are
batched by length (``length_sorted_batches``), and each batch becomes one left-padded batch of
prompt + answer sequences, the correct answers in the first half of the rows and the incorrect
ones in the second; one forward pass records the
output of every decoder layer, which is averaged over the answer tokens only (prompt and padding
masked). An example's difference at a layer is ``mean(correct) - mean(incorrect)``; the CAA vector
of the layer is the mean of the valid differences.

Non-finite activations (fp16 overflow in large Gemma-3 models) are not fatal one by one: an
example whose correct or incorrect mean is NaN/inf at a layer is invalid at that layer only, and
is left out of that layer's vector. When the invalid share of some layer exceeds
``extract.nan_threshold``, ``NonFiniteActivations`` names the layers and the fixes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric
from torch import Tensor
from tqdm.auto import tqdm

from core import artifacts, tracking
from core.config import Config, ConfigError, ExtractConfig, config_to_dict
from core.data import Question, splits_for
from core.models import LoadedModel, describe_source, load_from_config
from steering.hooks import masked_mean, record_residuals
from steering.layers import d_model, n_layers
from steering.prompts import answer_text, encode_prompt_answers, format_prompt
from steering.vectors import VECTORS_KEY, SteeringVectors

log = logging.getLogger(__name__)

DEFAULT_NAN_THRESHOLD = ExtractConfig().nan_threshold
NAN_FIXES = (
    "load the model in bfloat16 (--overrides extract.dtype=bfloat16), "
    "use the preset gemma3-fp16-maxlen384 (--preset gemma3-fp16-maxlen384), "
    "or lower extract.max_length"
)


class NonFiniteActivations(ConfigError):
    """Too many examples have NaN/inf answer means at some layer; the message names them and the fixes.

    A ConfigError (so a ValueError): the fix is a different dtype or max_length, and entry points
    report it in one line. ``extraction`` holds what was extracted, so the rates can still be logged.
    """

    def __init__(self, message: str, extraction: Extraction) -> None:
        super().__init__(message)
        self.extraction = extraction


@dataclass(frozen=True)
class Pair:
    """One contrastive example: a question with a correct and an incorrect answer to it."""

    question: Question
    correct: str
    incorrect: str


@dataclass(frozen=True, eq=False)
class Extraction:
    """Per-example, per-layer answer-mean differences and which of them are finite.

    Args:
        diffs: ``(n_examples, n_layers, d_model)`` fp32, correct minus incorrect; 0 where invalid.
        valid: ``(n_examples, n_layers)`` bool, False where either mean was NaN/inf.
        question_ids: the question id of each example (row of ``diffs``).
        model: the model alias.
        provenance: JSON facts about the run that produced it (empty before it is logged).
    """

    diffs: Tensor
    valid: Tensor
    question_ids: tuple[str, ...]
    model: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.diffs.ndim != 3 or self.diffs.dtype != torch.float32:
            raise ValueError(f"diffs has shape {tuple(self.diffs.shape)} and dtype {self.diffs.dtype}; "
                             "it must be fp32 (n_examples, n_layers, d_model)")
        if tuple(self.valid.shape) != tuple(self.diffs.shape[:2]) or self.valid.dtype != torch.bool:
            raise ValueError(f"valid has shape {tuple(self.valid.shape)} and dtype {self.valid.dtype}; it must be "
                             f"bool (n_examples, n_layers) = {tuple(self.diffs.shape[:2])}")
        if len(self.question_ids) != self.diffs.shape[0]:
            raise ValueError(f"{len(self.question_ids)} question ids for {self.diffs.shape[0]} examples; "
                             "give one id per example")

    @property
    def n_examples(self) -> int:
        return int(self.diffs.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.diffs.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.diffs.shape[2])

    @property
    def n_valid(self) -> Tensor:
        """``(n_layers,)`` int64: valid examples per layer."""
        return self.valid.sum(dim=0)  # (n_layers,)

    @property
    def nan_count(self) -> Tensor:
        """``(n_layers,)`` int64: invalid (non-finite) examples per layer."""
        return self.n_examples - self.n_valid  # (n_layers,)

    @property
    def nan_rate(self) -> Tensor:
        """``(n_layers,)`` fp32: share of invalid examples per layer (0 when there are no examples)."""
        return self.nan_count.float() / max(self.n_examples, 1)  # (n_layers,)

    @property
    def nan_rate_overall(self) -> float:
        """Share of invalid (example, layer) entries."""
        return float((~self.valid).float().mean()) if self.valid.numel() else 0.0

    @property
    def vectors(self) -> Tensor:
        """``(n_layers, d_model)`` fp32 CAA vectors: the mean of each layer's valid diffs (NaN with none)."""
        kept = torch.where(self.valid[..., None], self.diffs, 0.0)  # (n_examples, n_layers, d_model)
        return kept.sum(dim=0) / self.n_valid[:, None]  # (n_layers, d_model)

    def steering_vectors(self, provenance: dict[str, Any] | None = None) -> SteeringVectors:
        """The CAA vectors of every layer as ``SteeringVectors``.

        Args:
            provenance: overrides ``self.provenance`` when given.
        """
        vectors = self.vectors  # (n_layers, d_model)
        return SteeringVectors({layer: vectors[layer] for layer in range(self.n_layers)}, self.model,
                               dict(self.provenance if provenance is None else provenance))


# ---------------------------------------------------------------- pairs


def contrastive_pairs(questions: Sequence[Question], pairs_per_question: int, seed: int) -> list[Pair]:
    """Draw (correct, incorrect) answer pairs per question, deterministically.

    The first pair of a question uses its best answer (TruthfulQA's other correct answers include
    uninformative ones such as "I have no comment"); further correct answers and all incorrect
    ones are drawn in a seeded shuffle, each answer at most once. So a question gives
    ``min(pairs_per_question, n_correct, n_incorrect)`` pairs; the capped questions are logged.
    The draw of a question depends only on ``seed`` and its id, not on the other questions.

    Args:
        questions: the questions, in the order the pairs are returned.
        pairs_per_question: the number of pairs wanted per question (>= 1).
        seed: a non-negative int.
    """
    if isinstance(pairs_per_question, bool) or not isinstance(pairs_per_question, int) or pairs_per_question < 1:
        raise ValueError(f"pairs_per_question={pairs_per_question!r} must be an int >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    pairs: list[Pair] = []
    capped: list[str] = []
    for q in questions:
        rng = random.Random(f"{seed}/{q.id}")  # str seeds hash with sha512: stable across processes
        others = [a for a in q.correct_answers if a != q.best_answer]
        rng.shuffle(others)
        correct = [q.best_answer, *others]
        incorrect = list(q.incorrect_answers)
        rng.shuffle(incorrect)
        n = min(pairs_per_question, len(correct), len(incorrect))
        if n < pairs_per_question:
            capped.append(f"{q.id} ({n})")
        pairs += [Pair(q, correct[i], incorrect[i]) for i in range(n)]
    if capped:
        log.warning("pairs_per_question=%d capped by the answers available for %d of %d questions: %s",
                    pairs_per_question, len(capped), len(questions), ", ".join(capped))
    return pairs


# ---------------------------------------------------------------- activations


def encode_pairs(loaded: LoadedModel, pairs: Sequence[Pair], max_length: int) -> dict[str, Tensor]:
    """Prompt + answer sequences for a batch of pairs: rows ``0..B-1`` correct, ``B..2B-1`` incorrect.

    Args:
        loaded: the model, its tokenizer and prompt format.
        pairs: the B pairs of the batch.
        max_length: tokens per sequence at most (the prompt is cut from the left).

    Returns:
        ``encode_prompt_answers`` output: ``input_ids``, ``attention_mask``, ``answer_mask`` ``(2B, seq)``
        and ``prompt_end`` ``(2B,)``.
    """
    fmt = loaded.prompt_format
    prompts = [format_prompt(p.question.question, loaded.tokenizer, fmt) for p in pairs]
    answers = [answer_text(p.correct, fmt) for p in pairs] + [answer_text(p.incorrect, fmt) for p in pairs]
    return encode_prompt_answers(loaded.tokenizer, prompts + prompts, answers, max_length)


def length_sorted_batches(loaded: LoadedModel, pairs: Sequence[Pair], batch_size: int,
                          max_length: int) -> list[list[int]]:
    """Indices of ``pairs`` in batches of similar length, longest first.

    Pairs of similar length share a batch, so less of a forward pass is spent on padding (smoke
    pool on smollm2, 8 pairs per batch: 8% padded positions instead of 22% in file order); longest
    first, so a batch too large for memory fails at once. Results do not depend on the order: rows
    are independent under left padding.

    Args:
        loaded: the model's tokenizer and prompt format.
        pairs: the pairs to order.
        batch_size: pairs per batch.
        max_length: tokens per sequence at most.
    """
    lengths = [encode_pairs(loaded, [pair], max_length)["input_ids"].shape[1] for pair in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -lengths[i])  # stable: ties keep pair order
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def answer_means(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-layer means of the residual stream over each row's answer tokens, in one forward pass.

    Position ids count real tokens only, as in generation, so a left-padded row gets the same
    positions as it would alone.

    Args:
        model: a model that ``steering.layers.decoder_layers`` supports.
        batch: ``input_ids``, ``attention_mask`` and ``answer_mask``, all ``(rows, seq)``.

    Returns:
        ``(rows, n_layers, d_model)`` fp32 on the CPU; NaN/inf where a layer's output was non-finite.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)  # (rows, seq)
    attention_mask = batch["attention_mask"].to(device)  # (rows, seq)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (rows, seq)
    with torch.inference_mode(), record_residuals(model) as acts:
        # logits_to_keep=1: the logits are not read, and the full vocabulary projection is the largest tensor.
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
              use_cache=False, logits_to_keep=1)
        means = [masked_mean(acts[layer], batch["answer_mask"]) for layer in sorted(acts)]  # (rows, d_model) each
    return torch.stack(means, dim=1).cpu()  # (rows, n_layers, d_model)


def extract_caa(
    loaded: LoadedModel,
    pairs: Sequence[Pair],
    *,
    batch_size: int,
    max_length: int,
    nan_threshold: float = DEFAULT_NAN_THRESHOLD,
) -> Extraction:
    """Answer-mean differences (correct - incorrect) at every decoder layer for every pair.

    Args:
        loaded: the frozen model (any dtype; means and diffs are fp32).
        pairs: the contrastive pairs, e.g. from ``contrastive_pairs``.
        batch_size: pairs per forward pass (each pass runs ``2 * batch_size`` sequences).
        max_length: tokens per sequence at most.
        nan_threshold: the largest allowed share of non-finite examples at any layer.

    Raises:
        NonFiniteActivations: a layer's invalid share exceeds ``nan_threshold``, or a layer has no
            valid example at all.
    """
    if not pairs:
        raise ValueError("no contrastive pairs to extract from; the pool split is empty, set data.pool > 0")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} must be an int >= 2 (at least one prompt and one answer token)")
    if not 0.0 <= nan_threshold <= 1.0:
        raise ValueError(f"nan_threshold={nan_threshold!r} must be a share in [0, 1]")
    width = d_model(loaded.model)
    diffs = torch.empty(len(pairs), n_layers(loaded.model), width)  # (n_examples, n_layers, d_model)
    valid = torch.empty(len(pairs), n_layers(loaded.model), dtype=torch.bool)  # (n_examples, n_layers)
    batches = length_sorted_batches(loaded, pairs, batch_size, max_length)
    for indices in tqdm(batches, desc=f"extract {loaded.spec.alias}", unit="batch", leave=False):
        chunk = [pairs[i] for i in indices]
        means = answer_means(loaded.model, encode_pairs(loaded, chunk, max_length))  # (2B, n_layers, d_model)
        pos, neg = means[:len(chunk)], means[len(chunk):]  # (B, n_layers, d_model) each
        finite = torch.isfinite(pos).all(dim=-1) & torch.isfinite(neg).all(dim=-1)  # (B, n_layers)
        rows = torch.tensor(indices)  # (B,)
        diffs[rows] = torch.where(finite[..., None], pos - neg, 0.0)  # (B, n_layers, d_model)
        valid[rows] = finite
    extraction = Extraction(diffs, valid, tuple(p.question.id for p in pairs), loaded.spec.alias)
    check_finite(extraction, nan_threshold)
    return extraction


def check_finite(extraction: Extraction, nan_threshold: float) -> None:
    """Raise ``NonFiniteActivations`` when any layer's non-finite share exceeds ``nan_threshold``.

    Args:
        extraction: what ``extract_caa`` collected.
        nan_threshold: the largest allowed share in [0, 1]; a layer with no valid example always fails.
    """
    rates = extraction.nan_rate.tolist()
    bad = [layer for layer, rate in enumerate(rates)
           if rate > nan_threshold or int(extraction.n_valid[layer]) == 0]
    if not bad:
        return
    listed = ", ".join(f"layer {layer}: {rates[layer]:.1%} ({int(extraction.nan_count[layer])}/"
                       f"{extraction.n_examples})" for layer in bad[:12])
    more = f" and {len(bad) - 12} more" if len(bad) > 12 else ""
    raise NonFiniteActivations(
        f"non-finite (NaN/inf) answer activations above extract.nan_threshold={nan_threshold} in "
        f"{len(bad)} of {extraction.n_layers} layers of {extraction.model}: {listed}{more}; "
        f"fix: {NAN_FIXES}",
        extraction,
    )


# ---------------------------------------------------------------- the stage


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
    summary = {"nan_rate": extraction.nan_rate_overall, "nan_rate_max": max(rates),
               "n_examples": float(extraction.n_examples), "n_pairs": float(extraction.n_examples),
               "n_questions": float(len(set(extraction.question_ids)))}
    by_layer += [Metric(key, value, now, 0) for key, value in summary.items()]
    client = mlflow.MlflowClient()
    for start in range(0, len(by_layer), 1000):  # MLflow's batch limit
        client.log_batch(run.info.run_id, metrics=by_layer[start:start + 1000])


def _log_artifacts(extraction: Extraction, vectors: SteeringVectors, cfg: Config, loaded: LoadedModel) -> None:
    meta = {
        **vectors.to_meta(),
        "n_layers": extraction.n_layers,
        "norms": extraction.vectors.norm(dim=-1).tolist(),
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
    }
    with tempfile.TemporaryDirectory() as tmp:
        artifacts.save_tensors(Path(tmp) / artifacts.CAA_TENSORS, Path(tmp) / artifacts.CAA_META, tensors, meta)
        mlflow.log_artifacts(tmp)


def run(cfg: Config, data_run: str = "") -> SteeringVectors:
    """The ``extract`` stage: CAA vectors of every layer from the pool split, logged to the active run.

    Logs metrics ``nan_rate`` (all example-layer entries), ``nan_rate_max``, ``nan_rate_by_layer``
    and ``norm_by_layer`` (step = layer), ``n_examples``, ``n_pairs``, ``n_questions``; params
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
                      dict(meta.get("provenance", {})))
