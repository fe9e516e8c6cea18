"""CAA extraction: per-layer mean differences of the residual stream, truthful minus untruthful.

For every pool question, ``contrastive_pairs`` draws (correct, incorrect) answer pairs. Pairs are
batched by length (``length_sorted_batches``), and each batch becomes one left-padded batch of
prompt + answer sequences, the correct answers in the first half of the rows and the incorrect
ones in the second; one forward pass records the
output of every decoder layer, which is averaged over the answer tokens only (prompt and padding
masked). An example's difference at a layer is ``mean(correct) - mean(incorrect)``; the CAA vector
of the layer is the mean of the valid differences. The same pass measures the residual stream's size:
an example's mean per-token L2 norm over both answers, whose mean over valid examples
(``Extraction.resid_norm``) is what ``steering.scale_mode: relative`` scales against.

Non-finite activations (fp16 overflow in large Gemma-3 models) are not fatal one by one: an
example whose correct or incorrect mean is NaN/inf at a layer is invalid at that layer only, and
is left out of that layer's vector. When the invalid share of some layer exceeds
``extract.nan_threshold``, ``NonFiniteActivations`` names the layers and the fixes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from core.config import ConfigError, ExtractConfig
from core.data import Question
from core.models import LoadedModel
from steering.hooks import masked_mean, record_residuals
from steering.layers import d_model, n_layers
from steering.prompts import answer_text, encode_prompt_answers, format_prompt
from steering.vectors import SteeringVectors

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
        resid_norms: ``(n_examples, n_layers)`` fp32 mean per-token residual norm over the example's two
            answers; None for an extraction saved before it was measured.
    """

    diffs: Tensor
    valid: Tensor
    question_ids: tuple[str, ...]
    model: str
    provenance: dict[str, Any] = field(default_factory=dict)
    resid_norms: Tensor | None = None

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
        if self.resid_norms is not None and tuple(self.resid_norms.shape) != tuple(self.diffs.shape[:2]):
            raise ValueError(f"resid_norms has shape {tuple(self.resid_norms.shape)}; it must be (n_examples, "
                             f"n_layers) = {tuple(self.diffs.shape[:2])}")

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

    @property
    def resid_norm(self) -> Tensor | None:
        """``(n_layers,)`` fp32 mean residual-stream norm per layer over the valid examples (None when unmeasured)."""
        if self.resid_norms is None:
            return None
        kept = torch.where(self.valid, self.resid_norms, 0.0)  # (n_examples, n_layers)
        return kept.sum(dim=0) / self.n_valid  # (n_layers,)

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
    """Per-layer means of the residual stream over each row's answer tokens (``answer_stats``' first part)."""
    return answer_stats(model, batch)[0]


def answer_stats(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per-layer means of the residual stream over each row's answer tokens, and the mean of the
    tokens' L2 norms there, in one forward pass.

    Position ids count real tokens only, as in generation, so a left-padded row gets the same
    positions as it would alone.

    Args:
        model: a model that ``steering.layers.decoder_layers`` supports.
        batch: ``input_ids``, ``attention_mask`` and ``answer_mask``, all ``(rows, seq)``.

    Returns:
        ``(rows, n_layers, d_model)`` fp32 means and ``(rows, n_layers)`` fp32 mean norms, on the CPU; NaN/inf
        where a layer's output was non-finite.
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
        norms = [masked_mean(acts[layer].float().norm(dim=-1, keepdim=True), batch["answer_mask"])[:, 0]
                 for layer in sorted(acts)]  # (rows,) each
    return torch.stack(means, dim=1).cpu(), torch.stack(norms, dim=1).cpu()  # (rows, n_layers, d_model), (rows, n_layers)


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
    resid = torch.empty(len(pairs), n_layers(loaded.model))  # (n_examples, n_layers)
    batches = length_sorted_batches(loaded, pairs, batch_size, max_length)
    for indices in tqdm(batches, desc=f"extract {loaded.spec.alias}", unit="batch", leave=False):
        chunk = [pairs[i] for i in indices]
        means, norms = answer_stats(loaded.model, encode_pairs(loaded, chunk, max_length))  # (2B, L, d), (2B, L)
        pos, neg = means[:len(chunk)], means[len(chunk):]  # (B, n_layers, d_model) each
        finite = torch.isfinite(pos).all(dim=-1) & torch.isfinite(neg).all(dim=-1)  # (B, n_layers)
        rows = torch.tensor(indices)  # (B,)
        diffs[rows] = torch.where(finite[..., None], pos - neg, 0.0)  # (B, n_layers, d_model)
        valid[rows] = finite
        size = (norms[:len(chunk)] + norms[len(chunk):]) / 2  # (B, n_layers)
        resid[rows] = torch.where(finite & torch.isfinite(size), size, 0.0)
    extraction = Extraction(diffs, valid, tuple(p.question.id for p in pairs), loaded.spec.alias, resid_norms=resid)
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
