"""Batched, left-padded, steered generation.

``generate_batch`` answers a batch of questions together: prompts are left-padded
(``steering.prompts.encode_prompts``) so that every row's prompt ends at the same index, and the
variant's steering (``Steering``) is active for every forward, with the KV cache. The prompts' tokens
before the last one are never steered (from the last prompt token on), so they are prefilled unsteered
(``evaluation.prefill.prefill_prompts``: in groups of similar length, into a static cache with room for
the answers) and decoding starts from a copy of that cache.
Decoding is greedy unless ``eval.do_sample``. Greedy decoding is a loop of our own (``greedy_decode``):
a row that has stopped leaves the batch and its cache (``Cache.reorder_cache``), so the rest decode
fewer rows; ``generate`` would go on feeding padding through every stopped row until the last one stops.
Sampling goes through ``model.generate``, seeded per batch. An answer is the decoded new tokens, cut at
the first end-of-turn token (and, for ``Q:/A:`` prompts, before the model starts a next ``Q:``), stripped.

Answers go to a ``evaluation.generation_store.GenerationStore``; ``generate_missing`` (one variant) and
``generate_missing_variants`` (batch by batch, every variant in turn, one prefill per batch) generate only
the answers it lacks, so a killed evaluation restarts without regenerating anything it wrote.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from core import profile
from core.config import EvalConfig
from core.data import Question
from core.models import LoadedModel
from evaluation.generation_store import GenerationStore
from evaluation.prefill import PromptPrefill, prefill_prompts
from steering.cache import with_cache
from steering.hooks import SteeredCount, check_steered
from steering.methods.intervention import Steering
from steering.prompts import PromptFormat, encode_prompts, format_prompt

# Tokens that end an assistant turn in the chat templates of the supported families (Gemma,
# SmolLM2/ChatML, Llama-3), whichever of them the tokenizer knows; its EOS always counts.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<eos>")
QA_NEXT_TURN = "\nQ:"  # a base model answering `Q: ...\nA:` goes on to invent the next question




def stop_token_ids(tokenizer: Any, model: nn.Module | None = None) -> list[int]:
    """Ids that end an answer: EOS, the generation config's EOS ids and known end-of-turn tokens.

    Args:
        tokenizer: the model's tokenizer.
        model: the model, for its ``generation_config.eos_token_id``.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, list | tuple) else [configured]))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[token]) for token in END_OF_TURN_TOKENS if token in vocab)
    return sorted(ids)


@dataclasses.dataclass(frozen=True)
class Answer:
    """One generated answer.

    Args:
        text: the answer: new tokens up to the end of turn, decoded and stripped.
        raw: every new token decoded, special tokens included (for debugging prompts).
        n_new_tokens: tokens up to (not including) the end of turn.
        truncated: True when ``max_new_tokens`` ran out before the end of turn.
        steered_tokens: the answer's tokens (the end-of-turn token included) predicted from a
            steered state; ``generate_batch`` checks that the hook edited every position it should,
            so for a steered variant this is every one of them, 0 for baseline. Not compared.
    """

    text: str
    raw: str
    n_new_tokens: int
    truncated: bool
    steered_tokens: int = dataclasses.field(default=0, compare=False)


def decode_answer(tokenizer: Any, new_ids: Sequence[int], stop_ids: Sequence[int], fmt: PromptFormat) -> Answer:
    """Cut generated ids at the first stop id, decode, cut a ``Q:/A:`` answer before a next ``Q:``.

    Args:
        tokenizer: the model's tokenizer.
        new_ids: the generated token ids (padding after the end included).
        stop_ids: ``stop_token_ids`` of the model.
        fmt: the prompt format, ``chat`` or ``qa``.
    """
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(new_ids) if t in stops), None)
    kept = list(new_ids[:end]) if end is not None else list(new_ids)
    text = tokenizer.decode(kept, skip_special_tokens=True)
    truncated = end is None
    if fmt == "qa" and QA_NEXT_TURN in text:
        text, truncated = text.split(QA_NEXT_TURN, 1)[0], False
    raw = tokenizer.decode(list(new_ids), skip_special_tokens=False)
    return Answer(text=text.strip(), raw=raw, n_new_tokens=len(kept), truncated=truncated)


