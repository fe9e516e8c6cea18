"""Prompts that start alike: the tokens every row of a batch starts with (a chat template's system prompt
and the opening of the user turn: 24 of SmolLM2's 43-token smoke prompts on average) run once, in one
row, and the rest of each row attends to copies of their keys/values.

``prefix_forward``, ``repeat_rows`` and ``suffix_inputs`` are the pieces (``evaluation.prefill`` lays the
result out in a static cache for generation); ``forward_chunks`` is the unsteered chunked forward of the
prefix cache (``steering.prefix``: MC's prompts, answer KL, training), its output laid out left-padded.
Both run the rest of the rows in groups of similar length (``length_groups``), so next to no padding is
computed.
Position ids count each row's own tokens, so a row's keys/values do not depend on what it shares. A
sliding window narrower than the rows is left alone: its mask counts cache slots, which the padding
between the shared start and the rest would stretch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Cache, DynamicCache

from steering.cache import output_cache, with_cache
from steering.hooks import record_residuals
from steering.prompts import left_pad, shared_prefix

# Length groups: rows sorted by length are cut where a group's shortest row would be padded by more than this
# share of its longest, so the forwards compute (almost) no padding: the smoke test split's 80 prompts pad to
# 5,680 positions in one forward and to 3,577 in 6 groups, for 3,439 real tokens.
GROUP_PADDING = 0.1


def length_groups(lengths: Sequence[int], padding: float = GROUP_PADDING) -> list[list[int]]:
    """Row indices in groups of similar length, longest first: a group's shortest row is padded by at most
    ``padding`` times its longest (a group of one when no other fits).

    Args:
        lengths: each row's length in tokens.
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


def sliding_window(model: nn.Module) -> int | None:
    """The decoder's sliding window (None when it has none)."""
    config: Any = model.config
    return getattr(config.get_text_config(decoder=True), "sliding_window", None)


def prefix_forward(base: Any, prefix_ids: Sequence[int], device: torch.device, config: Any = None) -> Cache:
    """The keys/values of the shared start, from one row's forward of the base model."""
    input_ids = torch.tensor([list(prefix_ids)], device=device)  # (1, shared)
    out = base(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True,
               **with_cache(base, DynamicCache(config=config)))
    return output_cache(out)


def repeat_rows(prefix: Cache, rows: int, config: Any = None) -> DynamicCache:
    """A cache holding ``rows`` copies of the one-row ``prefix``, for a batch's forward to continue."""
    cache = DynamicCache(config=config)
    layers: Any = prefix.layers
    for index, layer in enumerate(layers):
        keys, values = layer.keys, layer.values  # (1, kv_heads, shared, head_dim) each
        cache.update(keys.expand(rows, -1, -1, -1).contiguous(), values.expand(rows, -1, -1, -1).contiguous(), index)
    return cache


def suffix_inputs(suffixes: Sequence[Sequence[int]], pad_id: int, shared: int,
                  device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The rest of each row after ``shared`` tokens, left-padded: ``input_ids`` ``(rows, width)``, the
    attention mask over the shared start and the rest ``(rows, shared + width)``, and position ids counted
    over each row's own tokens ``(rows, width)`` (padding's are 1, never attended to)."""
    input_ids, mask = (t.to(device) for t in left_pad(suffixes, pad_id))  # (rows, width) each
    attention_mask = torch.cat([mask.new_ones(mask.shape[0], shared), mask], dim=1)  # (rows, shared + width)
    position_ids = (shared + mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 1)  # (rows, width)
    return input_ids, attention_mask, position_ids


def forward_chunks(model: nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int,
                   record: Sequence[int]) -> Iterator[tuple[list[int], int, Cache, dict[int, Tensor]]]:
    """Unsteered forwards over ``token_ids``, ``batch_size`` rows at most at a time, with a plain cache (every
    key of every layer kept) and positions counted from each row's first real token; yields each group's
    indices, its padded width, the cache and the recorded layers' outputs, both laid out left-padded.

    Rows sorted by length are taken ``batch_size`` at a time (a chunk). The tokens every row of a chunk
    starts with (a chat template's system prompt) run once, in one row (unless a sliding window is narrower
    than the chunk); the rest of the chunk's rows run in groups of similar length (``length_groups``),
    each row attending to copies of those keys/values."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = next(model.parameters()).device
    base: Any = model.base_model
    window = sliding_window(model)
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows = [token_ids[i] for i in chunk]
        width = max(len(r) for r in rows)
        shared = shared_prefix(rows, keep=1) if len(rows) > 1 and (window is None or window >= width) else 0
        prefix: Cache | None = None
        prefix_acts: dict[int, Tensor] = {}
        if shared:
            with record_residuals(model, record) as prefix_acts:
                prefix = prefix_forward(base, rows[0][:shared], device)
        for group in length_groups([len(r) for r in rows]):
            members = [rows[g] for g in group]
            group_width = max(len(r) for r in members)
            cache: Any = repeat_rows(prefix, len(members)) if prefix is not None else DynamicCache()
            input_ids, attention_mask, position_ids = suffix_inputs([r[shared:] for r in members], pad_id, shared,
                                                                    device)
            with record_residuals(model, record) as acts:
                out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           **with_cache(base, cache), use_cache=True)
            cache = output_cache(out)
            if shared:  # [prefix][padding][rest] -> [padding][prefix][rest]: each row's prefix just before its rest
                acts = {j: torch.cat([prefix_acts[j].expand(len(members), -1, -1), states], dim=1)  # (rows, seq, d)
                        for j, states in acts.items()}
                cache, acts = _left_padded(cache, acts, [len(r) for r in members], shared, group_width)
            yield [chunk[g] for g in group], group_width, cache, acts


def _left_padded(cache: Any, acts: dict[int, Tensor], lengths: Sequence[int], shared: int,
                 width: int) -> tuple[Cache, dict[int, Tensor]]:
    """A chunk's cache and recorded outputs laid out ``[prefix][padding][rest]`` (the prefix run first, the
    rest left-padded after it) moved to ``[padding][prefix][rest]``: the rest of each row is where it was,
    its prefix moves to just before it."""
    index = torch.arange(width).repeat(len(lengths), 1)  # (batch, width): where each position comes from
    for row, n in enumerate(lengths):
        index[row, width - n:width - n + shared] = torch.arange(shared)
    for layer in cache.layers:  # layer by layer, in place: one layer's copy at a time
        at = index.to(layer.keys.device)[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        layer.keys, layer.values = layer.keys.gather(2, at), layer.values.gather(2, at)
    out = {}
    for j, states in acts.items():
        at = index.to(states.device)[:, :, None].expand(-1, -1, states.shape[2])
        out[j] = states.gather(1, at)
    return cache, out


__all__ = ['GROUP_PADDING', 'forward_chunks', 'length_groups', 'prefix_forward', 'repeat_rows', 'sliding_window', 'suffix_inputs']
