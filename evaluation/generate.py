"""Batched, left-padded, steered generation.

``generate_batch`` answers a batch of questions in one ``model.generate`` call: prompts are
left-padded (``steering.prompts.encode_prompts``) so that every row's prompt ends at the same
index, and the variant's steering (``Steering``) is active for the whole call, with the KV cache. The
prompts' tokens before the last one are never steered (from the last prompt token on), so they are
prefilled unsteered (``prefill_prompts``) and ``generate`` starts from a copy of that cache. The
prefill runs the prompts in groups of similar length (no forward computes much padding) and lays their
keys/values out in a ``StaticCache`` with room for the answers, which decoding fills in place rather than
concatenating a growing cache at every step (models whose sliding window is narrower than prompt and
answer keep one padded forward and a growing cache).
Decoding is greedy unless ``eval.do_sample``; sampling is seeded per batch. An answer is the
decoded new tokens, cut at the first end-of-turn token (and, for ``Q:/A:`` prompts, before the
model starts a next ``Q:``), stripped.

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
from transformers import Cache, DynamicCache, StaticCache, StoppingCriteria, StoppingCriteriaList

from core import profile
from core.config import EvalConfig
from core.data import Question
from core.models import LoadedModel
from evaluation.generation_store import GenerationStore
from steering.cache import output_cache, with_cache
from steering.hooks import check_steered
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


def _sampling_seed(seed: int, batch_index: int) -> int:
    return (seed * 1_000_003 + batch_index) % (2**63)


# Prefill groups: prompts sorted by length are cut where a group's shortest prompt would be padded by more
# than this share of its longest, so the prefill computes (almost) no padding: the smoke test split's 80
# prompts pad to 5,680 positions in one forward and to 3,577 in 6 groups, for 3,439 real tokens.
PREFILL_PADDING = 0.1


@dataclasses.dataclass(frozen=True)
class PromptPrefill:
    """The unsteered keys/values of a batch of prompts, all but their last token, left-padded as
    ``encode_prompts`` pads them: what every variant that steers from the last prompt token on (and
    baseline) computes the same way, so one batch's prompts run once for all variants.

    Args:
        questions: the batch's questions, in order (the prefill fits only this batch).
        cache: the KV cache of every layer over positions ``0 .. width - 2``; copy it before use.
        max_new_tokens: the new tokens the cache has room for after the prompts (a ``StaticCache``
            of ``width - 1 + max_new_tokens`` positions), or None for a ``DynamicCache`` that grows.
    """

    questions: tuple[str, ...]
    cache: Cache
    max_new_tokens: int | None = None

    def fits(self, questions: Sequence[str], max_new_tokens: int) -> bool:
        """Whether this prefill is that of ``questions`` for ``max_new_tokens`` new tokens (a static cache's
        room must be exact: its length is what attention runs over)."""
        return self.questions == tuple(questions) and self.max_new_tokens in (None, max_new_tokens)


def prefill_groups(lengths: Sequence[int], padding: float = PREFILL_PADDING) -> list[list[int]]:
    """Row indices in groups of similar prompt length, longest first: a group's shortest prompt is padded
    by at most ``padding`` times its longest (a group of one when no other fits).

    Args:
        lengths: each row's prompt length in tokens.
        padding: the largest share of a group's width that padding may fill in one row.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] - lengths[i] <= padding * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _sliding_window(model: nn.Module) -> int | None:
    config: Any = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "sliding_window", None)


