"""The prefix cache: the frozen model's layers up to the steering layer run once per split.

Steering acts from the last prompt token on, so the output of layer L and the keys and values of the
tokens before it never change while an MLP trains or a scale is scored. ``PrefixCache`` keeps them;
``suffix_answer_logprobs`` runs layers L+1.. over the suffix only (via ``resume_after_layer``). Exact:
the tests compare it with a plain forward.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from steering.cache import with_cache
from steering.hooks import SteeredCount, record_residuals
from steering.layers import check_layer, decoder_layers
from steering.logprobs import (
    answer_head_logprobs,
    full_logits_logprobs,
)
from steering.sequences import Sequences
from steering.shared_start import forward_chunks


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder layer below the steering layer: returns its input."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


class _CachedOutput(nn.Module):
    """Stands in for decoder layer L: returns the cached output of layer L, ignoring its input."""

    def __init__(self, residual: Tensor) -> None:
        super().__init__()
        self.residual = residual

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.residual.shape != hidden_states.shape:
            raise ValueError(
                f"cached residual has shape {tuple(self.residual.shape)} but the layer sees "
                f"{tuple(hidden_states.shape)}; build it from the same batch (PrefixCache.batch(indices))"
            )
        return self.residual


@contextmanager
def _swapped_layers(model: nn.Module, replacements: Mapping[int, nn.Module]) -> Iterator[None]:
    """Replace decoder layers by index inside the block; the originals are always put back."""
    layers = decoder_layers(model)
    originals = {i: layers[i] for i in replacements}
    try:
        for i, module in replacements.items():
            layers[i] = module
        yield
    finally:
        for i, module in originals.items():
            layers[i] = module


@contextmanager
def resume_after_layer(model: nn.Module, layer: int, residual: Tensor) -> Iterator[None]:
    """Inside the block, a forward of ``model`` takes ``residual`` as the output of decoder layer
    ``layer`` and runs only the layers above it (then the final norm and head, as usual).

    How: decoder layers ``0 .. layer - 1`` are swapped for modules that return their input and layer
    ``layer`` for one that returns ``residual``; the swap is undone on exit. The model's own forward
    still runs, so it builds exactly the masks and rotary embeddings of a full forward and hands
    layer ``i`` those of ``config.layer_types[i]``. Alternatives that were rejected:

    - passing ``inputs_embeds=residual`` with ``layers`` replaced by ``layers[layer + 1:]``: Gemma-2
      and Gemma-3 pick each layer's mask (sliding or full) and Gemma-3 its rotary embedding by
      ``config.layer_types[i]`` with ``i`` the position in ``self.layers`` (transformers 5.23), so the
      sliced list would give layer ``layer + 1`` the attention type of layer 0. (The sqrt(d_model)
      embedding scale of Gemma is no obstacle in 5.23: it lives in ``Gemma*TextScaledWordEmbedding``,
      not in the forward, which would not rescale ``inputs_embeds``; 4.x scaled inside the forward.)
    - calling the remaining layers by hand: it must rebuild per-architecture masks (Gemma-3
      multimodal builds them in ``Gemma3Model`` and passes a dict down) and follow every
      transformers change to them.

    The swapped-in modules cost nothing; the forward still embeds the tokens and builds the masks,
    which is negligible. A steering hook must be registered *inside* this block, so that it lands on
    the module that stands in for layer ``layer`` (``steer`` looks the layer up when entered).

    Args:
        model: a model supported by ``steering.layers.decoder_layers``.
        layer: the steering layer L.
        residual: ``(batch, seq, d_model)`` output of layer L for the batch the forward will see.
    """
    layer = check_layer(layer, len(decoder_layers(model)))
    replacements: dict[int, nn.Module] = {i: _PassThrough() for i in range(layer)}
    replacements[layer] = _CachedOutput(residual)
    with _swapped_layers(model, replacements):
        yield


KV = tuple[tuple[Tensor, Tensor], ...]  # per decoder layer: (keys, values)


@dataclasses.dataclass(frozen=True)
class SuffixBatch:
    """The steered part of a batch for a prefix-cache forward (see ``PrefixCache``).

    Row ``b`` is split at ``split[b]``: its first ``split[b]`` tokens (the *prefix*) are never
    steered and come as keys/values; the rest (the *suffix*) runs the layers above ``layer``.

    Args:
        input_ids: ``(batch, S)`` suffix token ids, right-padded.
        attention_mask: ``(batch, P + S)``: the prefix left-padded to ``P``, then the suffix right-padded.
        position_ids: ``(batch, S)``: ``split[b] + t``, the tokens' positions in the unpadded sequence.
        answer_mask: ``(batch, S)`` 1 on answer tokens.
        past: per decoder layer, ``(keys, values)`` of the prefix, each ``(batch, kv_heads, P, head_dim)``
            (zeros for layers ``0 .. layer``, which never run); empty when ``P == 0``.
        layer: the frozen layer L whose output ``residual`` holds; None: the suffix runs every layer.
        residual: ``(batch, S, d_model)`` output of layer L on the suffix, zeros on padding (or None).
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    answer_mask: Tensor
    past: KV
    layer: int | None = None
    residual: Tensor | None = None

    @property
    def prefix_width(self) -> int:
        return self.attention_mask.shape[1] - self.input_ids.shape[1]

    def resumed(self, model: nn.Module) -> AbstractContextManager[None]:
        """``resume_after_layer`` at this batch's layer with its residual; nothing without a layer."""
        if self.layer is None or self.residual is None:
            return nullcontext()
        return resume_after_layer(model, self.layer, self.residual)

    def cache(self) -> DynamicCache | None:
        """A fresh cache holding the prefix (a forward appends to it), or None without a prefix. Each layer holds the
        batch's own prefix tensors, not copies (``DynamicCache.update`` of them would copy it all): a layer's update
        concatenates them into new tensors, never writes them."""
        if not self.past:
            return None
        cache = DynamicCache()  # plain layers: sliding-window layers keep every key, the mask applies the window
        for i, (keys, values) in enumerate(self.past):
            cache.update(keys[:, :, :0], values[:, :, :0], i)  # the layer, set up empty
            layer: Any = cache.layers[i]
            layer.keys, layer.values = keys, values
        return cache

    @contextmanager
    def one_forward(self, model: nn.Module) -> Iterator[DynamicCache | None]:
        """``cache()`` for one forward of ``model`` in the block: as each decoder layer returns, its keys and values
        (prefix and suffix, concatenated; no other layer reads them) are let go, so a forward holds one layer's at a
        time (MC's 80 rows on SmolLM2-135M: ~11 MB a layer). Hooks go on the decoder layers in place on entry."""
        cache = self.cache()
        layers: Any = [] if cache is None else cache.layers  # one per decoder layer, as ``past`` is (none: no hooks)

        def release(module: nn.Module, args: Any, output: Any, index: int = 0) -> None:
            layer = layers[index]  # keys/values (batch, kv_heads, P + S, head_dim) each -> none
            layer.keys, layer.values = (t.new_empty(*t.shape[:2], 0, t.shape[-1]) for t in (layer.keys, layer.values))

        handles = [module.register_forward_hook(functools.partial(release, index=i))
                   for i, module in enumerate(decoder_layers(model) if layers else [])]
        try:
            yield cache
        finally:
            for handle in handles:
                handle.remove()


