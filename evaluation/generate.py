"""Batched, left-padded, steered generation.

``generate_batch`` answers a batch of questions together: prompts are left-padded
(``steering.prompts.encode_prompts``) so that every row's prompt ends at the same index, and the
variant's steering (``Steering``) is active for every forward, with the KV cache. The prompts' tokens
before the last one are never steered (from the last prompt token on), so they are prefilled unsteered
(``evaluation.prefill.prefill_prompts``: in groups of similar length, into a static cache of the prompts'
width) and decoding starts from a copy of it with room for the answers (``PromptPrefill.decoding_cache``).
Decoding is greedy unless ``eval.do_sample``. Greedy decoding is a loop of our own (``evaluation.decode``):
a row that has stopped leaves the batch and its cache (``evaluation.decode.drop_rows``), so the rest decode
fewer rows; ``generate`` would go on feeding padding through every stopped row until the last one stops.
Sampling goes through ``model.generate``, seeded per batch. An answer is the decoded new tokens, cut at
the first end-of-turn token (and, for ``Q:/A:`` prompts, before the model starts a next ``Q:``), stripped
(``evaluation.answers``).

Answers go to a ``evaluation.generation_store.GenerationStore``; ``generate_missing`` (one variant) and
``generate_missing_variants`` (batch by batch, every variant in turn, one prefill per batch) generate only
the answers it lacks, so a killed evaluation restarts without regenerating anything it wrote. With
``eval.decode_rows``, a batch's greedy variants decode together (``generate_together``: each question's row
once per variant, each variant's hooks on its own rows), as many as fit in that many rows.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from core import profile
from core.config import EvalConfig
from core.data import Question
from core.models import LoadedModel, trim_heap
from evaluation.answers import END_OF_TURN_TOKENS, QA_NEXT_TURN, Answer, decode_answer, stop_token_ids
from evaluation.attention import decode_attention
from evaluation.decode import greedy_decode, greedy_processors
from evaluation.generation_store import GenerationStore
from evaluation.linear import available_bytes, onednn_linears
from evaluation.prefill import PromptPrefill, prefill_prompts
from steering.cache import with_cache
from steering.hooks import check_steered
from steering.methods.intervention import Steering
from steering.prompts import encode_prompts, format_prompt


class _FirstTokenClock(StoppingCriteria):
    """Notes when ``generate`` picked its first token (the end of the prompts' prefill); stops nothing."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (batch,)


def _sampling_seed(seed: int, batch_index: int) -> int:
    return (seed * 1_000_003 + batch_index) % (2**63)


def starts_from_prefill(steering: Steering) -> bool:
    """Whether ``steering`` leaves every prompt token before the last unsteered, so that its generation starts
    from the batch's shared ``PromptPrefill`` (steering from the prompt's end on, or none)."""
    return steering.positions == "from_prompt_end" or not steering.steers


def together(decoding: EvalConfig, rows: int) -> int:
    """How many variants decode a batch of ``rows`` questions together: ``eval.decode_rows // rows`` (at least one)."""
    return max(1, decoding.decode_rows // max(1, rows))


def _fitting(prefill: PromptPrefill | None, size: int, rows: int, max_new_tokens: int) -> int:
    """``size`` variants decoding ``rows`` questions together, fewer where their decoding caches (each the
    prefill's keys/values per row, with room for ``max_new_tokens`` more positions) would take over half the
    memory the system has available (``evaluation.linear.available_bytes``), as the laid-out weights are bounded."""
    available = available_bytes()
    if prefill is None or available is None:
        return size
    layers: Any = prefill.cache.layers
    width = max(1, int(prefill.cache.get_seq_length()))
    per_row = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers) / rows * (width + max_new_tokens) / width
    fits = max(1, int(available // 2 // max(1.0, per_row * rows)))
    if fits < size:
        print(f"eval.decode_rows: {fits} variant(s) at a time instead of {size}: their decoding caches "
              f"({size * rows * per_row / 2**30:.1f} GiB) would take over half the memory available "
              f"({available / 2**30:.1f} GiB)")
    return min(size, fits)


def decodes_together(loaded: LoadedModel, steering: Steering, decoding: EvalConfig) -> bool:
    """Whether ``steering``'s answers can be decoded in one batch with other variants' (``generate_together``):
    greedy decoding that is a plain argmax (not sampling, no ``greedy_processors``) from the batch's shared
    ``PromptPrefill`` (``starts_from_prefill``)."""
    return not decoding.do_sample and not greedy_processors(loaded.model) and starts_from_prefill(steering)


def generate_batch(
    loaded: LoadedModel,
    questions: Sequence[str],
    steering: Steering,
    decoding: EvalConfig,
    *,
    batch_index: int = 0,
    prefill: PromptPrefill | None = None,
    last_use: bool = False,
) -> list[Answer]:
    """Answer ``questions`` as one steered batch: ``greedy_decode`` (each row leaves the batch when it stops), or
    one ``model.generate`` call when sampling (or when the model's generation config adds a logits processor
    to greedy search, ``greedy_processors``).

    Unless steering starts before the last prompt token (``positions=all``), the prompts' tokens before
    it come from their unsteered ``PromptPrefill`` (``prefill``, or computed here), and decoding runs
    from the last prompt token on. Always the same path, so an answer never depends on whether other
    variants shared the prefill.

    Args:
        loaded: the model, its tokenizer and prompt format.
        questions: question texts, formatted with ``format_prompt``.
        steering: the variant's steering, active during the whole call.
        decoding: decoding settings (``batch_size`` is not used here).
        batch_index: the batch's place in its variant, which seeds sampling.
        prefill: ``prefill_prompts(loaded, questions)``, shared by several variants (copied; used up under ``last_use``).
        last_use: no later variant needs ``prefill``: it is used up as it is copied (``decoding_cache``).
    """
    return _generate(loaded, questions, [steering], decoding, batch_index, prefill, last_use)[0]


def generate_together(
    loaded: LoadedModel,
    questions: Sequence[str],
    steerings: Sequence[Steering],
    decoding: EvalConfig,
    *,
    prefill: PromptPrefill | None = None,
    last_use: bool = False,
) -> list[list[Answer]]:
    """Answer ``questions`` once under each of ``steerings`` in one greedy decoding: each question's row is
    there once per steering (``len(questions) * len(steerings)`` rows), each steering edits its own rows
    (``greedy_decode``), and all start from one copy per steering of the prompts' ``PromptPrefill``. The
    answers equal ``generate_batch``'s for each steering alone (fp32: ``tests/test_oracles.py``), and each
    steering's edits are checked on its own rows (``check_steered``).

    Args:
        loaded: the model, its tokenizer and prompt format.
        questions: question texts, formatted with ``format_prompt``.
        steerings: the variants' steerings, each ``decodes_together``.
        decoding: decoding settings (``batch_size`` and ``decode_rows`` are not used here).
        prefill: ``prefill_prompts(loaded, questions)``, shared by several variants (copied; used up under ``last_use``).
        last_use: no later variant needs ``prefill``: it is used up as it is copied (``decoding_cache``).

    Returns:
        Per steering, in order, the answers of ``questions``.
    """
    apart = [s.variant for s in steerings if not decodes_together(loaded, s, decoding)]
    if apart:
        raise ValueError(f"{', '.join(apart)} cannot decode together with other variants: only greedy decoding "
                         "from the prompts' end on does; answer it with generate_batch")
    return _generate(loaded, questions, steerings, decoding, 0, prefill, last_use)


def _generate(loaded: LoadedModel, questions: Sequence[str], steerings: Sequence[Steering], decoding: EvalConfig,
              batch_index: int, prefill: PromptPrefill | None, last_use: bool) -> list[list[Answer]]:
    """``generate_batch`` of one steering, or ``generate_together`` of several (rows ``r * k .. r * k + k - 1``
    answer question ``r``, one per steering)."""
    if not questions:
        return [[] for _ in steerings]
    tokenizer, model = loaded.tokenizer, loaded.model
    k = len(steerings)
    prompts = [format_prompt(q, tokenizer, loaded.prompt_format) for q in questions]
    encoded = encode_prompts(tokenizer, prompts)
    input_ids = encoded["input_ids"].to(loaded.device).repeat_interleave(k, dim=0)  # (batch, seq)
    attention_mask = encoded["attention_mask"].to(loaded.device).repeat_interleave(k, dim=0)  # (batch, seq)
    batch, width = input_ids.shape
    # Left padding: every prompt's last token sits at the last index.
    prompt_end = torch.full((batch,), width - 1, dtype=torch.long, device=loaded.device)  # (batch,)
    stop_ids = stop_token_ids(tokenizer, model)
    with onednn_linears(model, loaded.device):  # a no-op where the caller has switched them already
        cache = None
        if all(starts_from_prefill(s) for s in steerings):
            if prefill is None or not prefill.fits(questions, decoding.max_new_tokens):
                with profile.step("generate.prompts"):
                    prefill, last_use = prefill_prompts(loaded, questions, decoding.max_new_tokens), True
            if prefill is not None:
                cache = prefill.decoding_cache(last_use, copies=k)
        started = time.perf_counter()
        if not decoding.do_sample and not greedy_processors(model):
            with decode_attention(model, loaded.device):  # nothing prefilled (steering from the first token on): a fresh cache
                decoded = greedy_decode(model, input_ids, attention_mask,
                                        cache if cache is not None else DynamicCache(config=model.config), steerings,
                                        prompt_end, decoding.max_new_tokens, stop_ids, tokenizer.pad_token_id)
            new, counts, expected, first = decoded.new_ids, decoded.counts, decoded.expected, decoded.first
        else:
            (steering,) = steerings  # generate_together decodes greedily only
            options: dict[str, Any] = {"max_new_tokens": decoding.max_new_tokens, "do_sample": decoding.do_sample,
                                       "pad_token_id": tokenizer.pad_token_id, "eos_token_id": stop_ids,
                                       **(with_cache(model, cache) if cache is not None else {})}
            if decoding.do_sample:
                options.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
            devices = [loaded.device] if loaded.device.type == "cuda" else []
            clock = _FirstTokenClock()
            with (torch.inference_mode(), torch.random.fork_rng(devices=devices), decode_attention(model, loaded.device),
                  steering.applied(model, prompt_end) as count):
                torch.manual_seed(_sampling_seed(decoding.seed, batch_index))
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                        stopping_criteria=StoppingCriteriaList([clock]), **options)  # (batch, seq + new)
            new = output[:, width:]  # (batch, new)
            first = clock.at if clock.at is not None else time.perf_counter()
            # Prefill runs the prompt, then every new token but the last is fed back: width + n_new - 1 positions a row.
            counts, expected = [count], [steering.expected_steered(prompt_end, width + new.shape[1] - 1)]
        finished = time.perf_counter()
        profile.add("generate.prefill", first - started)
        profile.add("generate.decode", finished - first)
    n_new = new.shape[1]
    new_ids = new.tolist()  # (batch, new)
    out = []
    for i, steering in enumerate(steerings):
        check_steered(counts[i], expected[i],
                      f"generation of {len(questions)} answers ({n_new} new tokens at most) by {steering.variant}")
        answers = [decode_answer(tokenizer, row, stop_ids, loaded.prompt_format) for row in new_ids[i::k]]
        if steering.steers:  # checked above: the state predicting each new token was steered
            answers = [dataclasses.replace(a, steered_tokens=min(n_new, a.n_new_tokens + (not a.truncated)))
                       for a in answers]
        out.append(answers)
    return out


def generation_order(loaded: LoadedModel, questions: Sequence[Question]) -> list[Question]:
    """Questions by prompt length (longest first: the largest batch comes first, so an out-of-memory
    error shows at once), then id; batches of similar lengths waste little on padding.

    Args:
        loaded: the model (its tokenizer and prompt format).
        questions: the questions to order.
    """
    lengths = {q.id: len(loaded.tokenizer(format_prompt(q.question, loaded.tokenizer, loaded.prompt_format),
                                          add_special_tokens=False)["input_ids"]) for q in questions}
    return sorted(questions, key=lambda q: (-lengths[q.id], q.id))


def generate_missing(
    loaded: LoadedModel,
    questions: Sequence[Question],
    steering: Steering,
    decoding: EvalConfig,
    store: GenerationStore,
    key_hash: str,
    *,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Generate the answers ``store`` lacks for one variant: ``generate_missing_variants`` with one.

    Args:
        loaded: the model.
        questions: the questions to answer.
        steering: the variant's steering.
        decoding: decoding settings; ``batch_size`` questions per call.
        store: where finished answers are kept.
        key_hash: ``variant_hash(...)`` of this variant.
        progress: show a tqdm bar.
        on_batch: called with the number of answers after each stored batch.

    Returns:
        The records of every question, in the order of ``questions``, and how many were generated now.
    """
    done = generate_missing_variants(loaded, questions, {steering.variant: (steering, key_hash)}, decoding, store,
                                     progress=progress, on_batch=on_batch)
    return done[steering.variant]


def generate_missing_variants(
    loaded: LoadedModel,
    questions: Sequence[Question],
    variants: Mapping[str, tuple[Steering, str]],
    decoding: EvalConfig,
    store: GenerationStore,
    *,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, tuple[list[dict[str, Any]], int]]:
    """Generate the answers ``store`` lacks for each variant, appending each batch as it finishes.

    Batches are fixed chunks of ``generation_order(questions)``: a restarted run meets the same
    batches (and sampling seeds) and generates only the rows not yet stored. Each batch is answered by
    every variant in turn, so its prompts' ``PromptPrefill`` is computed once for all the variants that
    need the whole batch; what is kept at a time is one batch's (``eval.batch_size`` prompts). With
    ``eval.decode_rows``, those of them that ``decodes_together`` decode in groups of
    ``decode_rows // len(batch)`` (``generate_together``: the same answers, more rows per product, and a
    decoding cache of as many rows; fewer where those caches would take over half the memory available). On a CPU the model's linear weights are held laid out for oneDNN's
    products of that many rows meanwhile (``evaluation.linear.onednn_linears``' ``laid_out_rows``: a copy of
    them, dropped when it returns), and each group's decoding cache is handed back to the system before the
    next (``core.models.trim_heap``).

    Args:
        loaded: the model.
        questions: the questions to answer.
        variants: variant -> its steering and ``variant_hash(...)``.
        decoding: decoding settings; ``batch_size`` questions per call.
        store: where finished answers are kept.
        progress: show a tqdm bar.
        on_batch: called with the number of answers after each stored batch.

    Returns:
        Per variant the records of every question, in the order of ``questions``, and how many were generated now.
    """
    ordered = generation_order(loaded, questions)
    chunks = [ordered[i:i + decoding.batch_size] for i in range(0, len(ordered), decoding.batch_size)]
    missing = sum((q.id, s.variant, key) not in store for s, key in variants.values() for q in questions)
    n_generated = dict.fromkeys(variants, 0)
    names = ", ".join(variants)
    # the most rows a product multiplies at once: a batch's, or decode_rows' where variants decode together
    rows = max(1, min(len(ordered), decoding.batch_size)) * max(1, min(len(variants), together(decoding, decoding.batch_size)))
    with (tqdm(total=missing, desc=f"generate {names}", unit="answer", disable=not progress) as bar,
          onednn_linears(loaded.model, loaded.device, laid_out_rows=rows if missing else None)):  # the prompts' prefill too
        for index, chunk in enumerate(chunks):
            prefill: PromptPrefill | None = None
            todos = {variant: [q for q in chunk if (q.id, steering.variant, key) not in store]
                     for variant, (steering, key) in variants.items()}
            # the variants that decode from the whole batch's prefill: the last of them uses it up
            sharing = [v for v, (steering, _) in variants.items() if len(todos[v]) == len(chunk)
                       and starts_from_prefill(steering)]
            # those that decode together, decode_rows // len(chunk) at a time; the others one by one
            size = together(decoding, len(chunk))
            joint = [v for v in sharing if decodes_together(loaded, variants[v][0], decoding)] if size > 1 else []
            if len(joint) > 1:  # the prefill first: what a row's decoding cache takes bounds the group
                with profile.step("generate.prompts"):
                    prefill = prefill_prompts(loaded, [q.question for q in chunk], decoding.max_new_tokens)
                size = _fitting(prefill, size, len(chunk), decoding.max_new_tokens)
            groups = [joint[i:i + size] for i in range(0, len(joint), size)]
            groups += [[v] for v in variants if todos[v] and v not in joint]
            for group in groups:
                texts = [q.question for q in todos[group[0]]]
                if group[0] in sharing and prefill is None:
                    with profile.step("generate.prompts"):
                        prefill = prefill_prompts(loaded, texts, decoding.max_new_tokens)
                last_use = bool(sharing) and sharing[-1] in group
                if len(group) > 1:
                    answered = generate_together(loaded, texts, [variants[v][0] for v in group], decoding,
                                                 prefill=prefill, last_use=last_use)
                else:
                    answered = [generate_batch(loaded, texts, variants[group[0]][0], decoding, batch_index=index,
                                               prefill=prefill if group[0] in sharing else None, last_use=last_use)]
                # the group's decoding cache, before the next group's: freed as generation returns (no
                # garbage collection needed, and a full one takes ~0.3 s), but glibc keeps the pages mapped
                trim_heap()
                for variant, answers in zip(group, answered, strict=True):
                    steering, key = variants[variant]
                    todo = todos[variant]
                    store.append([
                        {"qid": q.id, "variant": steering.variant, "variant_hash": key, "question": q.question,
                         "answer": a.text, "raw_answer": a.raw, "n_new_tokens": a.n_new_tokens,
                         "truncated": a.truncated, "steered_tokens": a.steered_tokens}
                        for q, a in zip(todo, answers, strict=True)
                    ])
                    n_generated[variant] += len(todo)
                    bar.update(len(todo))
                    if on_batch is not None:
                        on_batch(len(todo))
    out: dict[str, tuple[list[dict[str, Any]], int]] = {}
    for variant, (steering, key) in variants.items():
        records = []
        for q in questions:
            record = store.get((q.id, steering.variant, key))
            if record is None:  # another writer may have dropped it; never silently leave a gap
                raise RuntimeError(f"{store.path}: no answer for question {q.id} after generation")
            records.append(record)
        out[variant] = records, n_generated[variant]
    return out


__all__ = ['END_OF_TURN_TOKENS', 'QA_NEXT_TURN', 'Answer', 'decode_answer', 'decodes_together', 'generate_batch', 'generate_missing',
           'generate_missing_variants', 'generate_together', 'generation_order', 'starts_from_prefill',
           'stop_token_ids', 'together']
