"""Greedy decoding that drops each row from the batch when it stops (``evaluation.generate`` calls it).

``model.generate`` keeps every row of a batch until the last one stops, feeding padding through the rows
that already have; on the smoke split a tenth of its row-steps are such rows. ``greedy_decode`` removes a
stopped row from the batch and from the KV cache (``drop_rows``: in place), so the rows still
answering decode alone. It is a plain argmax: a model whose generation config adds a logits processor to
greedy search (``greedy_processors``) decodes through ``model.generate``, as sampling does.

Several variants can decode one batch together (``evaluation.generate``: ``eval.decode_rows``): each question's
row is repeated once per variant, and each variant's hooks edit its own rows only (the others get a start
position no token reaches), so every product runs over more rows at once and each step's fixed cost is shared.
A row's tokens do not depend on the rows beside it (fp32: the oracle tests decode variants together and alone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import cache_utils

from steering.cache import with_cache
from steering.hooks import SteeredCount
from steering.methods.intervention import Steering

# generation_config fields under which greedy decoding is not a plain argmax (transformers adds a logits
# processor for each): a model whose config sets one of them decodes through ``model.generate``.
GREEDY_PROCESSORS = ("repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
                     "min_length", "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
                     "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
                     "guidance_scale", "epsilon_cutoff", "eta_cutoff", "watermarking_config")
NEVER = torch.iinfo(torch.long).max  # the start position of a row another variant steers: no position reaches it
# transformers' own reorder of a cache layer that holds its keys/values as two (batch, ...) tensors: a layer whose
# class keeps it has no other per-row state, so ``drop_rows`` may move its rows in place (None: every layer reorders)
_PLAIN_REORDER = getattr(getattr(cache_utils, "CacheLayerMixin", None), "reorder_cache", None)
_NEUTRAL = {"repetition_penalty": 1.0, "guidance_scale": 1.0, "min_length": 0, "min_new_tokens": 0,
            "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def greedy_processors(model: nn.Module) -> list[str]:
    """The ``GREEDY_PROCESSORS`` that ``model``'s generation config sets (empty: greedy is a plain argmax)."""
    config = getattr(model, "generation_config", None)
    return [name for name in GREEDY_PROCESSORS
            if getattr(config, name, None) not in (None, _NEUTRAL.get(name), [], ())]


def drop_rows(cache: Any, keep: torch.Tensor) -> None:
    """Keep rows ``keep`` of every layer of ``cache``, in that order: ``cache.reorder_cache(keep)`` without new
    tensors. A layer that holds its keys/values as plain tensors (its class keeps transformers' own
    ``reorder_cache``) has the rows that move copied into their places and keeps a view of its first
    ``len(keep)`` rows, so a static cache is written where it was and no cache-sized tensor is made as rows
    leave. (Copying every layer to fresh memory at each drop fragmented the heap: resident memory grew 2.49 ->
    2.91 GiB over one variant's drops on the smoke split.) Any other layer reorders itself.

    Args:
        cache: a ``transformers.Cache``.
        keep: ``(kept,)`` row indices, each at most once (``refilled``: only the rows past the kept ones move).
    """
    kept = len(keep)
    moved = (keep != torch.arange(kept, device=keep.device)).nonzero()[:, 0]  # (rows that move,) where they go
    for layer in cache.layers:
        if _PLAIN_REORDER is None or type(layer).reorder_cache is not _PLAIN_REORDER:
            layer.reorder_cache(keep)
        elif layer.get_seq_length() > 0:
            for name in ("keys", "values"):
                states = getattr(layer, name)  # (batch, heads, positions, head_dim)
                if len(moved):  # copied out first: a row may be both read and written
                    at = moved.to(states.device)
                    states[at] = states.index_select(0, keep.to(states.device)[at])
                setattr(layer, name, states[:kept])


def refilled(going: torch.Tensor) -> torch.Tensor:
    """The rows to keep where ``going`` (``(rows,)`` bool) is True, each in place where it can be: the stopped
    rows' places among the first ``going.sum()`` are taken by the kept rows after them, so a drop moves as
    many rows as stopped (in order, every kept row after the first stop would move).

    Returns:
        ``(kept,)`` row indices: ``i`` at place ``i`` where row ``i`` is kept, a row from the end elsewhere.
    """
    kept = going.nonzero()[:, 0]  # (kept,) ascending
    order = torch.arange(len(kept), device=going.device)  # (kept,)
    holes = (~going[:len(kept)]).nonzero()[:, 0]  # (stopped rows among the first len(kept),)
    order[holes] = kept[kept >= len(kept)]  # as many kept rows lie past them as stopped before
    return order


