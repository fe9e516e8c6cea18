"""The train stage: fit an `MLPSteering` module per branch at the steering layer of the frozen model.

Branches (``mlp.branch``):
  - ``mc``: for each question, the best answer against one incorrect answer (chosen by a seed and the
    question id): hinge loss ``relu(margin - (logp(correct) - logp(incorrect)))``, logp being the
    sum of the answer tokens' log-probabilities;
  - ``gen``: mean negative log-likelihood of the best answer's tokens;
  - ``both``: one module per branch, each trained in a child run of the stage run.

The model never trains: its parameters are frozen (``requires_grad=False``) and only the module's
receive gradients. Steering follows ``steering.positions``: ``from_prompt_end`` steers from the last
prompt token on (the one predicting the first answer token), ``all`` steers every position.

Two speedups make a step cheap; both are exact (tests compare them with the straightforward path),
and a self-check on the first batch falls back to the full forward, with a logged reason, for an
architecture where they would not be:
  1. prefix cache: the model is frozen and steering acts from the last prompt token on, so the
     output of layer L and the keys/values of the tokens before the last prompt token never change.
     ``PrefixCache`` computes them once per split; a step runs layers L+1.. over the last prompt
     token and the answer only (``suffix_answer_logprobs``, via ``resume_after_layer``);
  2. answer-only head: the LM head (and the final logit soft-capping of Gemma) is applied only to
     the hidden states that predict answer tokens (``answer_head_logprobs``).

Logs per step ``train_loss`` (the batch's loss) and ``val_loss`` (the whole val split, after the
step), ``initial_*``/``final_*`` train and val losses over the whole splits, ``seconds_per_step``;
tags ``truthsteer.fast_path`` (``on`` or why not); artifacts ``mlp/<branch>/mlp.safetensors`` and
``mlp/<branch>/mlp.json`` (the module's config, the branch and the resolved run config).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import mlflow
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from core.artifacts import MLP_DIR
from core.config import Config, ConfigError, MLPConfig, config_to_dict
from core.data import Question
from steering.cache import output_cache, with_cache
from steering.hooks import SteeredCount, check_steered, record_residuals
from steering.layers import check_layer, d_model, decoder_layers
from steering.mlp import BRANCHES, TAG_BRANCH_RUN, Branch, MLPSteering, MLPSteeringConfig, save_mlp
from steering.prompts import PromptFormat, answer_text, encode_prompt_answers, format_prompt, left_pad

log = logging.getLogger(__name__)

SEQUENCES_PER_EXAMPLE = {"mc": 2, "gen": 1}
TAG_FAST_PATH = "truthsteer.fast_path"
TAG_BRANCH = "truthsteer.branch"
# Largest per-token log-prob difference between the fast and the full path that the first-batch
# self-check accepts. A structural mismatch (a wrong mask, a skipped layer) is far larger.
FAST_PATH_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.25}


# ---------------------------------------------------------------------------- sequences and batches


@dataclasses.dataclass(frozen=True)
class Sequences:
    """Teacher-forcing sequences of one split and branch: prompt + answer token ids, unpadded.

    Example ``i`` owns sequences ``i * per_example ... i * per_example + per_example - 1``: for
    ``mc`` the correct then the incorrect answer, for ``gen`` the best answer.

    Args:
        token_ids: one tuple of token ids per sequence, prompt then answer.
        n_answer: the number of answer tokens at the end of each sequence (>= 1).
        per_example: sequences per example: 2 for ``mc``, 1 for ``gen``.
    """

    token_ids: tuple[tuple[int, ...], ...]
    n_answer: tuple[int, ...]
    per_example: int

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.n_answer) or len(self.token_ids) % self.per_example:
            raise ValueError(
                f"{len(self.token_ids)} sequences and {len(self.n_answer)} answer lengths must match and be a "
                f"multiple of per_example={self.per_example}"
            )
        bad = [i for i, (ids, n) in enumerate(zip(self.token_ids, self.n_answer, strict=True)) if not 1 <= n < len(ids)]
        if bad:
            raise ValueError(f"sequences {bad[:5]} need at least one prompt token and one answer token")

    @property
    def n_examples(self) -> int:
        return len(self.token_ids) // self.per_example

    def sequence_indices(self, examples: Sequence[int]) -> list[int]:
        """The sequence indices of ``examples``, example by example."""
        return [e * self.per_example + j for e in examples for j in range(self.per_example)]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Left-padded sequences, as ``steering.prompts.encode_prompt_answers`` lays them out.

    Args:
        input_ids: ``(batch, seq)`` token ids.
        attention_mask: ``(batch, seq)`` 1 on real tokens.
        answer_mask: ``(batch, seq)`` 1 on answer tokens (the last ones of each row).
        prompt_end: ``(batch,)`` index of each row's last prompt token.
    """

    input_ids: Tensor
    attention_mask: Tensor
    answer_mask: Tensor
    prompt_end: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in dataclasses.astuple(self)))