class _FirstTokenClock(StoppingCriteria):
    """Notes when ``generate`` picked its first token (the end of the prompts' prefill); stops nothing."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (batch,)


def decode_attention(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The scaled-dot-product attention kernel for decoding on ``device``: on a CPU, PyTorch's math kernel,
    whose matmuls serve one query token per row better than its flash kernel (about 2 ms a layer for the
    smoke batch of 80 rows, a fifth of a decode step: ``benchmarks.generate``); elsewhere PyTorch's choice.
    Both compute the same attention; greedy answers were identical on the smoke test split."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()


# generation_config fields under which greedy decoding is not a plain argmax (transformers adds a logits
# processor for each): a model whose config sets one of them decodes through ``model.generate``.
GREEDY_PROCESSORS = ("repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
                     "min_length", "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
                     "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
                     "guidance_scale", "epsilon_cutoff", "eta_cutoff")
_NEUTRAL = {"repetition_penalty": 1.0, "guidance_scale": 1.0, "min_length": 0, "min_new_tokens": 0,
            "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def greedy_processors(model: nn.Module) -> list[str]:
    """The ``GREEDY_PROCESSORS`` that ``model``'s generation config sets (empty: greedy is a plain argmax)."""
    config = getattr(model, "generation_config", None)
    return [name for name in GREEDY_PROCESSORS
            if getattr(config, name, None) not in (None, _NEUTRAL.get(name), [], ())]


@dataclasses.dataclass
class Decoded:
    """What ``greedy_decode`` produced.

    Args:
        new_ids: ``(batch, n_new)`` new tokens, padding after a row's stop token.
        count: the positions the steering hooks edited, over every forward.
        expected: the positions they must have edited: from each row's start on, for the forwards it took part in.
        first: ``time.perf_counter()`` when the first new token was picked (the end of the prompts' prefill).
    """

    new_ids: torch.Tensor
    count: SteeredCount
    expected: int
    first: float


@torch.inference_mode()
def greedy_decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any,
                  steering: Steering, prompt_end: torch.Tensor, max_new_tokens: int, stop_ids: Sequence[int],
                  pad_id: int) -> Decoded:
    """Greedy new tokens of left-padded prompts under ``steering``, a row leaving the batch when it stops.

    ``cache`` holds the prompts' first positions (``PromptPrefill``: all but the last token; an empty cache:
    none); the first forward runs the rest of the prompts, each later one the tokens just picked. The rows
    still answering keep their place in the cache; a row that picked a stop id is dropped from the batch
    and from the cache. The same tokens as ``model.generate``'s greedy search, which keeps every row to the
    end; position ids count each row's own tokens, as ``generate`` counts them for left-padded rows.

    Args:
        model: the causal LM; ``greedy_processors(model)`` must be empty.
        input_ids: ``(batch, width)`` left-padded prompts.
        attention_mask: ``(batch, width)``.
        cache: a ``transformers.Cache`` holding the prompts' first ``cache.get_seq_length()`` positions.
        steering: the variant's steering, from ``prompt_end`` on (or everywhere).
        prompt_end: ``(batch,)`` index of each row's last prompt token.
        max_new_tokens: new tokens at most.
        stop_ids: ids that end an answer (``stop_token_ids``).
        pad_id: the id after a row's stop.
    """
    batch, width = input_ids.shape
    device = input_ids.device
    rows = torch.arange(batch, device=device)  # (rows,) the rows still answering
    new_ids = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (batch, max_new)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)  # (n_stops,)
    seen = int(cache.get_seq_length())
    step_ids = input_ids[:, seen:]  # (rows, width - seen): the prompts' rest, then one token a step
    positions = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)[:, seen:]  # (rows, width - seen)
    mask = attention_mask  # (rows, fed)
    count = SteeredCount()
    expected, first, n_new = 0, 0.0, 0
    for step in range(max_new_tokens):
        fed = mask.shape[1]  # positions 0 .. fed - 1 have run once this forward is done
        starts = prompt_end[rows]  # (rows,)
        with steering.applied(model, starts) as edited:
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **with_cache(model, cache)).logits[:, -1]  # (rows, vocab)
        count.add(edited.total)
        # this forward fed positions fed - step_ids.shape[1] .. fed - 1: the hook must edit those from each row's start
        expected += steering.expected_steered(starts, fed) - steering.expected_steered(starts, fed - step_ids.shape[1])
        token = logits.argmax(dim=-1)  # (rows,)
        new_ids[rows, step] = token
        n_new = step + 1
        if step == 0:
            first = time.perf_counter()
        going = ~torch.isin(token, stops)  # (rows,)
        if n_new == max_new_tokens or not bool(going.any()):
            break
        if not bool(going.all()):  # stopped rows leave the batch and the cache
            keep = going.nonzero()[:, 0]  # (kept,)
            cache.reorder_cache(keep)
            rows, token, mask, positions = rows[keep], token[keep], mask[keep], positions[keep]
        step_ids = token[:, None]  # (rows, 1)
        positions = positions[:, -1:] + 1  # (rows, 1)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)  # (rows, fed + 1)
    return Decoded(new_ids[:, :n_new], count, expected, first)


def _sampling_seed(seed: int, batch_index: int) -> int:
    return (seed * 1_000_003 + batch_index) % (2**63)


