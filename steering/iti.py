"""Inference-Time Intervention (ITI; Li et al. 2023): shift a few attention heads toward truthfulness.

A head's output is its slice of the input of its layer's `self_attn.o_proj`: that input is
`(batch, seq, n_heads * head_dim)` and head h owns columns `[h * head_dim, (h + 1) * head_dim)`.
ITI records these on answers labelled true (1) or false (0), fits a logistic-regression probe per
head on a seeded stratified 80% split, scores it on the held-out 20%, and keeps the K most accurate
heads. Each gets the mass-mean direction (mean of true minus mean of false examples, unit norm, over
all examples) and sigma, the std (ddof=0) of all examples' activations projected on it.
`iti_applied` adds `alpha * sigma * direction` to each kept head's slice of the o_proj input, i.e.
`o_proj.weight[:, slice] @ (alpha * sigma * direction)` to the attention output; weights are untouched.

`start_positions` are absolute indices in the padded input, counted across `generate` steps as in
`steering.hooks`: a pre-hook on the decoder layer reads how many tokens its KV cache (found by type,
never by keyword) already holds. The block yields a `SteeredCount` of the (row, position) pairs
edited, counted once per forward (at the lowest steered layer) like `steer`, for `check_steered`.
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
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from steering.hooks import SteeredCount, _cache_offset_hook, _check_start_positions, _mark
from steering.layers import check_layer, decoder_layers

FIELDS = ("layers", "heads", "directions", "sigmas", "accuracies")  # ItiDirections' safetensors keys


def attention_heads(model: nn.Module) -> tuple[int, int]:
    """`(n_heads, head_dim)` of the text decoder's attention, from the (text) config.

    `head_dim` is the config's own when set (Gemma-3 270m: 4 heads of 256 on a 640-wide residual,
    so `n_heads * head_dim` need not be `hidden_size`), else `hidden_size // n_heads`.

    Args:
        model: A transformers model with a `config` (multimodal ones use their `text_config`).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no `config`; pass a transformers PreTrainedModel")
    text = config.get_text_config(decoder=True)
    n_heads = getattr(text, "num_attention_heads", None)
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"{type(text).__name__}.num_attention_heads={n_heads!r}; it must be a positive int")
    return n_heads, int(getattr(text, "head_dim", None) or text.hidden_size // n_heads)


def o_proj(model: nn.Module, layer: int) -> nn.Module:
    """The output projection `self_attn.o_proj` of decoder layer `layer`, whose input holds the heads.

    Args:
        model: A model supported by `steering.layers.decoder_layers`.
        layer: Decoder layer index in `[0, n_layers)`.
    """
    layers = decoder_layers(model)
    block = layers[check_layer(layer, len(layers))]
    proj = getattr(getattr(block, "self_attn", None), "o_proj", None)
    if not isinstance(proj, nn.Module):
        raise ValueError(
            f"decoder layer {layer} ({type(block).__name__}) has no self_attn.o_proj module; ITI needs "
            "the heads' outputs at layer.self_attn.o_proj (the Llama / Gemma-2 / Gemma-3 layout)"
        )
    n_heads, head_dim = attention_heads(model)
    if getattr(proj, "in_features", n_heads * head_dim) != n_heads * head_dim:
        raise ValueError(
            f"layer {layer} o_proj takes {proj.in_features} features, not n_heads x head_dim = {n_heads} x "
            f"{head_dim} as the config says; fix num_attention_heads / head_dim in the model's config"
        )
    return proj


def _proj_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["input"]  # (batch, seq, n_heads * head_dim)


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


@contextmanager
def record_head_inputs(model: nn.Module, layers: Sequence[int] | None = None) -> Iterator[dict[int, Tensor]]:
    """Record the input of `self_attn.o_proj` (every head's output) of decoder layers in the block.

    Yields `{layer: (batch, seq, n_heads * head_dim) detached tensor}`; each forward overwrites it
    (the last call wins); `x.view(*x.shape[:-1], n_heads, head_dim)` splits the heads. Inside
    `iti_applied` the value includes the shift. The hooks are removed on exit, also on exceptions.

    Args:
        model: A model supported by `steering.layers.decoder_layers`.
        layers: Decoder layer indices to record; None records all of them.
    """
    indices = range(len(decoder_layers(model))) if layers is None else list(layers)
    projections = {layer: o_proj(model, layer) for layer in indices}
    store: dict[int, Tensor] = {}

    def recorder(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            store[layer] = _proj_input(args, kwargs).detach()  # (batch, seq, n_heads * head_dim)

        return _mark(hook)

    handles: list[RemovableHandle] = []
    try:
        for layer, proj in projections.items():
            handles.append(proj.register_forward_pre_hook(recorder(layer), with_kwargs=True))
        yield store
    finally:
        _remove(handles)


def _numpy(values: object) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu()
        return (values.float() if values.is_floating_point() else values).numpy()
    return np.asarray(values)


def _check_probe_data(activations: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    acts, y = _numpy(activations), _numpy(labels)
    if acts.ndim != 4 or not np.issubdtype(acts.dtype, np.floating):
        raise ValueError(
            f"activations have shape {acts.shape} and dtype {acts.dtype}; they must be float (n_examples, "
            "n_layers_recorded, n_heads, head_dim): record_head_inputs' tensors split by head, stacked"
        )
    if y.shape != (acts.shape[0],) or not np.isin(y, (0, 1)).all():
        raise ValueError(
            f"labels have shape {y.shape} and values {np.unique(y)[:5].tolist()}; they must be "
            f"({acts.shape[0]},) zeros and ones, one per example (1 = true answer)"
        )
    counts = np.bincount(y.astype(np.int64), minlength=2)
    if counts.min() < 2:
        raise ValueError(
            f"labels hold {counts[0]} false and {counts[1]} true examples; the stratified split needs at "
            "least 2 of each class: add true and false answers"
        )
    return acts, y.astype(np.int64)


def _check_k(k: object, n_total: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_total:
        raise ValueError(
            f"k={k!r} must be an int number of heads in [1, {n_total}] (n_layers_recorded x n_heads); "
            "ITI steers e.g. 48 of a 7B model's 1024 heads"
        )
    return k


@dataclass(frozen=True, eq=False)
class HeadProbes:
    """Held-out accuracy of one logistic-regression probe per recorded head.

    Attributes:
        layers: Decoder layer index of each recorded layer, `(n_layers_recorded,)`.
        accuracies: `(n_layers_recorded, n_heads)` float32 held-out accuracies.
    """

    layers: tuple[int, ...]
    accuracies: Tensor  # (n_layers_recorded, n_heads)

    def top(self, k: int) -> list[tuple[int, int]]:
        """The `k` best `(layer, head)` pairs by held-out accuracy, ties broken by (layer, head).

        Args:
            k: How many heads, in `[1, n_layers_recorded * n_heads]`.
        """
        _check_k(k, self.accuracies.numel())
        acc = self.accuracies.tolist()
        ranked = sorted((-a, layer, h) for layer, row in zip(self.layers, acc, strict=True) for h, a in enumerate(row))
        return [(layer, head) for _, layer, head in ranked[:k]]


def fit_head_probes(
    activations: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int],
    layers: Sequence[int] | None = None, *, seed: int = 0, val_fraction: float = 0.2,
) -> HeadProbes:
    """Fit ITI's per-head probes on a seeded stratified split; score them on the held-out part.

    Args:
        activations: `(n_examples, n_layers_recorded, n_heads, head_dim)` float head outputs.
        labels: `(n_examples,)` 1 for a true answer, 0 for a false one; both classes needed.
        layers: Decoder layer index of each recorded layer; None means `0..n_layers_recorded - 1`.
        seed: Seed of the split and of the probes.
        val_fraction: Held-out fraction (ITI: 0.2).
    """
    acts, y = _check_probe_data(activations, labels)
    n, n_recorded, n_heads, _ = acts.shape
    layer_ids = tuple(range(n_recorded)) if layers is None else tuple(int(i) for i in layers)
    if len(layer_ids) != n_recorded:
        raise ValueError(
            f"layers={list(layer_ids)} names {len(layer_ids)} layers but activations record {n_recorded}; "
            "give one decoder layer index per recorded layer, or None"
        )
    n_val = math.ceil(val_fraction * n) if 0 < val_fraction < 1 else 0
    if n_val < 2 or n - n_val < 2:
        raise ValueError(
            f"val_fraction={val_fraction!r} of {n} examples holds out {n_val} and trains on {n - n_val}; both "
            "need at least 2: use a fraction in (0, 1) such as 0.2, or more examples"
        )
    train, val = train_test_split(np.arange(n), test_size=val_fraction, random_state=seed, stratify=y)
    accuracies = np.zeros((n_recorded, n_heads))  # (n_layers_recorded, n_heads)
    for i in range(n_recorded):
        for h in range(n_heads):
            probe = LogisticRegression(random_state=seed, max_iter=1000).fit(acts[train, i, h], y[train])
            accuracies[i, h] = probe.score(acts[val, i, h], y[val])
    return HeadProbes(layers=layer_ids, accuracies=torch.tensor(accuracies, dtype=torch.float32))


@dataclass(frozen=True, eq=False)
class ItiDirections:
    """K heads and their shifts: `alpha * sigmas[i] * directions[i]` on head `heads[i]` of `layers[i]`.

    Validated on construction and stored as CPU int64 / float32 tensors.

    Attributes:
        layers: `(K,)` int64 decoder layer indices.
        heads: `(K,)` int64 head indices within the layer; (layer, head) pairs are distinct.
        directions: `(K, head_dim)` float32 unit mass-mean directions.
        sigmas: `(K,)` float32 std of all examples' activations projected on each direction.
        accuracies: `(K,)` float32 held-out probe accuracies.
    """

    layers: Tensor  # (K,)
    heads: Tensor  # (K,)
    directions: Tensor  # (K, head_dim)
    sigmas: Tensor  # (K,)
    accuracies: Tensor  # (K,)

    def __post_init__(self) -> None:
        k = self.layers.shape[0] if isinstance(self.layers, Tensor) and self.layers.ndim == 1 else 0
        for name in FIELDS:
            value, integer = getattr(self, name), name in ("layers", "heads")
            width = value.shape[-1] if isinstance(value, Tensor) and value.ndim == 2 else -1
            want = (k, width) if name == "directions" else (k,)
            if not isinstance(value, Tensor) or k < 1 or value.shape != want or value.is_floating_point() == integer:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"ItiDirections.{name} is {shape}; it must be a {'n int' if integer else ' float'} tensor of "
                    f"shape {'(K, head_dim)' if name == 'directions' else '(K,)'} with K >= 1 (here K={k})"
                )
            object.__setattr__(self, name, value.detach().to("cpu", torch.int64 if integer else torch.float32))
        pairs = list(zip(self.layers.tolist(), self.heads.tolist(), strict=True))
        if min(self.layers.min(), self.heads.min()) < 0 or len(set(pairs)) != k:
            raise ValueError(f"(layer, head) pairs {pairs} must be non-negative and distinct: list each head once")
        if not (self.directions.isfinite().all() and self.sigmas.isfinite().all()):
            raise ValueError("ItiDirections.directions and sigmas must be finite; recompute them with select_heads")

    @property
    def head_dim(self) -> int:
        """Width of one head."""
        return self.directions.shape[1]

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


def select_heads(
    activations: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int], k: int,
    layers: Sequence[int] | None = None, *, seed: int = 0, val_fraction: float = 0.2,
) -> ItiDirections:
    """ITI's head selection: the top-`k` probed heads with their mass-mean directions and sigmas.

    Args:
        activations: `(n_examples, n_layers_recorded, n_heads, head_dim)` float head outputs.
        labels: `(n_examples,)` 1 for a true answer, 0 for a false one.
        k: Number of heads to steer, in `[1, n_layers_recorded * n_heads]`.
        layers: Decoder layer index of each recorded layer; None means `0..n_layers_recorded - 1`.
        seed: Seed of the split and of the probes.
        val_fraction: Held-out fraction for the probes' accuracy (ITI: 0.2).
    """
    acts, y = _check_probe_data(activations, labels)
    _check_k(k, acts.shape[1] * acts.shape[2])
    probes = fit_head_probes(acts, y, layers, seed=seed, val_fraction=val_fraction)
    chosen = probes.top(k)
    directions, sigmas, accuracies = [], [], []
    for layer, head in chosen:
        i = probes.layers.index(layer)
        x = acts[:, i, head].astype(np.float64)  # (n_examples, head_dim)
        diff = x[y == 1].mean(axis=0) - x[y == 0].mean(axis=0)  # (head_dim,)
        if not np.linalg.norm(diff) > 0:
            raise ValueError(f"layer {layer} head {head}: true and false examples have the same mean activation")
        directions.append(diff / np.linalg.norm(diff))
        sigmas.append((x @ directions[-1]).std())
        accuracies.append(float(probes.accuracies[i, head]))
    return ItiDirections(
        layers=torch.tensor([layer for layer, _ in chosen]), heads=torch.tensor([head for _, head in chosen]),
        directions=torch.tensor(np.stack(directions), dtype=torch.float32),
        sigmas=torch.tensor(sigmas, dtype=torch.float32), accuracies=torch.tensor(accuracies, dtype=torch.float32),
    )


def _shift_hook(delta: Tensor, start_positions: Tensor | None, offset: list[int], count: SteeredCount | None) -> Any:
    """o_proj pre-hook: x -> x + delta at positions >= start_positions; adds the edited pairs to `count`."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = _proj_input(args, kwargs)  # (batch, seq, n_heads * head_dim)
        steered = x + delta.to(device=x.device, dtype=x.dtype)  # (batch, seq, n_heads * head_dim)
        batch, seq = x.shape[:2]
        edited: Tensor | int = batch * seq
        if start_positions is not None:
            if start_positions.shape[0] != batch:
                raise ValueError(
                    f"start_positions has {start_positions.shape[0]} rows but the layer sees batch={batch}; "
                    "give one start per row (repeat_interleave it for num_return_sequences or beams)"
                )
            positions = offset[0] + torch.arange(seq, device=x.device)  # (seq,)
            here = positions[None, :] >= start_positions.to(x.device)[:, None]  # (batch, seq)
            edited, steered = here.sum(), torch.where(here[..., None], steered, x)
        if count is not None:
            count.add(edited)
        return ((steered, *args[1:]), kwargs) if args else (args, {**kwargs, "input": steered})

    return hook


@contextmanager
def iti_applied(
    model: nn.Module, directions: ItiDirections, alpha: float, start_positions: Tensor | None = None
) -> Iterator[SteeredCount]:
    """Shift the selected heads by `alpha * sigma * direction` inside the `with` block (ITI).

    Works in plain forwards and in `model.generate` with a KV cache; never writes weights or in place.
    The o_proj hooks are prepended (`record_head_inputs` sees the shift) and removed on exit, also on
    exceptions. Yields a `SteeredCount` of the (row, position) pairs edited, counted once per forward.

    Args:
        model: A model supported by `steering.layers.decoder_layers`, with `self_attn.o_proj` modules.
        directions: The heads and shifts, e.g. from `select_heads` or `ItiDirections.load`.
        alpha: Finite strength (ITI: 15 on LLaMA-7B); 0 leaves the model unchanged but still counts.
        start_positions: `(batch,)` integer tensor; row b is shifted only at absolute positions
            `>= start_positions[b]` (padded input, continuing through generated tokens). None: everywhere.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha!r} must be a finite float (e.g. 0.0, 15.0); got {type(alpha).__name__}")
    if not isinstance(directions, ItiDirections):
        raise ValueError(f"directions is a {type(directions).__name__}; pass ItiDirections (select_heads, load)")
    layers = decoder_layers(model)
    n_heads, head_dim = attention_heads(model)
    if directions.head_dim != head_dim or int(directions.heads.max()) >= n_heads:
        raise ValueError(
            f"directions are for heads {sorted(set(directions.heads.tolist()))} of head_dim={directions.head_dim} "
            f"but this model has {n_heads} heads of head_dim={head_dim}; select the heads on this model"
        )
    if start_positions is not None:
        start_positions = _check_start_positions(start_positions)
    deltas: dict[int, Tensor] = {}  # layer -> (n_heads * head_dim,) shift of its o_proj input
    for layer, head, direction, sigma in zip(
        directions.layers.tolist(), directions.heads.tolist(), directions.directions, directions.sigmas, strict=True
    ):
        delta = deltas.setdefault(check_layer(layer, len(layers)), torch.zeros(n_heads * head_dim))
        delta[head * head_dim : (head + 1) * head_dim] = (alpha * sigma.double() * direction.double()).float()
    projections = {layer: o_proj(model, layer) for layer in sorted(deltas)}
    count, counted, handles = SteeredCount(), min(deltas), []
    try:
        for layer, proj in projections.items():
            offset = [0]
            if start_positions is not None:
                pre_hook = _mark(_cache_offset_hook(layer, offset))
                handles.append(layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True))
            hook = _mark(_shift_hook(deltas[layer], start_positions, offset, count if layer == counted else None))
            handles.append(proj.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
        yield count
    finally:
        _remove(handles)


__all__ = [
    "FIELDS",
    "HeadProbes",
    "ItiDirections",
    "attention_heads",
    "fit_head_probes",
    "iti_applied",
    "o_proj",
    "record_head_inputs",
    "select_heads",
]