def pick_incorrect(question: Question, seed: int) -> str:
    """The incorrect answer the ``mc`` branch contrasts with the best answer: a choice seeded by
    ``seed`` and the question id, so it does not depend on which other questions share the split."""
    return random.Random(f"{seed}:{question.id}").choice(question.incorrect_answers)


def encode_examples(
    questions: Sequence[Question],
    tokenizer: Any,
    prompt_format: PromptFormat,
    branch: str,
    *,
    max_length: int,
    seed: int = 0,
) -> Sequences:
    """Tokenise the teacher-forcing sequences of ``branch`` for ``questions``.

    Args:
        questions: the split's questions.
        tokenizer: the model's tokenizer.
        prompt_format: ``chat`` or ``qa`` (``LoadedModel.prompt_format``).
        branch: ``mc`` (best answer, then one incorrect answer per question) or ``gen`` (best answer).
        max_length: longest sequence; longer ones lose prompt tokens from the left.
        seed: seeds the choice of the incorrect answer (``pick_incorrect``).
    """
    if branch not in BRANCHES:
        raise ValueError(f"branch={branch!r} is not one of {', '.join(BRANCHES)}")
    if not questions:
        return Sequences((), (), SEQUENCES_PER_EXAMPLE[branch])
    prompts: list[str] = []
    answers: list[str] = []
    for q in questions:
        prompt = format_prompt(q.question, tokenizer, prompt_format)
        chosen = [q.best_answer] if branch == "gen" else [q.best_answer, pick_incorrect(q, seed)]
        prompts += [prompt] * len(chosen)
        answers += [answer_text(a, prompt_format) for a in chosen]
    enc = encode_prompt_answers(tokenizer, prompts, answers, max_length)
    real = enc["attention_mask"].bool()  # (n_seq, seq)
    token_ids = tuple(tuple(enc["input_ids"][row][real[row]].tolist()) for row in range(len(prompts)))
    n_answer = tuple(int(n) for n in enc["answer_mask"].sum(dim=1))  # (n_seq,)
    return Sequences(token_ids, n_answer, SEQUENCES_PER_EXAMPLE[branch])


def make_batch(seqs: Sequences, indices: Sequence[int], pad_id: int) -> Batch:
    """Left-pad the sequences ``indices`` of ``seqs`` into a Batch (on the CPU).

    Args:
        seqs: the split's sequences.
        indices: sequence indices (``seqs.sequence_indices(examples)``).
        pad_id: the tokenizer's pad token id.
    """
    input_ids, attention_mask = left_pad([seqs.token_ids[i] for i in indices], pad_id)  # (batch, seq)
    width = input_ids.shape[1]
    n_answer = torch.tensor([seqs.n_answer[i] for i in indices])  # (batch,)
    positions = torch.arange(width)  # (seq,)
    answer_mask = (positions[None, :] >= width - n_answer[:, None]).long()  # (batch, seq)
    prompt_end = width - n_answer - 1  # (batch,)
    return Batch(input_ids, attention_mask, answer_mask, prompt_end)


