"""What steering costs: how far it moves the model's next-token distributions (ITI's KL and CE columns).

- ``neutral_effects``: on neutral English text (``core.corpus``, WikiText-2 passages, not TruthfulQA), per
  passage the mean KL(unsteered || steered) of the next-token distributions and the cross-entropy of the
  passage's own next tokens with and without steering; every position of a passage is steered. One batch
  runs unsteered once and then once per steered variant over the layers above the lowest steered one
  (``Steering.last_unedited_layer``: below it every variant computes what the unsteered pass did).
- ``answer_kl``: the same KL over a variant's own answer tokens (the positions that predict them), given
  its question's prompt; steering from the last prompt token on, as when the answer was generated. With
  ``positions=from_prompt_end`` each prompt but its last token runs once (``PrefixCache.of_prefixes``)
  and both passes run over the last prompt token and the answer only, the layers up to the steered one once.

An unsteered variant (baseline) moves nothing: its values are exactly 0 and no forward runs for it. A
steered forward must edit exactly the positions it should (``check_steered``), or ``SteeringNotApplied``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.config import Config
from core.models import LoadedModel
from steering.cache import with_cache
from steering.hooks import SteeredCount, check_steered, record_residuals
from steering.layers import decoder_layers
from steering.logprobs import head_logits
from steering.methods.intervention import Steering
from steering.prefix import PrefixCache, SuffixBatch, resume_after_layer, with_layer_output
from steering.prompts import answer_text, encode_text, format_prompt, prompt_answer_ids
from steering.sequences import Sequences, make_batch

NEUTRAL_FIELDS = ("kl", "ce_unsteered", "ce_steered", "n_tokens")


def token_kl(unsteered: Tensor, steered: Tensor) -> Tensor:
    """``(n,)`` KL(unsteered || steered) in nats of ``(n, vocab)`` logits, in fp32: exactly 0 where they are equal."""
    p = unsteered.float().log_softmax(dim=-1)  # (n, vocab)
    q = steered.float().log_softmax(dim=-1)  # (n, vocab)
    return (p.exp() * (p - q)).sum(dim=-1).clamp(min=0.0)  # rounding can leave -1e-9


def _token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """``(n,)`` cross-entropy in nats of ``(n, vocab)`` logits against ``(n,)`` token ids."""
    return -logits.float().log_softmax(dim=-1).gather(-1, targets[:, None])[:, 0]


HEAD_CHUNK = 64  # final states through the LM head at a time: a few (chunk, vocab) fp32 tensors at once


def _kl_ce(model: Any, unsteered: Tensor, steered: Tensor | None, targets: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per token, from ``(n, d_model)`` final states: KL(unsteered || steered) and, against ``targets``,
    the unsteered and steered cross-entropy (NaN where not asked: no ``steered``, no ``targets``). The LM
    head runs ``HEAD_CHUNK`` states at a time, so no ``(n, vocab)`` tensor is ever whole."""
    kl, ce_u, ce_s = (torch.full((unsteered.shape[0],), math.nan, device=unsteered.device) for _ in range(3))
    for start in range(0, unsteered.shape[0], HEAD_CHUNK):
        part = slice(start, start + HEAD_CHUNK)
        u = head_logits(model, unsteered[part])  # (chunk, vocab)
        s = head_logits(model, steered[part]) if steered is not None else None  # (chunk, vocab)
        if s is not None:
            kl[part] = token_kl(u, s)
        if targets is not None:
            ce_u[part] = _token_ce(u, targets[part])
            if s is not None:
                ce_s[part] = _token_ce(s, targets[part])
    return kl, ce_u, ce_s


def _final_states(model: Any, input_ids: Tensor, mask: Tensor) -> Tensor:
    """``(batch, seq, d_model)`` final hidden states (after the final norm) of a plain forward."""
    base: Any = model.base_model
    return base(input_ids=input_ids, attention_mask=mask).last_hidden_state


def _neutral_batches(loaded: LoadedModel, texts: Sequence[str], batch_size: int,
                     max_tokens: int) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """Rows of similar length: indices, ``(batch, seq)`` right-padded ids and mask (BOS where the model uses one)."""
    ids = [encode_text(loaded.tokenizer, t)[:max_tokens] for t in texts]
    short = [i for i, row in enumerate(ids) if len(row) < 2]
    if short:
        raise ValueError(f"neutral passages {short[:5]} have under 2 tokens: nothing is predicted; drop them")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = loaded.tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = len(ids[rows[0]])
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (batch, seq)
        mask = torch.zeros(len(rows), width, dtype=torch.long)  # (batch, seq)
        for r, i in enumerate(rows):
            input_ids[r, :len(ids[i])] = torch.tensor(ids[i])
            mask[r, :len(ids[i])] = 1
        yield rows, input_ids.to(loaded.device), mask.to(loaded.device)


