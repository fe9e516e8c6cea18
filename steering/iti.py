"""Inference-Time Intervention (ITI; Li et al. 2023): shift a few attention heads toward truthfulness.

Head h's output is columns `[h * head_dim, (h + 1) * head_dim)` of the input of `self_attn.o_proj`.
ITI fits a logistic-regression probe per head on answers labelled true (1) / false (0) (a seeded 80/20 split,
by question when the examples' questions are given, else stratified by label), keeps the K heads most accurate on the held-out part, and gives each the mass-mean direction
(mean true minus mean false, unit norm, all examples) and sigma, the std of all examples' projections on
it. `iti_applied` adds `alpha * sigma * direction` to the head's slice of o_proj's input (so
`o_proj.weight[:, slice] @ (alpha * sigma * direction)` to the attention output; weights untouched), at
positions counted across `generate` steps from the KV cache's length, found by type as `steering.hooks` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupShuffleSplit, train_test_split
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from steering.hooks import SteeredCount, _cache_offset_hook, _check_start_positions, _mark
from steering.layers import check_layer, decoder_layers

FIELDS = ("layers", "heads", "directions", "sigmas", "accuracies")  # ItiDirections' safetensors keys
Arrays = Tensor | np.ndarray | Sequence[Any]


def attention_heads(model: nn.Module) -> tuple[int, int]:
    """`(n_heads, head_dim)` from the (text) config: its `head_dim` if set, else `hidden_size // n_heads`.

    Args:
        model: A transformers model with a `config` (multimodal ones use their `text_config`).
    """
    config = getattr(model, "config", None)
    text: Any = config.get_text_config(decoder=True) if config is not None else None
    n_heads = getattr(text, "num_attention_heads", None)
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"{type(model).__name__}'s (text) config has num_attention_heads={n_heads!r}; pass a "
                         "transformers model whose config sets it to a positive int")
    return n_heads, int(getattr(text, "head_dim", None) or text.hidden_size // n_heads)


def o_proj(model: nn.Module, layer: int) -> nn.Module:
    """The `self_attn.o_proj` of decoder layer `layer`, checked to take `n_heads * head_dim` features.

    Args:
        model: A model supported by `steering.layers.decoder_layers`.
        layer: Decoder layer index in `[0, n_layers)`.
    """
    layers = decoder_layers(model)
    block = layers[check_layer(layer, len(layers))]
    proj, (n_heads, head_dim) = getattr(getattr(block, "self_attn", None), "o_proj", None), attention_heads(model)
    if not isinstance(proj, nn.Module) or getattr(proj, "in_features", n_heads * head_dim) != n_heads * head_dim:
        raise ValueError(f"decoder layer {layer} ({type(block).__name__}) has no self_attn.o_proj module taking "
                         f"n_heads x head_dim = {n_heads} x {head_dim} features: ITI needs the Llama/Gemma layout")
    return proj


@contextmanager
def record_head_inputs(model: nn.Module, layers: Sequence[int] | None = None) -> Iterator[dict[int, Tensor]]:
    """Record the `self_attn.o_proj` input (all heads' outputs) of decoder layers; hooks removed on exit.

    Yields `{layer: (batch, seq, n_heads * head_dim) detached tensor}`, the last forward winning;
    `x.view(*x.shape[:-1], n_heads, head_dim)` splits the heads. Includes any `iti_applied` shift.

    Args:
        model: A model supported by `steering.layers.decoder_layers`.
        layers: Decoder layer indices to record; None records all of them.
    """
    projections = {i: o_proj(model, i) for i in (range(len(decoder_layers(model))) if layers is None else layers)}
    store: dict[int, Tensor] = {}

    def recorder(layer: int) -> Any:  # stores (batch, seq, n_heads * head_dim)
        return _mark(lambda module, args, kwargs: store.__setitem__(layer, (args or [kwargs["input"]])[0].detach()))

    handles = [proj.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, proj in projections.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _check_probe_data(activations: Arrays, labels: Arrays) -> tuple[np.ndarray, np.ndarray]:
    acts, y = torch.as_tensor(activations).detach().cpu(), torch.as_tensor(labels).detach().cpu()
    if acts.ndim != 4 or not acts.is_floating_point():
        raise ValueError(f"activations are {tuple(acts.shape)} {acts.dtype}; they must be float (n_examples, "
                         "n_layers_recorded, n_heads, head_dim): record_head_inputs' tensors split by head")
    if y.shape != (acts.shape[0],) or not torch.isin(y.double(), torch.tensor([0.0, 1.0])).all():
        raise ValueError(f"labels are {tuple(y.shape)} with values {y.unique()[:5].tolist()}; they must be "
                         f"({acts.shape[0]},) zeros and ones, one per example (1 = true answer)")
    counts = torch.bincount(y.long(), minlength=2).tolist()
    if min(counts) < 2:
        raise ValueError(f"labels hold {counts[0]} false and {counts[1]} true examples; the stratified split "
                         "needs at least 2 of each class: add true and false answers")
    return acts.float().numpy(), y.long().numpy()


def _grouped_split(y: np.ndarray, groups: Sequence[Any], val_fraction: float, seed: int) -> tuple[Any, Any]:
    """`GroupShuffleSplit`'s seeded train and held-out indices, each side holding both labels."""
    if len(groups) != len(y):
        raise ValueError(f"groups has {len(groups)} entries for {len(y)} examples; give one question per example")
    if len(set(groups)) < 2:
        raise ValueError(f"the examples come from {len(set(groups))} question(s); a split by question needs >= 2")
    train, val = next(GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
                      .split(np.zeros(len(y)), y, groups=list(groups)))
    for side, idx in (("training", train), ("held-out", val)):
        if len(set(y[idx].tolist())) < 2:
            raise ValueError(f"the {side} questions of the split (seed {seed}) hold only one label; add questions "
                             "with true and false answers, or change iti.seed")
    return train, val


@dataclass(frozen=True, eq=False)
class HeadProbes:
    """Held-out accuracy of one logistic-regression probe per recorded head (ITI's selection score)."""

    layers: tuple[int, ...]  # (n_layers_recorded,) decoder layer index of each recorded layer
    accuracies: Tensor  # (n_layers_recorded, n_heads) float32

    @classmethod
    def fit(cls, activations: Arrays, labels: Arrays, layers: Sequence[int] | None = None, *, seed: int = 0,
            val_fraction: float = 0.2, groups: Sequence[Any] | None = None) -> HeadProbes:
        """Fit a probe per head on a seeded split and score it on the held-out part.

        Args:
            activations: `(n_examples, n_layers_recorded, n_heads, head_dim)` float head outputs.
            labels: `(n_examples,)` 1 for a true answer, 0 for a false one; both classes needed.
            layers: Decoder layer index of each recorded layer; None means `0..n_layers_recorded - 1`.
            seed: Seed of the split and of the probes.
            val_fraction: Held-out fraction (ITI: 0.2): of the questions when `groups` is given, else of
                the examples, stratified by label.
            groups: `(n_examples,)` the question of each example: no question is on both sides (a held-out
                answer whose question's other answers were trained on would flatter the probe); None: by example.
        """
        acts, y = _check_probe_data(activations, labels)
        n, n_recorded, n_heads, _ = acts.shape
        layer_ids = tuple(range(n_recorded)) if layers is None else tuple(int(i) for i in layers)
        if len(layer_ids) != n_recorded:
            raise ValueError(f"layers={list(layer_ids)} names {len(layer_ids)} layers but activations record "
                             f"{n_recorded}; give one decoder layer index per recorded layer, or None")
        n_val = math.ceil(val_fraction * n) if 0 < val_fraction < 1 else 0
        if n_val < 2 or n - n_val < 2:
            raise ValueError(f"val_fraction={val_fraction!r} of {n} examples holds out {n_val}, trains on "
                             f"{n - n_val}; both need >= 2: use a fraction in (0, 1) like 0.2, or more examples")
        if groups is None:
            train, val = train_test_split(np.arange(n), test_size=val_fraction, random_state=seed, stratify=y)
        else:
            train, val = _grouped_split(y, groups, val_fraction, seed)
        accuracies = np.zeros((n_recorded, n_heads))  # (n_layers_recorded, n_heads)
        for i in range(n_recorded):
            for h in range(n_heads):
                probe = LogisticRegression(random_state=seed, max_iter=1000).fit(acts[train, i, h], y[train])
                accuracies[i, h] = probe.score(acts[val, i, h], y[val])
        return cls(layers=layer_ids, accuracies=torch.tensor(accuracies, dtype=torch.float32))

    def top(self, k: int) -> list[tuple[int, int]]:
        """The `k` best `(layer, head)` pairs by held-out accuracy, ties broken by (layer, head).

        Args:
            k: How many heads, in `[1, n_layers_recorded * n_heads]`.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.accuracies.numel():
            raise ValueError(f"k={k!r} must be an int number of heads in [1, {self.accuracies.numel()}] "
                             "(n_layers_recorded x n_heads); ITI steers e.g. 48 of a 7B model's 1024 heads")
        rows = zip(self.layers, self.accuracies.tolist(), strict=True)
        ranked = sorted((-acc, layer, head) for layer, row in rows for head, acc in enumerate(row))
        return [(layer, head) for _, layer, head in ranked[:k]]


@dataclass(frozen=True, eq=False)
class ItiDirections:
    """K distinct heads (`heads[i]` of layer `layers[i]`) shifted by `alpha * sigmas[i] * directions[i]`."""

    layers: Tensor  # (K,) int64
    heads: Tensor  # (K,) int64
    directions: Tensor  # (K, head_dim) float32, unit mass-mean directions
    sigmas: Tensor  # (K,) float32, std of all examples' projections on each direction
    accuracies: Tensor  # (K,) float32, held-out probe accuracies

    def __post_init__(self) -> None:
        k = self.layers.shape[0] if isinstance(self.layers, Tensor) and self.layers.ndim == 1 else 0
        for name in FIELDS:
            value, integer, matrix = getattr(self, name), name in ("layers", "heads"), name == "directions"
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            want = (k, shape[-1]) if matrix and len(shape) == 2 else (k,)
            if k < 1 or shape != want or value.is_floating_point() == integer:
                raise ValueError(f"ItiDirections.{name} is {shape}; it must be {'an int' if integer else 'a float'} "
                                 f"tensor of shape {'(K, head_dim)' if matrix else '(K,)'}, K = len(layers) >= 1")
            object.__setattr__(self, name, value.detach().to("cpu", torch.int64 if integer else torch.float32))
        pairs = list(zip(self.layers.tolist(), self.heads.tolist(), strict=True))
        finite = bool(self.directions.isfinite().all() and self.sigmas.isfinite().all())
        if min(self.layers.min(), self.heads.min()) < 0 or len(set(pairs)) != k or not finite:
            raise ValueError(f"(layer, head) pairs {pairs} must be non-negative and distinct (list each head once), "
                             f"directions and sigmas finite (finite: {finite}); recompute them with select_heads")

    def save(self, path: str | Path) -> None:
        """Write the five tensors to a safetensors file (no pickle).

        Args:
            path: Destination file, e.g. `iti_directions.safetensors`.
        """
        save_file({name: getattr(self, name).contiguous() for name in FIELDS}, str(path), {"format": "iti/1"})

    @classmethod
    def load(cls, path: str | Path) -> ItiDirections:
        """Read and validate directions that `save` wrote.

        Args:
            path: A safetensors file written by `ItiDirections.save`.
        """
        tensors = load_file(str(path))
        missing = [name for name in FIELDS if name not in tensors]
        if missing:
            raise ValueError(f"{path} lacks tensors {missing}: not an ItiDirections file (write one with save)")
        return cls(**{name: tensors[name] for name in FIELDS})


def select_heads(activations: Arrays, labels: Arrays, k: int, layers: Sequence[int] | None = None, *,
                 seed: int = 0, val_fraction: float = 0.2, groups: Sequence[Any] | None = None) -> ItiDirections:
    """ITI's selection: the top-`k` heads of `HeadProbes.fit`, with mass-mean directions and sigmas.

    Args:
        activations: `(n_examples, n_layers_recorded, n_heads, head_dim)` float head outputs.
        labels: `(n_examples,)` 1 for a true answer, 0 for a false one.
        k: Number of heads to steer, in `[1, n_layers_recorded * n_heads]`.
        layers: Decoder layer index of each recorded layer (see `HeadProbes.fit`, with seed, val_fraction,
            groups).
    """
    acts, y = _check_probe_data(activations, labels)
    HeadProbes(tuple(range(acts.shape[1])), torch.zeros(acts.shape[1:3])).top(k)  # a bad k fails before fitting
    probes = HeadProbes.fit(acts, y, layers, seed=seed, val_fraction=val_fraction, groups=groups)
    chosen, directions, sigmas = probes.top(k), [], []
    for layer, head in chosen:
        x = acts[:, probes.layers.index(layer), head].astype(np.float64)  # (n_examples, head_dim)
        diff = x[y == 1].mean(axis=0) - x[y == 0].mean(axis=0)  # (head_dim,)
        if not np.linalg.norm(diff) > 0:
            raise ValueError(f"layer {layer} head {head}: true and false examples have the same mean activation")
        directions.append(diff / np.linalg.norm(diff))
        sigmas.append((x @ directions[-1]).std())  # ddof=0, as ITI's np.std
    pairs, acc = torch.tensor(chosen), [probes.accuracies[probes.layers.index(i), h] for i, h in chosen]
    return ItiDirections(pairs[:, 0], pairs[:, 1], torch.tensor(np.stack(directions)), torch.tensor(sigmas),
                         torch.stack(acc))  # pairs: (K, 2) (layer, head)


def _shift_hook(delta: Tensor, start_positions: Tensor | None, offset: list[int], count: SteeredCount | None) -> Any:
    """o_proj pre-hook: x -> x + delta at positions >= start_positions; adds the edited pairs to `count`."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], Any]:
        x = args[0] if args else kwargs["input"]  # (batch, seq, n_heads * head_dim)
        steered = x + delta.to(device=x.device, dtype=x.dtype)  # (batch, seq, n_heads * head_dim)
        batch, seq = x.shape[:2]
        edited: Tensor | int = batch * seq
        if start_positions is not None:
            if start_positions.shape[0] != batch:
                raise ValueError(f"start_positions has {start_positions.shape[0]} rows but the layer sees "
                                 f"batch={batch}; give one start per row (repeat_interleave it for beams)")
            positions = offset[0] + torch.arange(seq, device=x.device)  # (seq,)
            here = positions[None, :] >= start_positions.to(x.device)[:, None]  # (batch, seq)
            edited, steered = here.sum(), torch.where(here[..., None], steered, x)
        if count is not None:
            count.add(edited)
        return ((steered, *args[1:]), kwargs) if args else (args, {**kwargs, "input": steered})

    return hook


@contextmanager
def iti_applied(model: nn.Module, directions: ItiDirections, alpha: float,
                start_positions: Tensor | None = None) -> Iterator[SteeredCount]:
    """Shift the selected heads by `alpha * sigma * direction` inside the `with` block (ITI).

    Works in forwards and cached `generate`. The o_proj pre-hooks are prepended (`record_head_inputs`
    sees the shift) and removed on exit, also on exceptions. Yields a `SteeredCount` of the (row,
    position) pairs edited, counted once per forward (at the lowest steered layer) as `steer` does.

    Args:
        model: A model supported by `steering.layers.decoder_layers`, with `self_attn.o_proj` modules.
        directions: The heads and shifts, from `select_heads` or `ItiDirections.load`.
        alpha: Finite strength (ITI: 15 on LLaMA-7B); 0 leaves the model unchanged but still counts.
        start_positions: `(batch,)` integer tensor; row b is shifted only at absolute positions
            `>= start_positions[b]` (padded input, continuing through generated tokens). None: everywhere.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha!r} must be a finite float (e.g. 0.0, 15.0); got {type(alpha).__name__}")
    if not isinstance(directions, ItiDirections):
        raise ValueError(f"directions is a {type(directions).__name__}; pass ItiDirections (select_heads, load)")
    layers, (n_heads, head_dim) = decoder_layers(model), attention_heads(model)
    if directions.directions.shape[1] != head_dim or int(directions.heads.max()) >= n_heads:
        raise ValueError(f"directions are for heads {sorted(set(directions.heads.tolist()))} of head_dim "
                         f"{directions.directions.shape[1]}, but this model has {n_heads} heads of {head_dim}")
    start_positions = None if start_positions is None else _check_start_positions(start_positions)
    deltas: dict[int, Tensor] = {}  # layer -> (n_heads * head_dim,) shift of its o_proj input
    for layer, head, direction, sigma in zip(*(getattr(directions, f).tolist() for f in FIELDS[:4]), strict=True):
        delta = deltas.setdefault(check_layer(layer, len(layers)), torch.zeros(n_heads * head_dim))
        delta[head * head_dim : (head + 1) * head_dim] = alpha * sigma * torch.tensor(direction, dtype=torch.float64)
    projections = {layer: o_proj(model, layer) for layer in sorted(deltas)}
    count, handles = SteeredCount(), list[RemovableHandle]()
    try:
        for layer, proj in projections.items():
            offset = [0]
            if start_positions is not None:
                pre_hook = _mark(_cache_offset_hook(layer, offset))
                handles.append(layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True))
            hook = _mark(_shift_hook(deltas[layer], start_positions, offset, count if layer == min(deltas) else None))
            handles.append(proj.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
        yield count
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["HeadProbes", "ItiDirections", "attention_heads", "iti_applied", "o_proj",
           "record_head_inputs", "select_heads"]