# ------------------------------------------------------------------------------ speedup 1: prefix cache


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

    def cache(self) -> DynamicCache | None:
        """A fresh cache holding the prefix (a forward appends to it), or None without a prefix."""
        if not self.past:
            return None
        cache = DynamicCache()  # plain layers: sliding-window layers keep every key, the mask applies the window
        for i, (keys, values) in enumerate(self.past):
            cache.update(keys, values, i)
        return cache


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
        for chunk, width, out, acts in _forward_chunks(model, seqs.token_ids, pad_id, batch_size, [layer]):
            for row, i in enumerate(chunk):
                first = width - len(seqs.token_ids[i])  # the row's first real token
                residuals[i] = acts[layer][row, first + splits[i]:].clone()  # (n_suffix, d_model)
                if splits[i]:
                    prefix_of[i] = prefixes.add(seqs.token_ids[i][:splits[i]], output_cache(out), row, first,
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
        for chunk, width, out, _ in _forward_chunks(model, distinct, pad_id, batch_size, []):
            for row, i in enumerate(chunk):
                store.add(distinct[i], output_cache(out), row, width - len(distinct[i]), range(n_layers))
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


def _forward_chunks(model: nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int,
                    record: Sequence[int]) -> Iterator[tuple[list[int], int, Any, dict[int, Tensor]]]:
    """Unsteered forwards over ``token_ids`` in left-padded batches of similar length, with a plain
    cache (every key of every layer kept) and positions counted from each row's first real token;
    yields the chunk's indices, its padded width, the base model's output and the recorded layers."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = next(model.parameters()).device
    base: Any = model.base_model
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, attention_mask = (t.to(device) for t in left_pad([token_ids[i] for i in chunk], pad_id))
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (batch, seq)
        with record_residuals(model, record) as acts:
            out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       **with_cache(base, DynamicCache()), use_cache=True)
        yield chunk, input_ids.shape[1], out, acts


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
        if batch.layer is not None and batch.residual is not None:
            stack.enter_context(resume_after_layer(model, batch.layer, batch.residual))
        count = stack.enter_context(steering())
        if answer_only_head:
            base: Any = model.base_model
            hidden = base(**kwargs, **with_cache(base, batch.cache())).last_hidden_state  # (batch, S, d_model)
            return answer_head_logprobs(model, hidden, batch.input_ids, batch.answer_mask), count
        logits = model(**kwargs, **with_cache(model, batch.cache())).logits  # (batch, S, vocab)
    return full_logits_logprobs(logits, batch.input_ids, batch.answer_mask), count


# ------------------------------------------------------------------------- speedup 2: answer-only head


def final_logit_softcap(model: nn.Module) -> float | None:
    """The final logit soft-capping ``model``'s own forward applies, or None.

    Gemma2ForCausalLM and Gemma3ForCausalLM apply ``config.final_logit_softcapping`` after the LM
    head when it is set. Gemma3ForConditionalGeneration (transformers 5.23) never applies it, even
    when its text config sets it; its top-level ``Gemma3Config`` has no such attribute, so reading
    the top-level config reproduces every class exactly. Llama has none.
    """
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(cap) if cap else None


def _softcap(logits: Tensor, cap: float | None) -> Tensor:
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap  # the order of operations of Gemma's forward


def _predicting(answer_mask: Tensor) -> Tensor:
    """``(batch, seq - 1)`` bool: position t predicts token t + 1, an answer token."""
    return answer_mask[:, 1:].bool()


def answer_head_logprobs(model: nn.Module, hidden: Tensor, input_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Log-probs of the answer tokens, applying the LM head only to the states that predict them.

    Args:
        model: the causal LM whose ``get_output_embeddings()`` is the LM head.
        hidden: ``(batch, seq, d_model)`` final hidden states (after the final norm).
        input_ids: ``(batch, seq)``.
        answer_mask: ``(batch, seq)`` 1 on answer tokens.

    Returns:
        ``(n_answer_tokens,)`` fp32 log-probs, in row-major order of ``answer_mask[:, 1:]``.
    """
    predicts = _predicting(answer_mask)  # (batch, seq - 1)
    states = hidden[:, :-1][predicts]  # (n_tokens, d_model)
    targets = input_ids[:, 1:][predicts]  # (n_tokens,)
    logits = head_logits(model, states)  # (n_tokens, vocab)
    return logits.float().log_softmax(dim=-1).gather(-1, targets[:, None])[:, 0]  # (n_tokens,)


def head_logits(model: nn.Module, states: Tensor) -> Tensor:
    """The logits ``model``'s own forward gives for final hidden ``states`` (``(..., d_model)``):
    its LM head, then the final logit soft-capping where its class applies one."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    return _softcap(head(states), final_logit_softcap(model))  # (..., vocab)


def full_logits_logprobs(logits: Tensor, input_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Log-probs of the answer tokens from the full ``(batch, seq, vocab)`` logits of a forward.

    Returns:
        ``(n_answer_tokens,)`` fp32, in the order of ``answer_head_logprobs``.
    """
    logp = logits[:, :-1].float().log_softmax(dim=-1)  # (batch, seq - 1, vocab)
    token_logp = logp.gather(-1, input_ids[:, 1:, None])[..., 0]  # (batch, seq - 1)
    return token_logp[_predicting(answer_mask)]  # (n_tokens,)


def sequence_logprobs(token_logp: Tensor, answer_mask: Tensor) -> Tensor:
    """``(batch,)`` sums of the answer-token log-probs of each row."""
    rows = _predicting(answer_mask).nonzero()[:, 0]  # (n_tokens,)
    zeros = torch.zeros(answer_mask.shape[0], dtype=token_logp.dtype, device=token_logp.device)  # (batch,)
    return zeros.index_add(0, rows, token_logp)  # (batch,)


# ------------------------------------------------------------------------------------- steered scoring


def steered_answer_logprobs(
    model: nn.Module,
    module: MLPSteering,
    batch: Batch,
    *,
    positions: str = "from_prompt_end",
    answer_only_head: bool = True,
) -> Tensor:
    """Answer-token log-probs of ``batch`` with ``module`` steering ``model`` at its layer: a full
    forward with the steering hook (the straightforward path, and the fast path's reference).

    Args:
        model: the frozen causal LM.
        module: the steering module (its ``config.layer`` is the steering layer).
        batch: the batch, on the model's device.
        positions: ``from_prompt_end`` (steer from ``batch.prompt_end`` on) or ``all``.
        answer_only_head: apply the LM head only where answer tokens are predicted.

    Returns:
        ``(n_answer_tokens,)`` fp32 log-probs, in row-major order of ``batch.answer_mask[:, 1:]``.
    """
    if positions not in ("from_prompt_end", "all"):
        raise ValueError(f"positions={positions!r} is not one of from_prompt_end, all")
    start = batch.prompt_end if positions == "from_prompt_end" else None
    width = batch.input_ids.shape[1]
    # Independently of the hook: every position from the row's start to the end of the padded row.
    expected = int((width - batch.prompt_end).sum()) if start is not None else batch.input_ids.numel()
    with module.steering(model, start) as count:
        if answer_only_head:
            base: Any = model.base_model
            out = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            token_logp = answer_head_logprobs(model, out.last_hidden_state, batch.input_ids, batch.answer_mask)
        else:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            token_logp = full_logits_logprobs(logits, batch.input_ids, batch.answer_mask)
    check_steered(count, expected, f"teacher-forced forward of {batch.input_ids.shape[0]} sequences")
    return token_logp


def branch_loss(branch: str, token_logp: Tensor, answer_mask: Tensor, margin: float) -> tuple[Tensor, int]:
    """The loss of a batch as ``(sum, count)``, so that chunks of a split add up exactly.

    ``gen``: sum of the answer tokens' NLL, count = tokens. ``mc``: sum over examples of
    ``relu(margin - (logp(correct) - logp(incorrect)))`` (rows 2i and 2i + 1), count = examples.

    Args:
        branch: ``mc`` or ``gen``.
        token_logp: ``(n_answer_tokens,)`` from ``steered_answer_logprobs``.
        answer_mask: ``(batch, seq)`` of the same batch.
        margin: hinge margin (``mc``).
    """
    if branch == "gen":
        return -token_logp.sum(), token_logp.numel()
    if branch != "mc":
        raise ValueError(f"branch={branch!r} is not one of {', '.join(BRANCHES)}")
    seq_logp = sequence_logprobs(token_logp, answer_mask)  # (batch,)
    gap = seq_logp[0::2] - seq_logp[1::2]  # (examples,)
    return torch.relu(margin - gap).sum(), gap.numel()


# ------------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class SplitScorer:
    """Scores examples of one split under steering, by the fast or the straightforward path.

    Args:
        model: the frozen model.
        module: the steering module.
        seqs: the split's sequences.
        pad_id: the tokenizer's pad token id.
        positions: ``from_prompt_end`` or ``all``.
        cache: the split's prefix cache (the fast path), or None for full forwards.
        answer_only_head: apply the LM head only to answer-predicting states.
    """

    model: nn.Module
    module: MLPSteering
    seqs: Sequences
    pad_id: int
    positions: str
    cache: PrefixCache | None = None
    answer_only_head: bool = True

    def logprobs(self, examples: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Answer-token log-probs of ``examples`` and the ``(batch, seq)`` answer mask they follow."""
        indices = self.seqs.sequence_indices(examples)
        if self.cache is not None:
            suffix = self.cache.batch(indices)
            token_logp, count = suffix_answer_logprobs(self.model, suffix, lambda: self.module.steering(self.model),
                                                       answer_only_head=self.answer_only_head)
            check_steered(count, suffix.input_ids.numel(), f"prefix-cached forward of {len(indices)} sequences")
            return token_logp, suffix.answer_mask
        device = next(self.model.parameters()).device
        batch = make_batch(self.seqs, indices, self.pad_id).to(device)
        token_logp = steered_answer_logprobs(self.model, self.module, batch, positions=self.positions,
                                             answer_only_head=self.answer_only_head)
        return token_logp, batch.answer_mask

    def loss(self, examples: Sequence[int], branch: str, margin: float) -> tuple[Tensor, int]:
        token_logp, answer_mask = self.logprobs(examples)
        return branch_loss(branch, token_logp, answer_mask, margin)

    def width(self, example: int) -> int:
        """The padded width ``example`` needs: its longest sequence (its longest suffix with a cache)."""
        return max(len(self.seqs.token_ids[i]) - (self.cache.splits[i] if self.cache is not None else 0)
                   for i in self.seqs.sequence_indices([example]))

    @torch.no_grad()
    def mean_loss(self, branch: str, margin: float, examples_per_chunk: int) -> float:
        """The loss over the whole split, in chunks of examples of similar width (losses are sums,
        so any chunking gives the same mean; similar widths waste little on padding)."""
        order = sorted(range(self.seqs.n_examples), key=self.width)
        total, count = 0.0, 0
        for start in range(0, len(order), examples_per_chunk):
            chunk = order[start:start + examples_per_chunk]
            loss_sum, n = self.loss(chunk, branch, margin)
            total, count = total + float(loss_sum), count + n
        return total / count if count else math.nan


def subset(seqs: Sequences, examples: Sequence[int]) -> Sequences:
    """The sequences of ``examples`` only, as a split of their own."""
    indices = seqs.sequence_indices(examples)
    return Sequences(tuple(seqs.token_ids[i] for i in indices), tuple(seqs.n_answer[i] for i in indices),
                     seqs.per_example)


def fast_path_mismatch(model: nn.Module, module: MLPSteering, seqs: Sequences, pad_id: int, positions: str,
                       cache: PrefixCache | None = None) -> str:
    """Why the fast path (prefix cache and answer-only head) cannot be trusted on ``model``, or "".

    Scores every sequence of ``seqs`` both ways and compares the answer-token log-probs; an
    exception or a difference above ``FAST_PATH_TOLERANCE`` is a reason. The cache is built for
    exactly ``seqs`` in one batch, so only the structure of the shortcut is compared, not the
    rounding of another batching (which bf16 makes visible and which is no error).

    Args:
        model: the frozen model.
        module: the steering module.
        seqs: a few sequences (two examples of the first training batch: their rows pad differently).
        pad_id: the tokenizer's pad token id.
        positions: ``from_prompt_end`` or ``all``.
        cache: the prefix cache of ``seqs``; None builds it.
    """
    device = next(model.parameters()).device
    indices = list(range(len(seqs.token_ids)))
    with torch.no_grad():
        try:
            if cache is None:
                cache = PrefixCache.build(model, module.config.layer, seqs, pad_id, len(indices), positions)
            fast, _ = suffix_answer_logprobs(model, cache.batch(indices), lambda: module.steering(model))
        except Exception as err:  # any failure of the shortcut means: use the full forward
            return f"the fast path raised {type(err).__name__}: {err}"
        batch = make_batch(seqs, indices, pad_id).to(device)
        full = steered_answer_logprobs(model, module, batch, positions=positions, answer_only_head=False)
    tolerance = FAST_PATH_TOLERANCE.get(next(model.parameters()).dtype, 0.25)
    diff = float((fast - full).abs().max()) if fast.shape == full.shape else math.inf
    if not diff <= tolerance:
        return f"fast-path log-probs differ from the full forward's by up to {diff:.3g} (> {tolerance:g})"
    return ""


def _optimizer(params: Sequence[nn.Parameter], cfg: MLPConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"mlp.optimizer={cfg.optimizer!r} is not one of adamw, adam, sgd")


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The examples of each step: seeded permutations of the split, concatenated and cut into batches.

    Args:
        n_examples: examples in the train split (>= 1).
        batch_size: examples per step.
        steps: number of steps.
        seed: seeds the permutations.
    """
    if n_examples < 1:
        raise ValueError(f"n_examples={n_examples}: training needs at least one example")
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < batch_size * steps:
        stream += torch.randperm(n_examples, generator=generator).tolist()
    return [stream[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


@dataclasses.dataclass
class BranchResult:
    """What training one branch produced; losses are means over the batch or the whole split."""

    module: MLPSteering
    train_losses: list[float]
    val_losses: list[float]
    initial_train_loss: float
    initial_val_loss: float
    final_train_loss: float
    final_val_loss: float
    fast_path: str  # "on", "off", or "off: <reason>"
    cache_seconds: float
    step_seconds: list[float]


def train_branch(
    model: nn.Module,
    module: MLPSteering,
    train: Sequences,
    val: Sequences,
    *,
    branch: str,
    cfg: MLPConfig,
    positions: str,
    pad_id: int,
    eval_batch_size: int = 16,
    fast_path: bool = True,
    log_metrics: bool = True,
    progress: bool = True,
) -> BranchResult:
    """Train ``module`` in place on ``train`` for ``cfg.steps`` steps; ``model`` is frozen first.

    Each step takes the next ``cfg.batch_size`` examples of seeded permutations of ``train``,
    minimises the branch loss with the optimizer of ``cfg`` and then scores the whole ``val`` split.

    Args:
        model: the causal LM; its parameters are set to ``requires_grad=False`` and never change.
        module: the steering module (fp32); moved to the model's device.
        train: train sequences of ``branch``.
        val: val sequences of ``branch``.
        branch: ``mc`` or ``gen``.
        cfg: steps, batch size, optimizer, lr, weight decay, margin, seed.
        positions: ``from_prompt_end`` or ``all``.
        pad_id: the tokenizer's pad token id.
        eval_batch_size: sequences per no-grad forward (cache building, split losses).
        fast_path: use the prefix cache and the answer-only head (after the first-batch self-check).
        log_metrics: log ``train_loss``/``val_loss`` per step and the summary metrics to the active run.
        progress: show a tqdm bar.
    """
    if branch not in BRANCHES:
        raise ValueError(f"branch={branch!r} is not one of {', '.join(BRANCHES)}")
    if train.n_examples == 0 or val.n_examples == 0:
        raise ConfigError(
            f"train has {train.n_examples} and val {val.n_examples} questions; both need at least one "
            "(set data.train and data.val, e.g. --overrides data.train=16,data.val=8)"
        )
    model.eval().requires_grad_(False)
    module.to(next(model.parameters()).device).train()
    torch.manual_seed(cfg.seed)
    layer = module.config.layer
    batches = batch_order(train.n_examples, cfg.batch_size, cfg.steps, cfg.seed)
    chunk = max(1, eval_batch_size // train.per_example)

    started = time.perf_counter()
    train_scorer = SplitScorer(model, module, train, pad_id, positions)
    val_scorer = SplitScorer(model, module, val, pad_id, positions)
    path = "off"
    if fast_path:
        # two examples of the first batch: padding differs between their rows, which is enough
        # to expose a structural mismatch, at a fraction of a full batch's cost
        reason = fast_path_mismatch(model, module, subset(train, batches[0][:2]), pad_id, positions)
        if reason:
            log.warning("training %s without the prefix cache and answer-only head: %s", branch, reason)
            path = f"off: {reason}"
        else:
            train_cache = PrefixCache.build(model, layer, train, pad_id, eval_batch_size, positions)
            val_cache = PrefixCache.build(model, layer, val, pad_id, eval_batch_size, positions)
            train_scorer = dataclasses.replace(train_scorer, cache=train_cache, answer_only_head=True)
            val_scorer = dataclasses.replace(val_scorer, cache=val_cache, answer_only_head=True)
            path = "on"
    cache_seconds = time.perf_counter() - started

    initial_train = train_scorer.mean_loss(branch, cfg.margin, chunk)
    initial_val = val_scorer.mean_loss(branch, cfg.margin, chunk)
    optimizer = _optimizer(list(module.parameters()), cfg)
    train_losses: list[float] = []
    val_losses: list[float] = []
    step_seconds: list[float] = []
    bar = tqdm(batches, desc=f"train {branch}", disable=not progress)
    for step, examples in enumerate(bar, start=1):
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, count = train_scorer.loss(examples, branch, cfg.margin)
        loss = loss_sum / count
        loss.backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - tick)
        train_losses.append(float(loss.detach()))
        val_losses.append(val_scorer.mean_loss(branch, cfg.margin, chunk))
        bar.set_postfix(train_loss=f"{train_losses[-1]:.4f}", val_loss=f"{val_losses[-1]:.4f}")
        if log_metrics:
            mlflow.log_metrics({"train_loss": train_losses[-1], "val_loss": val_losses[-1]}, step=step)
    module.eval()
    result = BranchResult(
        module=module,
        train_losses=train_losses,
        val_losses=val_losses,
        initial_train_loss=initial_train,
        initial_val_loss=initial_val,
        final_train_loss=train_scorer.mean_loss(branch, cfg.margin, chunk),
        final_val_loss=val_losses[-1],
        fast_path=path,
        cache_seconds=cache_seconds,
        step_seconds=step_seconds,
    )
    if log_metrics:
        mlflow.log_metrics({
            "initial_train_loss": result.initial_train_loss, "initial_val_loss": result.initial_val_loss,
            "final_train_loss": result.final_train_loss, "final_val_loss": result.final_val_loss,
            "seconds_per_step": sum(step_seconds) / len(step_seconds), "cache_seconds": cache_seconds,
        })
        mlflow.set_tag(TAG_FAST_PATH, path)
    return result


# ---------------------------------------------------------------------------------------- the stage


def branches_of(branch: str) -> tuple[Branch, ...]:
    """``both`` -> ``("mc", "gen")``; ``mc``/``gen`` -> itself."""
    if branch == "both":
        return BRANCHES
    for name in BRANCHES:
        if branch == name:
            return (name,)
    raise ConfigError(f"mlp.branch={branch!r} is not one of mc, gen, both")


def check_bank_run(bank_run: str) -> None:
    """A missing bank run is a ConfigError that says where one comes from."""
    if not bank_run:
        raise ConfigError(
            "train needs a vector bank: pass --bank-run <run id> (-P bank_run=... under mlflow run), the id "
            "of a finished `bank` run (python -m entrypoints.bank --extract-run <extract run id>)"
        )


def plan(cfg: Config, *, bank_run: str, data_run: str = "", branch: str | None = None) -> list[str]:
    """Validate what ``run`` needs without loading anything, and describe it for a dry run."""
    check_bank_run(bank_run)
    branches = branches_of(branch or cfg.mlp.branch)
    m = cfg.mlp
    return [
        f"branches: {', '.join(branches)} (artifacts {', '.join(MLP_DIR.format(branch=b) for b in branches)})",
        f"model: {cfg.model.alias}, layer {cfg.layer}, scale {cfg.steering.scale}, positions {cfg.steering.positions}",
        f"bank run: {bank_run}",
        f"data: {'splits of run ' + data_run if data_run else cfg.data.source} (train {cfg.data.sizes['train']}, "
        f"val {cfg.data.sizes['val']})",
        f"mlp: expansion {m.expansion}, {m.steps} steps of {m.batch_size}, {m.optimizer} lr {m.lr} "
        f"wd {m.weight_decay}, margin {m.margin}, seed {m.seed}",
    ]


def _train_and_log(cfg: Config, loaded: Any, bank: Tensor, splits: dict[str, list[Question]], branch: Branch,
                   fast_path: bool) -> MLPSteering:
    torch.manual_seed(cfg.mlp.seed)
    config = MLPSteeringConfig(model=cfg.model.alias, layer=cfg.layer, d_model=bank.shape[1], n_bank=bank.shape[0],
                               expansion=cfg.mlp.expansion, scale=cfg.steering.scale)
    module = MLPSteering(config, bank).to(loaded.device)
    encoded = {split: encode_examples(splits[split], loaded.tokenizer, loaded.prompt_format, branch,
                                      max_length=cfg.extract.max_length, seed=cfg.mlp.seed)
               for split in ("train", "val")}
    result = train_branch(loaded.model, module, encoded["train"], encoded["val"], branch=branch, cfg=cfg.mlp,
                          positions=cfg.steering.positions, pad_id=loaded.tokenizer.pad_token_id,
                          eval_batch_size=cfg.extract.batch_size, fast_path=fast_path)
    print(f"{branch}: train loss {result.initial_train_loss:.4f} -> {result.final_train_loss:.4f}, "
          f"val loss {result.initial_val_loss:.4f} -> {result.final_val_loss:.4f} (fast path {result.fast_path})")
    branch_cfg = dataclasses.replace(cfg, mlp=dataclasses.replace(cfg.mlp, branch=branch))
    with tempfile.TemporaryDirectory() as tmp:
        save_mlp(module.cpu(), tmp, {"branch": branch, "config": config_to_dict(branch_cfg)})
        mlflow.log_artifacts(tmp, MLP_DIR.format(branch=branch))
    return module


def run(cfg: Config, *, bank_run: str, data_run: str = "", branch: str | None = None,
        fast_path: bool = True) -> dict[str, MLPSteering]:
    """The ``train`` stage, in the active MLflow run: one module per branch.

    A single branch trains in the active run. ``both`` trains each branch in a child run (its
    ``mlp.branch`` pinned, so metric names stay ``train_loss``/``val_loss``) and tags the active run
    with ``truthsteer.mlp_<branch>_run`` so that ``load_mlp(<this run>, branch)`` finds it.

    Args:
        cfg: the resolved config (``mlp``, ``steering``, ``model``, ``data``, ``extract.max_length``).
        bank_run: id of the ``bank`` run whose vectors the module mixes.
        data_run: id of a ``data`` run whose splits to use; "" recomputes them from ``cfg.data``.
        branch: ``mc``, ``gen`` or ``both``; None takes ``cfg.mlp.branch``.
        fast_path: use the prefix cache and the answer-only head (switch off only to compare).

    Returns:
        The trained modules (on the CPU, eval mode) by branch.
    """
    from core.data import splits_for
    from core.models import load_from_config
    from core.tracking import stage_run
    from steering.vector_bank import load_bank

    check_bank_run(bank_run)
    branches = branches_of(branch or cfg.mlp.branch)
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("train.run needs an active MLflow run: call it inside `with stage_run('train', cfg):`")
    found = load_bank(bank_run)
    if found.layer != cfg.layer:
        raise ConfigError(
            f"bank run {bank_run!r} holds vectors of layer {found.layer}, but steering.layer={cfg.layer}; train at "
            f"the bank's layer (--overrides steering.layer={found.layer}) or build a bank at layer {cfg.layer}"
        )
    if found.model != cfg.model.alias or found.d_model != cfg.model.d_model:
        raise ConfigError(
            f"bank run {bank_run!r} was built for {found.model!r} (d_model={found.d_model}), not for "
            f"{cfg.model.alias!r} (d_model={cfg.model.d_model}); pass a bank run of {cfg.model.alias} or --model {found.model}"
        )
    bank = found.vectors.detach().float()  # (1 + K, d_model)
    splits = splits_for(cfg, data_run)
    loaded = load_from_config(cfg)
    if d_model(loaded.model) != bank.shape[1]:
        raise ConfigError(f"{cfg.model.alias} has d_model={d_model(loaded.model)}, the bank {bank.shape[1]}")
    mlflow.set_tags({"truthsteer.bank_run": bank_run, "truthsteer.data_run": data_run})
    modules: dict[str, MLPSteering] = {}
    for name in branches:
        if len(branches) == 1:
            mlflow.set_tag(TAG_BRANCH, name)
            modules[name] = _train_and_log(cfg, loaded, bank, splits, name, fast_path)
            continue
        branch_cfg = dataclasses.replace(cfg, mlp=dataclasses.replace(cfg.mlp, branch=name))
        with stage_run("train", branch_cfg, run_name=f"{cfg.model.alias}-train-{name}",
                       tags={TAG_BRANCH: name, "truthsteer.bank_run": bank_run}) as child:
            modules[name] = _train_and_log(branch_cfg, loaded, bank, splits, name, fast_path)
        mlflow.MlflowClient().set_tag(parent.info.run_id, TAG_BRANCH_RUN.format(branch=name), child.info.run_id)
    return modules