@torch.inference_mode()
def neutral_effects(loaded: LoadedModel, steerings: Mapping[str, Steering], texts: Sequence[str], *,
                    batch_size: int, max_tokens: int) -> dict[str, list[dict[str, float]]]:
    """Per variant and passage: ``kl`` (mean over the passage's predicted tokens), ``ce_unsteered`` and
    ``ce_steered`` (mean nats per token) and ``n_tokens``.

    Args:
        loaded: the model and tokenizer.
        steerings: the variants' steerings, by name.
        texts: the passages.
        batch_size: passages per forward.
        max_tokens: tokens per passage at most (BOS included); longer ones are cut.
    """
    out = {v: [dict.fromkeys(NEUTRAL_FIELDS, math.nan) for _ in texts] for v in steerings}
    # no variant edits the layers up to the lowest one steered: the unsteered pass's output there is shared
    n_layers = len(decoder_layers(loaded.model))
    shared = min((s.last_unedited_layer(n_layers) for s in steerings.values() if s.steers), default=-1)
    for rows, input_ids, mask in _neutral_batches(loaded, texts, batch_size, max_tokens):
        predicts = mask[:, 1:].bool()  # (batch, seq - 1): position t predicts real token t + 1
        targets = input_ids[:, 1:][predicts]  # (n_tokens,)
        owner = predicts.nonzero()[:, 0]  # (n_tokens,) row of each token
        with record_residuals(loaded.model, [shared] if shared >= 0 else []) as acts:
            base = _final_states(loaded.model, input_ids, mask)[:, :-1][predicts]  # (n_tokens, d_model)
        ce_base = _kl_ce(loaded.model, base, None, targets)[1]  # (n_tokens,)
        starts = torch.zeros(len(rows), dtype=torch.long, device=input_ids.device)  # every position is steered
        for variant, steering in steerings.items():
            if steering.steers:
                with contextlib.ExitStack() as stack:
                    if shared >= 0:  # only the layers above it run
                        stack.enter_context(resume_after_layer(loaded.model, shared, acts[shared]))
                    count = stack.enter_context(steering.applied(loaded.model, starts))
                    steered = _final_states(loaded.model, input_ids, mask)[:, :-1][predicts]  # (n_tokens, d_model)
                check_steered(count, steering.expected_steered(starts, input_ids.shape[1]),
                              f"neutral-text KL of {len(rows)} passages by {variant}")
                kl, _, ce = _kl_ce(loaded.model, base, steered, targets)  # (n_tokens,) each
            else:
                kl, ce = torch.zeros_like(ce_base), ce_base
            for r, i in enumerate(rows):
                mine = owner == r
                out[variant][i] = {"kl": float(kl[mine].double().mean()), "ce_unsteered": float(ce_base[mine].double().mean()),
                                   "ce_steered": float(ce[mine].double().mean()), "n_tokens": float(mine.sum())}
    return out


def _suffix_states(loaded: LoadedModel, batch: SuffixBatch, predicts: Tensor,
                   steering: Callable[[], contextlib.AbstractContextManager[SteeredCount]]) -> tuple[Tensor, SteeredCount]:
    """Final states at the ``predicts`` positions of a prefix-cache batch's suffix, under ``steering()``; with
    the batch's ``layer``, only the layers above it run."""
    base: Any = loaded.model.base_model
    with batch.resumed(loaded.model), batch.one_forward(loaded.model) as cache, steering() as count:
        hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                      use_cache=True, **with_cache(base, cache)).last_hidden_state  # (batch, S, d_model)
    return hidden[:, :-1][predicts], count  # (n_tokens, d_model)