@torch.inference_mode()
def prefill_prompts(loaded: LoadedModel, questions: Sequence[str], max_new_tokens: int | None = None) -> PromptPrefill | None:
    """The ``PromptPrefill`` of ``questions`` (None when the padded prompts are a single token).

    With ``max_new_tokens``, the prompts run in groups of similar length (``prefill_groups``: next to no
    padding is computed) and their keys/values are laid out left-padded in a ``StaticCache`` with room
    for ``max_new_tokens`` more positions, which decoding then writes in place instead of concatenating a
    growing cache at every step. The keys/values of a row do not depend on its group: a row's padding is
    masked and its position ids count its own tokens. Models with sliding-window layers narrower than the
    prompts plus the new tokens (and ``max_new_tokens=None``) get one forward over the padded batch into a
    ``DynamicCache``.

    Args:
        loaded: the model, its tokenizer and prompt format.
        questions: question texts, formatted with ``format_prompt``.
        max_new_tokens: the new tokens the cache must have room for, or None for a growing cache.
    """
    tokenizer, model = loaded.tokenizer, loaded.model
    prompts = [format_prompt(q, tokenizer, loaded.prompt_format) for q in questions]
    encoded = encode_prompts(tokenizer, prompts)
    width = encoded["input_ids"].shape[1]
    if width < 2:
        return None
    base: Any = model.base_model
    window = _sliding_window(model)
    if max_new_tokens is None or (window is not None and width - 1 + max_new_tokens > window):
        # the cache generate would make (sliding-window layers as the config says), filled by one forward
        cache = _prefill_forward(base, encoded, loaded.device, DynamicCache(config=model.config))
        return PromptPrefill(tuple(questions), cache)
    lengths = encoded["attention_mask"].sum(dim=1).tolist()
    static = StaticCache(config=model.config, max_cache_len=width - 1 + max_new_tokens)
    allocated = False
    for rows in prefill_groups(lengths):
        group = encode_prompts(tokenizer, [prompts[i] for i in rows])
        group_width = group["input_ids"].shape[1]
        if group_width < 2:
            continue  # one-token prompts: their row before the last token is all padding
        cache = _prefill_forward(base, group, loaded.device, DynamicCache(config=model.config))
        for index in range(len(cache.layers)):
            keys, values = _layer_states(cache, index)  # (rows, heads, group_width - 1, head_dim) each
            if not allocated:  # every row's room, zero over the prompts (padding stays zero, and masked)
                positions = torch.arange(width - 1, device=keys.device)  # (width - 1,)
                static.update(keys.new_zeros(len(questions), keys.shape[1], width - 1, keys.shape[-1]),
                              values.new_zeros(len(questions), values.shape[1], width - 1, values.shape[-1]),
                              index, {"cache_position": positions})
            at = torch.tensor(rows, device=keys.device)  # (rows,); a layer's device (models split over GPUs)
            # the group's keys/values right-aligned in the batch's width, written into the static cache
            static_keys, static_values = _layer_states(static, index)
            static_keys[at, :, width - group_width:width - 1] = keys
            static_values[at, :, width - group_width:width - 1] = values
        allocated = True
    return PromptPrefill(tuple(questions), static, max_new_tokens)


def _layer_states(cache: Cache, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a cache holds for layer ``index`` (a static cache's: its whole room, to write into)."""
    layer: Any = cache.layers[index]
    return layer.keys, layer.values


def _prefill_forward(base: Any, encoded: Mapping[str, torch.Tensor], device: torch.device, cache: Cache) -> Cache:
    """``cache`` filled with the keys/values of every left-padded prompt but its last token."""
    input_ids = encoded["input_ids"].to(device)  # (batch, width)
    attention_mask = encoded["attention_mask"].to(device)  # (batch, width)
    # the position ids generate gives left-padded rows (padding's are never attended to)
    position_ids = (attention_mask.cumsum(dim=1) - 1).masked_fill(attention_mask == 0, 1)  # (batch, width)
    out = base(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=position_ids[:, :-1],
               use_cache=True, **with_cache(base, cache))
    return output_cache(out)


def generate_batch(
    loaded: LoadedModel,
    questions: Sequence[str],
    steering: Steering,
    decoding: EvalConfig,
    *,
    batch_index: int = 0,
    prefill: PromptPrefill | None = None,
) -> list[Answer]:
    """Answer ``questions`` in one steered ``model.generate`` call.

    Unless steering starts before the last prompt token (``positions=all``), the prompts' tokens before
    it come from their unsteered ``PromptPrefill`` (``prefill``, or computed here), and ``generate`` runs
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
    options: dict[str, Any] = {"max_new_tokens": decoding.max_new_tokens, "do_sample": decoding.do_sample,
                               "pad_token_id": tokenizer.pad_token_id, "eos_token_id": stop_ids}
    if decoding.do_sample:
        options.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
    if steering.positions == "from_prompt_end" or not steering.steers:
        if prefill is None or not prefill.fits(questions, decoding.max_new_tokens):
            with profile.step("generate.prompts"):
                prefill = prefill_prompts(loaded, questions, decoding.max_new_tokens)
        if prefill is not None:
            options.update(with_cache(model, copy.deepcopy(prefill.cache)))
    devices = [loaded.device] if loaded.device.type == "cuda" else []
    clock = _FirstTokenClock()
    with (torch.inference_mode(), torch.random.fork_rng(devices=devices), decode_attention(loaded.device),
          steering.applied(model, prompt_end) as count):
        torch.manual_seed(_sampling_seed(decoding.seed, batch_index))
        started = time.perf_counter()
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                stopping_criteria=StoppingCriteriaList([clock]), **options)  # (batch, seq + new)
        finished = time.perf_counter()
    first = clock.at if clock.at is not None else finished
    profile.add("generate.prefill", first - started)
    profile.add("generate.decode", finished - first)
    n_new = output.shape[1] - width
    # Prefill runs the prompt, then every new token but the last is fed back: width + n_new - 1 positions a row.
    check_steered(count, steering.expected_steered(prompt_end, width + n_new - 1),
                  f"generation of {batch} answers ({n_new} new tokens each) by {steering.variant}")
    new_ids = output[:, width:].tolist()  # (batch, new)
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


__all__ = ['Answer', 'PromptPrefill', 'decode_answer', 'decode_attention', 'generate_batch', 'generate_missing', 'generate_missing_variants',
           'generation_order', 'prefill_groups', 'prefill_prompts', 'stop_token_ids']