def generate_batch(
    loaded: LoadedModel,
    questions: Sequence[str],
    steering: Steering,
    decoding: EvalConfig,
    *,
    batch_index: int = 0,
    prefill: PromptPrefill | None = None,
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
        prefill: ``prefill_prompts(loaded, questions)``, shared by several variants (copied, not changed).
    """
    if not questions:
        return []
    tokenizer, model = loaded.tokenizer, loaded.model
    prompts = [format_prompt(q, tokenizer, loaded.prompt_format) for q in questions]
    encoded = encode_prompts(tokenizer, prompts)
    input_ids = encoded["input_ids"].to(loaded.device)  # (batch, seq)
    attention_mask = encoded["attention_mask"].to(loaded.device)  # (batch, seq)
    batch, width = input_ids.shape
    # Left padding: every prompt's last token sits at the last index.
    prompt_end = torch.full((batch,), width - 1, dtype=torch.long, device=loaded.device)  # (batch,)
    stop_ids = stop_token_ids(tokenizer, model)
    cache = None
    if steering.positions == "from_prompt_end" or not steering.steers:
        if prefill is None or not prefill.fits(questions, decoding.max_new_tokens):
            with profile.step("generate.prompts"):
                prefill = prefill_prompts(loaded, questions, decoding.max_new_tokens)
        if prefill is not None:
            cache = copy.deepcopy(prefill.cache)
    started = time.perf_counter()
    if not decoding.do_sample and not greedy_processors(model):
        with decode_attention(loaded.device):  # nothing prefilled (steering from the first token on): a fresh cache
            decoded = greedy_decode(model, input_ids, attention_mask, cache or DynamicCache(config=model.config),
                                    steering, prompt_end, decoding.max_new_tokens, stop_ids, tokenizer.pad_token_id)
        new, count, expected, first = decoded.new_ids, decoded.count, decoded.expected, decoded.first
    else:
        options: dict[str, Any] = {"max_new_tokens": decoding.max_new_tokens, "do_sample": decoding.do_sample,
                                   "pad_token_id": tokenizer.pad_token_id, "eos_token_id": stop_ids,
                                   **(with_cache(model, cache) if cache is not None else {})}
        if decoding.do_sample:
            options.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
        devices = [loaded.device] if loaded.device.type == "cuda" else []
        clock = _FirstTokenClock()
        with (torch.inference_mode(), torch.random.fork_rng(devices=devices), decode_attention(loaded.device),
              steering.applied(model, prompt_end) as count):
            torch.manual_seed(_sampling_seed(decoding.seed, batch_index))
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                    stopping_criteria=StoppingCriteriaList([clock]), **options)  # (batch, seq + new)
        new = output[:, width:]  # (batch, new)
        first = clock.at if clock.at is not None else time.perf_counter()
        # Prefill runs the prompt, then every new token but the last is fed back: width + n_new - 1 positions a row.
        expected = steering.expected_steered(prompt_end, width + new.shape[1] - 1)
    finished = time.perf_counter()
    profile.add("generate.prefill", first - started)
    profile.add("generate.decode", finished - first)
    n_new = new.shape[1]
    check_steered(count, expected, f"generation of {batch} answers ({n_new} new tokens at most) by {steering.variant}")
    new_ids = new.tolist()  # (batch, new)
    answers = [decode_answer(tokenizer, row, stop_ids, loaded.prompt_format) for row in new_ids]
    if not steering.steers:
        return answers
    # Checked above: the state predicting each new token was steered.
    return [dataclasses.replace(a, steered_tokens=min(n_new, a.n_new_tokens + (not a.truncated))) for a in answers]


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
    need the whole batch; what is kept at a time is one batch's (``eval.batch_size`` prompts).

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
    with tqdm(total=missing, desc=f"generate {names}", unit="answer", disable=not progress) as bar:
        for index, chunk in enumerate(chunks):
            prefill: PromptPrefill | None = None
            for variant, (steering, key) in variants.items():
                todo = [q for q in chunk if (q.id, steering.variant, key) not in store]
                if not todo:
                    continue
                texts = [q.question for q in todo]
                if len(todo) == len(chunk) and prefill is None:
                    with profile.step("generate.prompts"):
                        prefill = prefill_prompts(loaded, texts, decoding.max_new_tokens)
                answers = generate_batch(loaded, texts, steering, decoding, batch_index=index, prefill=prefill)
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


__all__ = ['Answer', 'Decoded', 'GREEDY_PROCESSORS', 'decode_answer', 'decode_attention', 'generate_batch', 'generate_missing',
           'generate_missing_variants', 'generation_order', 'greedy_decode', 'greedy_processors', 'stop_token_ids']