class PrefixCache:
    """What a frozen model computes the same way at every step, computed once: for every sequence
    the keys/values of its *prefix* (the tokens before the split point, which are never steered)
    and, with a ``layer``, the output of that layer on its *suffix* (the tokens from the split on).

    In training, steering acts from the last prompt token on (``from_prompt_end``; ``all``: from
    token 0) at layer L, so a step runs layers ``L + 1 ..`` over the suffix alone (the last prompt
    token and the answer: ~11 of ~53 tokens for smollm2's chat prompts), attending to the cached
    prefix (``build``). Scoring many answers to one prompt (MC) runs every layer over each answer,
    attending to the prompt's cached keys/values (``of_prefixes``). Prefixes shared by several
    sequences (the answers to one question) are stored once.

    The prefix keys carry rotary embeddings of their positions in the unpadded sequence (explicit
    ``position_ids``), so a batch may pad them differently from the build. Memory: per distinct
    prefix, its length x the layers stored x 2 x kv_heads x head_dim values, on the model's device.

    Args:
        seqs: the sequences (their token ids and answer lengths).
        pad_id: the tokenizer's pad token id.
        layer: the frozen layer L (keys/values are kept for the layers above it), or None (all layers).
        n_layers: decoder layers of the model.
        splits: per sequence, the number of prefix tokens.
        prefix_of: per sequence, its index into ``prefixes`` (-1: no prefix).
        prefixes: per distinct prefix, ``(keys, values)`` per stored layer, each ``(kv_heads, len, head_dim)``.
        residuals: with a layer, per sequence the ``(n_suffix, d_model)`` output of layer L on its suffix.
        device: where a batch's token ids go (the model's input device).
    """

    def __init__(self, seqs: Sequences, pad_id: int, layer: int | None, n_layers: int, splits: Sequence[int],
                 prefix_of: Sequence[int], prefixes: Sequence[KV], residuals: Sequence[Tensor] | None = None,
                 device: torch.device | str = "cpu") -> None:
        if (layer is None) != (residuals is None):
            raise ValueError("pass residuals exactly when a layer is given")
        self.layer, self.n_layers = layer, n_layers
        self.splits, self.prefix_of, self.prefixes = list(splits), list(prefix_of), list(prefixes)
        self.seqs, self.pad_id = seqs, pad_id
        self.residuals = list(residuals) if residuals is not None else None
        self.device = torch.device(device)

    @staticmethod
    def split_points(seqs: Sequences, positions: str, layer: int | None = None, n_layers: int = 0) -> list[int]:
        """Prefix lengths: the index of the last prompt token (``from_prompt_end``), else 0; also 0
        when ``layer`` is the last layer, where nothing above it attends to the prefix."""
        if positions not in ("from_prompt_end", "all"):
            raise ValueError(f"positions={positions!r} is not one of from_prompt_end, all")
        if positions == "all" or (layer is not None and layer == n_layers - 1):
            return [0] * len(seqs.token_ids)
        return [len(ids) - n - 1 for ids, n in zip(seqs.token_ids, seqs.n_answer, strict=True)]

    @classmethod
    @torch.inference_mode()
    def build(cls, model: nn.Module, layer: int, seqs: Sequences, pad_id: int, batch_size: int,
              positions: str = "from_prompt_end") -> PrefixCache:
        """For training: one unsteered forward over ``seqs`` (all layers, batches of similar length)
        records the suffixes' output of layer L and the prefixes' keys/values above it.

        Args:
            model: the frozen model.
            layer: the steering layer L.
            seqs: the split's sequences.
            pad_id: the tokenizer's pad token id.
            batch_size: sequences per forward pass.
            positions: ``from_prompt_end`` or ``all`` (the split point, see ``split_points``).
        """
        n_layers = len(decoder_layers(model))
        layer = check_layer(layer, n_layers)
        splits = cls.split_points(seqs, positions, layer, n_layers)
        residuals: list[Tensor] = [torch.empty(0)] * len(splits)
        prefix_of, prefixes = [-1] * len(splits), _PrefixStore()
        for chunk, width, cache, acts in forward_chunks(model, seqs.token_ids, pad_id, batch_size, [layer]):
            for row, i in enumerate(chunk):
                first = width - len(seqs.token_ids[i])  # the row's first real token
                residuals[i] = acts[layer][row, first + splits[i]:].clone()  # (n_suffix, d_model)
                if splits[i]:
                    prefix_of[i] = prefixes.add(seqs.token_ids[i][:splits[i]], cache, row, first,
                                                range(layer + 1, n_layers))
        return cls(seqs, pad_id, layer, n_layers, splits, prefix_of, prefixes.values, residuals,
                   next(model.parameters()).device)

    @classmethod
    @torch.inference_mode()
    def of_prefixes(cls, model: nn.Module, seqs: Sequences, splits: Sequence[int], pad_id: int,
                    batch_size: int) -> PrefixCache:
        """For scoring: one forward over each distinct prefix only (every layer), nothing steered.

        Args:
            model: the frozen model.
            seqs: the sequences.
            splits: per sequence, its prefix length (``split_points``).
            pad_id: the tokenizer's pad token id.
            batch_size: prefixes per forward pass.
        """
        n_layers = len(decoder_layers(model))
        distinct = list(dict.fromkeys(ids[:n] for ids, n in zip(seqs.token_ids, splits, strict=True) if n))
        store = _PrefixStore()
        for chunk, width, cache, _ in forward_chunks(model, distinct, pad_id, batch_size, []):
            for row, i in enumerate(chunk):
                store.add(distinct[i], cache, row, width - len(distinct[i]), range(n_layers))
        prefix_of = [store.index[ids[:n]] if n else -1 for ids, n in zip(seqs.token_ids, splits, strict=True)]
        return cls(seqs, pad_id, None, n_layers, splits, prefix_of, store.values,
                   device=next(model.parameters()).device)

    def batch(self, indices: Sequence[int]) -> SuffixBatch:
        """The suffix batch of sequences ``indices`` (normal tensors, usable under autograd).

        Args:
            indices: sequence indices into the cached ``seqs`` (``seqs.sequence_indices(examples)``).
        """
        splits = [self.splits[i] for i in indices]
        suffix = [self.seqs.token_ids[i][self.splits[i]:] for i in indices]
        n, width, prefix_width = len(indices), max(map(len, suffix)), max(splits)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)  # (batch, S)
        suffix_mask = torch.zeros(n, width, dtype=torch.long)  # (batch, S)
        answer_mask = torch.zeros(n, width, dtype=torch.long)  # (batch, S)
        prefix_mask = torch.zeros(n, prefix_width, dtype=torch.long)  # (batch, P)
        for row, (i, tokens) in enumerate(zip(indices, suffix, strict=True)):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            suffix_mask[row, :len(tokens)] = 1
            answer_mask[row, len(tokens) - self.seqs.n_answer[i]:len(tokens)] = 1
            prefix_mask[row, prefix_width - splits[row]:] = 1
        position_ids = torch.tensor(splits)[:, None] + torch.arange(width)[None, :]  # (batch, S)
        residual = None
        if self.residuals is not None:
            first = self.residuals[indices[0]]
            residual = torch.zeros(n, width, first.shape[1], dtype=first.dtype, device=first.device)  # (batch, S, d)
            for row, i in enumerate(indices):
                residual[row, :len(suffix[row])] = self.residuals[i]
        past = self._past(indices, prefix_width) if prefix_width else ()
        device = residual.device if residual is not None else self.device  # layer L's device under device_map
        return SuffixBatch(ids.to(device), torch.cat([prefix_mask, suffix_mask], dim=1).to(device),
                           position_ids.to(device), answer_mask.to(device), past, self.layer, residual)

    def _past(self, indices: Sequence[int], width: int) -> KV:
        """Per decoder layer the left-padded ``(batch, kv_heads, width, head_dim)`` prefix keys/values."""
        stored: list[tuple[Tensor, Tensor]] = []
        template = self.prefixes[next(self.prefix_of[i] for i in indices if self.prefix_of[i] >= 0)]
        for j, (keys, _) in enumerate(template):
            padded = [keys.new_zeros(len(indices), keys.shape[0], width, keys.shape[2]) for _ in range(2)]
            for row, i in enumerate(indices):
                if self.prefix_of[i] >= 0:
                    for out, cached in zip(padded, self.prefixes[self.prefix_of[i]][j], strict=True):
                        out[row, :, width - cached.shape[1]:] = cached
            stored.append((padded[0], padded[1]))
        unused = stored[0][0].new_zeros(stored[0][0].shape)  # layers 0 .. L never run: zeros of the right length
        return tuple([(unused, unused)] * (self.n_layers - len(stored)) + stored)


