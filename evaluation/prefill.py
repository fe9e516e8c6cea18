"""The prompts' unsteered prefill that every variant of a batch shares (``evaluation.generate``).

``prefill_prompts`` runs the tokens that every prompt of a batch starts with once (``steering.shared_start``: a
chat template's system prompt is 24 of the smoke prompts' 43 tokens on average for SmolLM2), then the rest
of each prompt, all but its last token, in groups of similar length (``length_groups``: next to no
padding is computed), and lays their keys/values out left-padded, as
``steering.prompts.encode_prompts`` pads them, in a ``StaticCache`` of the prompts' width. Each variant decodes
from its own copy with room for the answers (``PromptPrefill.decoding_cache``), which decoding fills in place
rather than concatenating a growing cache at every step; what is kept for the variants holds no room (on the
smoke split, 52% of a decoding cache's positions). Models whose sliding
window is narrower than prompt and answer get one padded forward into a growing ``DynamicCache``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from transformers import Cache, DynamicCache, StaticCache

from core.models import LoadedModel
from steering.cache import output_cache, with_cache
from steering.prompts import encode_prompts, format_prompt, shared_prefix
from steering.shared_start import length_groups, prefix_forward, repeat_rows, sliding_window, suffix_inputs


@dataclasses.dataclass
class PromptPrefill:
    """The unsteered keys/values of a batch of prompts, all but their last token, left-padded as
    ``encode_prompts`` pads them: what every variant that steers from the last prompt token on (and
    baseline) computes the same way, so one batch's prompts run once for all variants.

    Args:
        questions: the batch's questions, in order (the prefill fits only this batch).
        cache: the KV cache of every layer over positions ``0 .. width - 2``; decode from ``decoding_cache()``.
        max_new_tokens: the new tokens ``decoding_cache()`` has room for after the prompts (a ``StaticCache``
            of ``width - 1 + max_new_tokens`` positions), or None for a ``DynamicCache`` that grows.
        config: the model's config (for the ``StaticCache`` with room).
        used_up: set by ``decoding_cache(last_use=True)``: the keys/values were handed over or dropped.
    """

    questions: tuple[str, ...]
    cache: Cache
    max_new_tokens: int | None = None
    config: Any = None
    used_up: bool = False

    def fits(self, questions: Sequence[str], max_new_tokens: int) -> bool:
        """Whether this prefill is that of ``questions`` for ``max_new_tokens`` new tokens (a static cache's
        room must be exact: its length is what attention runs over), and not used up."""
        return not self.used_up and self.questions == tuple(questions) and self.max_new_tokens in (None, max_new_tokens)

    def decoding_cache(self, last_use: bool = False, copies: int = 1) -> Cache:
        """A copy of the prompts' keys/values to decode from: a ``StaticCache`` with room for ``max_new_tokens``
        more positions (zero there), or a copy of the ``DynamicCache``. With ``copies``, each row is there
        ``copies`` times in a row (row ``r`` of the batch is row ``r // copies`` of the prompts), for as many
        variants decoding together. This prefill is not changed, unless ``last_use``: then the growing cache
        itself is handed over, or each layer's keys/values are dropped as soon as they are copied (the last
        variant of a batch decodes without the prefill held beside it), and ``fits`` is False from then on."""
        if self.used_up:
            raise RuntimeError("this PromptPrefill was used up by decoding_cache(last_use=True)")
        self.used_up = last_use
        if self.max_new_tokens is None:
            grown = self.cache if last_use else copy.deepcopy(self.cache)
            if copies > 1:
                grown.batch_repeat_interleave(copies)
            return grown
        width = int(self.cache.get_seq_length())  # width - 1 prompt positions
        room = StaticCache(config=self.config, max_cache_len=width + self.max_new_tokens)
        for index in range(len(self.cache.layers)):
            keys, values = _layer_states(self.cache, index)  # (batch, heads, width - 1, head_dim) each
            if copies > 1:  # (batch * copies, heads, width - 1, head_dim) each
                keys, values = keys.repeat_interleave(copies, dim=0), values.repeat_interleave(copies, dim=0)
            room.update(keys, values, index, {"cache_position": torch.arange(width, device=keys.device)})
            if last_use:
                layer: Any = self.cache.layers[index]
                layer.keys, layer.values = keys.new_empty(0), values.new_empty(0)
        return room


@torch.inference_mode()
def prefill_prompts(loaded: LoadedModel, questions: Sequence[str], max_new_tokens: int | None = None) -> PromptPrefill | None:
    """The ``PromptPrefill`` of ``questions`` (None when the padded prompts are a single token).

    With ``max_new_tokens``, the prompts run in groups of similar length (``length_groups``: next to no
    padding is computed) and their keys/values are laid out left-padded in a ``StaticCache`` of the prompts'
    width; ``decoding_cache()`` copies it into one with room for ``max_new_tokens`` more positions, which
    decoding then writes in place instead of concatenating a growing cache at every step. The tokens every prompt starts with run once, in one row, and each group
    attends to copies of their keys/values. The keys/values of a row do not depend on its group: a row's
    padding is masked and its position ids count its own tokens. Models with sliding-window layers narrower than the
    prompts plus the new tokens (and ``max_new_tokens=None``) get one forward over the padded batch into a
    ``DynamicCache``.

    Args:
        loaded: the model, its tokenizer and prompt format.
        questions: question texts, formatted with ``format_prompt``.
        max_new_tokens: the new tokens ``decoding_cache()`` must have room for, or None for a growing cache.
    """
    tokenizer, model = loaded.tokenizer, loaded.model
    prompts = [format_prompt(q, tokenizer, loaded.prompt_format) for q in questions]
    encoded = encode_prompts(tokenizer, prompts)
    width = encoded["input_ids"].shape[1]
    if width < 2:
        return None
    base: Any = model.base_model
    lengths = encoded["attention_mask"].sum(dim=1).tolist()
    rows_ids = [ids[width - n:].tolist() for ids, n in zip(encoded["input_ids"], lengths, strict=True)]
    window = sliding_window(model)
    if max_new_tokens is None or (window is not None and width - 1 + max_new_tokens > window):
        # the cache generate would make (sliding-window layers as the config says), filled by one forward
        cache = _prefill_forward(base, rows_ids, tokenizer.pad_token_id, loaded.device,
                                 DynamicCache(config=model.config), 0)
        return PromptPrefill(tuple(questions), cache)
    shared = shared_prefix(rows_ids)
    prefix = prefix_forward(base, rows_ids[0][:shared], loaded.device, model.config) if shared else None
    static = StaticCache(config=model.config, max_cache_len=width - 1)  # decoding_cache adds the room
    allocated = False
    for rows in length_groups(lengths):
        suffixes = [rows_ids[i][shared:] for i in rows]
        suffix_width = max(len(t) for t in suffixes)
        if shared + suffix_width < 2:
            continue  # one-token prompts: their row before the last token is all padding
        begun = DynamicCache(config=model.config) if prefix is None else repeat_rows(prefix, len(rows), model.config)
        cache = _prefill_forward(base, suffixes, tokenizer.pad_token_id, loaded.device, begun, shared)
        # where each row's shared start goes: just before its own tokens (over the padding the group gave it)
        by_length = _rows_by_length(rows, lengths)
        for index in range(len(cache.layers)):
            keys, values = _layer_states(cache, index)  # (rows, heads, shared + suffix_width - 1, head_dim) each
            if not allocated:  # every row's room, zero over the prompts (padding stays zero, and masked)
                positions = torch.arange(width - 1, device=keys.device)  # (width - 1,)
                static.update(keys.new_zeros(len(questions), keys.shape[1], width - 1, keys.shape[-1]),
                              values.new_zeros(len(questions), values.shape[1], width - 1, values.shape[-1]),
                              index, {"cache_position": positions})
            static_keys, static_values = _layer_states(static, index)
            # the suffixes' keys/values (left-padded in the group) right-aligned in the batch's width
            at = torch.tensor(rows, device=keys.device)  # (rows,); a layer's device (models split over GPUs)
            static_keys[at, :, width - suffix_width:width - 1] = keys[:, :, shared:]
            static_values[at, :, width - suffix_width:width - 1] = values[:, :, shared:]
            for length, same in by_length.items():
                first, at_same = width - length, same.to(keys.device)  # (rows of this length,)
                static_keys[at_same, :, first:first + shared] = keys[:1, :, :shared]
                static_values[at_same, :, first:first + shared] = values[:1, :, :shared]
        allocated = True
    return PromptPrefill(tuple(questions), static, max_new_tokens, model.config)


def _layer_states(cache: Cache, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a cache holds for layer ``index`` (a static cache's: its whole room, to write into)."""
    layer: Any = cache.layers[index]
    return layer.keys, layer.values


def _rows_by_length(rows: Sequence[int], lengths: Sequence[int]) -> dict[int, torch.Tensor]:
    """The rows of a group by prompt length: ``length -> (rows,)`` indices."""
    out: dict[int, list[int]] = {}
    for i in rows:
        out.setdefault(lengths[i], []).append(i)
    return {length: torch.tensor(same) for length, same in out.items()}


def _prefill_forward(base: Any, suffixes: Sequence[Sequence[int]], pad_id: int, device: torch.device, cache: Cache,
                     shared: int) -> Cache:
    """``cache`` (holding the rows' ``shared`` first tokens, or nothing) continued with their own tokens,
    left-padded, but the last: ``(rows, heads, shared + width - 1, head_dim)`` a layer."""
    input_ids, attention_mask, position_ids = suffix_inputs(suffixes, pad_id, shared, device)
    out = base(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=position_ids[:, :-1],
               use_cache=True, **with_cache(base, cache))
    return output_cache(out)


__all__ = ['PromptPrefill', 'prefill_prompts']