@torch.inference_mode()
def answer_kl(loaded: LoadedModel, steerings: Mapping[str, Steering], questions: Sequence[str],
              answers: Mapping[str, Sequence[str]], *, batch_size: int, max_length: int,
              max_tokens: int = 0) -> dict[str, list[float | None]]:
    """Per variant and answer, the mean KL(unsteered || steered) over the positions that predict its tokens,
    given its question's prompt; None for an empty answer (no token to predict).

    With ``positions=from_prompt_end`` every prompt but its last token runs once for all variants
    (``PrefixCache.of_prefixes``, a chunk of ``batch_size`` questions at a time), and each variant's
    answers run twice over the last prompt token and the answer only, unsteered and steered.

    Args:
        loaded: the model, its tokenizer and prompt format.
        steerings: the variants' steerings (from each row's last prompt token on, or everywhere).
        questions: question texts, one per answer.
        answers: variant -> its answers, in ``questions``' order.
        batch_size: rows per forward (and prompts per cached chunk).
        max_length: tokens per row at most; longer rows lose prompt tokens from the left.
        max_tokens: the first ``max_tokens`` tokens of each answer are read; 0: all of them.
    """
    tokenizer, fmt = loaded.tokenizer, loaded.prompt_format
    prompt_of = {q: format_prompt(q, tokenizer, fmt) for q in dict.fromkeys(questions)}
    out: dict[str, list[float | None]] = {}
    rows: list[tuple[str, int]] = []  # (variant, answer index) of every steered answer with tokens
    parts: list[tuple[list[int], list[int]]] = []
    everywhere: dict[str, list[tuple[int, tuple[list[int], list[int]]]]] = {}  # positions=all: full forwards
    for variant, steering in steerings.items():
        if len(answers[variant]) != len(questions):
            raise ValueError(f"{variant}: {len(answers[variant])} answers for {len(questions)} questions; pass one "
                             "answer per question")
        out[variant] = [None] * len(questions)
        for i, (q, a) in enumerate(zip(questions, answers[variant], strict=True)):
            prompt, answer = prompt_answer_ids(tokenizer, prompt_of[q], answer_text(a, fmt), max_length) \
                if a.strip() else ([], [])
            answer = answer[:max_tokens] if max_tokens else answer
            if not answer:
                continue
            if not steering.steers:
                out[variant][i] = 0.0  # nothing moves: no forward
            elif steering.positions == "all":
                everywhere.setdefault(variant, []).append((i, (prompt, answer)))
            else:
                rows.append((variant, i))
                parts.append((prompt, answer))
    for variant, items in everywhere.items():
        _full_forward_kl(loaded, steerings[variant], [p for _, p in items], [i for i, _ in items], out[variant],
                         batch_size)
    by_question = list(dict.fromkeys(questions))
    for start in range(0, len(by_question), batch_size):  # a chunk of prompts at a time bounds the cache's memory
        chunk = set(by_question[start:start + batch_size])
        mine = [r for r, (_, i) in enumerate(rows) if questions[i] in chunk]
        if not mine:
            continue
        seqs = Sequences(tuple(tuple(parts[r][0] + parts[r][1]) for r in mine), tuple(len(parts[r][1]) for r in mine), 1)
        splits = [len(parts[r][0]) - 1 for r in mine]
        cache = PrefixCache.of_prefixes(loaded.model, seqs, splits, tokenizer.pad_token_id, batch_size)
        for variant, steering in steerings.items():
            own = sorted((k for k, r in enumerate(mine) if rows[r][0] == variant),
                         key=lambda k: -len(seqs.token_ids[k]) + splits[k])  # by suffix length
            for at in range(0, len(own), batch_size):
                batch_rows = own[at:at + batch_size]
                batch = cache.batch(batch_rows)
                unedited = steering.last_unedited_layer(len(decoder_layers(loaded.model)))
                if unedited >= 0:  # both passes share the layers up to it: they run once
                    batch = with_layer_output(loaded.model, batch, unedited)
                predicts = batch.answer_mask[:, 1:].bool()  # (batch, S - 1)
                prefix_end = torch.full((len(batch_rows),), batch.prefix_width, device=batch.input_ids.device)
                unsteered, _ = _suffix_states(loaded, batch, predicts, contextlib.nullcontext)  # type: ignore[arg-type]
                steered, count = _suffix_states(loaded, batch, predicts,
                                                functools.partial(steering.applied, loaded.model, prefix_end))
                check_steered(count, steering.expected_steered(prefix_end, batch.attention_mask.shape[1]),
                              f"answer KL of {len(batch_rows)} answers by {variant}")
                kl = _kl_ce(loaded.model, unsteered, steered, None)[0]
                _per_row(kl, predicts, [rows[mine[k]][1] for k in batch_rows], out[variant])
    return out


def _per_row(kl: Tensor, predicts: Tensor, indices: Sequence[int], out: list[float | None]) -> None:
    """Write each row's mean of the ``(n_tokens,)`` ``kl`` into ``out[indices[row]]``."""
    owner = predicts.nonzero()[:, 0]  # (n_tokens,)
    for r, i in enumerate(indices):
        out[i] = float(kl[owner == r].double().mean())