class _PrefixStore:
    """Distinct prefixes' keys/values, by token ids."""

    def __init__(self) -> None:
        self.index: dict[tuple[int, ...], int] = {}
        self.values: list[KV] = []

    def add(self, ids: tuple[int, ...], cache: Any, row: int, first: int, layers: range) -> int:
        """Store the keys/values of ``ids`` (row ``row`` of ``cache``, from index ``first``) once."""
        if ids not in self.index:
            end = first + len(ids)
            self.index[ids] = len(self.values)
            self.values.append(tuple((cache.layers[j].keys[row, :, first:end].clone(),  # (kv_heads, len, head_dim)
                                      cache.layers[j].values[row, :, first:end].clone()) for j in layers))
        return self.index[ids]


@torch.inference_mode()
def with_layer_output(model: nn.Module, batch: SuffixBatch, layer: int) -> SuffixBatch:
    """``batch`` with the unsteered output of decoder layer ``layer`` on its suffix, from one forward
    of layers ``0 .. layer`` only (the layers above it stand aside): ``suffix_answer_logprobs`` then runs
    just the layers above ``layer``, for as many steerings as edit nothing up to it.

    Args:
        model: the frozen model ``batch`` was built for.
        batch: a ``PrefixCache`` batch without a layer (``of_prefixes``), on the model's device.
        layer: the last layer no steering edits.
    """
    if batch.layer is not None:
        raise ValueError(f"the batch already holds the output of layer {batch.layer}")
    n_layers = len(decoder_layers(model))
    layer = check_layer(layer, n_layers)
    base: Any = model.base_model
    above = {i: _PassThrough() for i in range(layer + 1, n_layers)}
    with _swapped_layers(model, above), record_residuals(model, [layer]) as acts, batch.one_forward(model) as cache:
        base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
             use_cache=True, **with_cache(base, cache))
    return dataclasses.replace(batch, layer=layer, residual=acts[layer])  # residual: (batch, S, d_model)