@dataclasses.dataclass
class Decoded:
    """What ``greedy_decode`` produced.

    Args:
        new_ids: ``(batch, n_new)`` new tokens, padding after a row's stop token.
        counts: per steering, the positions its hooks edited, over every forward.
        expected: per steering, the positions they must have edited: from each of its rows' start on, for the
            forwards the row took part in.
        first: ``time.perf_counter()`` when the first new token was picked (the end of the prompts' prefill).
    """

    new_ids: torch.Tensor
    counts: list[SteeredCount]
    expected: list[int]
    first: float


@torch.inference_mode()
def greedy_decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any,
                  steering: Steering | Sequence[Steering], prompt_end: torch.Tensor, max_new_tokens: int, stop_ids: Sequence[int],
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
        steering: the variant's steering, from ``prompt_end`` on (or everywhere); or ``k`` variants' steerings,
            each from ``prompt_end`` on (or none), row ``r`` steered by the ``r % k``-th.
        prompt_end: ``(batch,)`` index of each row's last prompt token.
        max_new_tokens: new tokens at most.
        stop_ids: ids that end an answer (``stop_token_ids``).
        pad_id: the id after a row's stop.
    """
    batch, width = input_ids.shape
    device = input_ids.device
    parts = [steering] if isinstance(steering, Steering) else list(steering)
    if batch % len(parts):
        raise ValueError(f"{batch} rows cannot be shared by {len(parts)} steerings: give each the same rows")
    if len(parts) > 1 and any(p.steers and p.positions != "from_prompt_end" for p in parts):
        raise ValueError("variants decode together only when each steers from the prompt's end on (or not at all); "
                         "decode a positions=all variant alone")
    part = torch.arange(batch, device=device) % len(parts)  # (batch,) the steering of each row
    rows = torch.arange(batch, device=device)  # (rows,) the rows still answering
    new_ids = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (batch, max_new)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)  # (n_stops,)
    seen = int(cache.get_seq_length())
    step_ids = input_ids[:, seen:]  # (rows, width - seen): the prompts' rest, then one token a step
    positions = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)[:, seen:]  # (rows, width - seen)
    mask = attention_mask  # (rows, fed)
    counts = [SteeredCount() for _ in parts]
    expected, first, n_new = [0] * len(parts), 0.0, 0
    for step in range(max_new_tokens):
        fed = mask.shape[1]  # positions 0 .. fed - 1 have run once this forward is done
        starts = prompt_end[rows]  # (rows,)
        # each steering's start positions: its own rows', and NEVER on the others' rows
        each = [starts] if len(parts) == 1 else [torch.where(part[rows] == i, starts, NEVER) for i in range(len(parts))]
        with contextlib.ExitStack() as stack:
            edited = [stack.enter_context(p.applied(model, s)) for p, s in zip(parts, each, strict=True)]
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **with_cache(model, cache)).logits[:, -1]  # (rows, vocab)
        for i, p in enumerate(parts):
            counts[i].add(edited[i].total)
            # this forward fed positions fed - step_ids.shape[1] .. fed - 1: the hook must edit those from each of
            # its own rows' start on (counted over those rows alone: a hook that edits other rows is caught)
            own = starts if len(parts) == 1 else starts[part[rows] == i]  # (own rows,)
            expected[i] += p.expected_steered(own, fed) - p.expected_steered(own, fed - step_ids.shape[1])
        token = logits.argmax(dim=-1)  # (rows,)
        new_ids[rows, step] = token
        n_new = step + 1
        if step == 0:
            first = time.perf_counter()
        going = ~torch.isin(token, stops)  # (rows,)
        if n_new == max_new_tokens or not bool(going.any()):
            break
        if not bool(going.all()):  # stopped rows leave the batch and the cache
            keep = refilled(going)  # (kept,)
            drop_rows(cache, keep)
            rows, token, mask, positions = rows[keep], token[keep], mask[keep], positions[keep]
        step_ids = token[:, None]  # (rows, 1)
        positions = positions[:, -1:] + 1  # (rows, 1)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)  # (rows, fed + 1)
    return Decoded(new_ids[:, :n_new], counts, expected, first)


__all__ = ['GREEDY_PROCESSORS', 'NEVER', 'Decoded', 'drop_rows', 'greedy_decode', 'greedy_processors', 'refilled']