def _full_forward_kl(loaded: LoadedModel, steering: Steering, parts: Sequence[tuple[list[int], list[int]]],
                     indices: Sequence[int], out: list[float | None], batch_size: int) -> None:
    """``answer_kl`` by full forwards (prompt included), for ``positions=all``, which steers the prompt too."""
    model, pad_id = loaded.model, loaded.tokenizer.pad_token_id
    seqs = Sequences(tuple(tuple(p + a) for p, a in parts), tuple(len(a) for _, a in parts), 1)
    for start in range(0, len(parts), batch_size):
        chunk = list(range(start, min(start + batch_size, len(parts))))
        batch = make_batch(seqs, chunk, pad_id).to(loaded.device)
        position_ids = (batch.attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (batch, seq); left padding
        predicts = batch.answer_mask[:, 1:].bool()  # (batch, seq - 1)
        base: Any = model.base_model
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": position_ids}
        unsteered = base(**kwargs).last_hidden_state[:, :-1][predicts]  # (n_tokens, d_model)
        with steering.applied(model, batch.prompt_end) as count:
            steered = base(**kwargs).last_hidden_state[:, :-1][predicts]  # (n_tokens, d_model)
        check_steered(count, steering.expected_steered(batch.prompt_end, batch.input_ids.shape[1]),
                      f"answer KL of {len(chunk)} answers by {steering.variant}")
        _per_row(_kl_ce(model, unsteered, steered, None)[0], predicts, [indices[r] for r in chunk], out)


EFFECT_METRICS = ("kl_neutral", "ce_neutral_delta", "kl_answers")  # each with _ci_low and _ci_high
EFFECT_DIRECTIONS = {m: False for m in (*EFFECT_METRICS, "ce_neutral")}
NEUTRAL_COSTS = ("kl_neutral", "ce_neutral_delta")  # what a setting costs on neutral text alone (tune's trials)  # lower is better: what steering costs


def effect_metrics(neutral: Sequence[Mapping[str, float]], answers: Sequence[float | None], *, n_bootstrap: int,
                   confidence: float, seed: int) -> dict[str, float]:
    """A variant's side-effect metrics with bootstrap intervals (over passages, and over answers).

    ``kl_neutral``: mean over passages of their mean KL; ``ce_neutral_delta``: mean over passages of the
    steered minus the unsteered cross-entropy (nats per token); ``ce_neutral``: the steered cross-entropy;
    ``kl_answers``: mean over the answers of their mean KL (empty answers left out). All 0 for baseline.

    Args:
        neutral: ``neutral_effects``' rows of the variant.
        answers: ``answer_kl``'s values of the variant.
        n_bootstrap: bootstrap resamples.
        confidence: interval coverage.
        seed: bootstrap seed.
    """
    from evaluation.statistics import bootstrap_ci

    values: dict[str, Sequence[float | None]] = {
        "kl_neutral": [r["kl"] for r in neutral],
        "ce_neutral_delta": [r["ce_steered"] - r["ce_unsteered"] for r in neutral],
        "kl_answers": answers,
    }
    out: dict[str, float] = {}
    for name, xs in values.items():
        mean, low, high = bootstrap_ci(xs, n_bootstrap, confidence, seed)
        out |= {name: mean, f"{name}_ci_low": low, f"{name}_ci_high": high}
    out["ce_neutral"] = math.fsum(r["ce_steered"] for r in neutral) / len(neutral) if neutral else math.nan
    return out


def measure_effects(cfg: Config, loaded: LoadedModel, steerings: Mapping[str, Steering], questions: Sequence[str],
                    answers: Mapping[str, Sequence[str]]) -> tuple[dict[str, dict[str, float]], dict[str, list[float | None]]]:
    """Every variant's ``effect_metrics`` (on ``cfg.effects``' passages and its own answers) and per-answer KL.

    Args:
        cfg: the run's config (``effects``; ``eval`` for the intervals and batch size; ``extract.max_length``).
        loaded: the model.
        steerings: the variants' steerings.
        questions: the question texts, one per answer.
        answers: variant -> its answers (the generated text), in ``questions``' order.
    """
    from core.corpus import NEUTRAL_CORPUS, load_passages

    passages = load_passages(cfg.effects.corpus or NEUTRAL_CORPUS, cfg.effects.n_passages)
    neutral = neutral_effects(loaded, steerings, [p.text for p in passages], batch_size=cfg.effects.batch_size,
                              max_tokens=cfg.effects.max_tokens)
    per_answer = answer_kl(loaded, steerings, questions, answers, batch_size=cfg.eval.batch_size,
                           max_length=cfg.extract.max_length, max_tokens=cfg.effects.answer_tokens)
    metrics = {v: effect_metrics(neutral[v], per_answer[v], n_bootstrap=cfg.eval.n_bootstrap,
                                 confidence=cfg.eval.confidence, seed=cfg.eval.seed) for v in steerings}
    return metrics, per_answer


__all__ = ["EFFECT_DIRECTIONS", "EFFECT_METRICS", "NEUTRAL_COSTS", "NEUTRAL_FIELDS", "answer_kl", "effect_metrics", "measure_effects", "neutral_effects",
           "token_kl"]