def suffix_answer_logprobs(model: nn.Module, batch: SuffixBatch,
                           steering: Callable[[], AbstractContextManager[SteeredCount]],
                           *, answer_only_head: bool = True) -> tuple[Tensor, SteeredCount]:
    """Answer-token log-probs of a ``PrefixCache`` batch: the layers above ``batch.layer`` (all
    layers without one) over the suffix tokens only, attending to the cached prefix.

    Args:
        model: the frozen causal LM the cache was built on.
        batch: ``PrefixCache.batch(...)``, on the model's device.
        steering: makes the steering context; it must steer every position of the forward (the
            suffix starts at the split point). Entered after the layers are swapped, so that a hook
            on layer L lands on the module that stands in for it.
        answer_only_head: apply the LM head only where answer tokens are predicted.

    Returns:
        ``(n_answer_tokens,)`` fp32 log-probs, in the order ``steered_answer_logprobs`` gives them, and
        the positions the steering hook edited (for ``check_steered``).
    """
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "position_ids": batch.position_ids, "use_cache": True}
    with ExitStack() as stack:
        stack.enter_context(batch.resumed(model))
        cache = stack.enter_context(batch.one_forward(model))
        count = stack.enter_context(steering())
        if answer_only_head:
            base: Any = model.base_model
            hidden = base(**kwargs, **with_cache(base, cache)).last_hidden_state  # (batch, S, d_model)
            return answer_head_logprobs(model, hidden, batch.input_ids, batch.answer_mask), count
        logits = model(**kwargs, **with_cache(model, cache)).logits  # (batch, S, vocab)
    return full_logits_logprobs(logits, batch.input_ids, batch.answer_mask), count


__all__ = ['KV', 'PrefixCache', 'SuffixBatch', 'resume_after_layer', 'suffix_answer_logprobs', 'with_layer_output']
