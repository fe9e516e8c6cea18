"""Forward hooks that steer or record the residual stream at the output of decoder layers.

transformers 5 decoder layers return a plain `(batch, seq, d_model)` tensor (older versions and
some remote code return a tuple whose first element is the hidden states); `_hidden` and
`_with_hidden` handle both. Steering hooks are registered with `prepend=True`, so every reader of
a layer's output (`record_residuals`, transformers' own `output_hidden_states`) sees the steered
value whatever the registration order.

Positions for `start_positions` are absolute indices in the padded input, counted across
`generate` steps: a pre-hook reads how many tokens the layer's KV cache already holds before the
layer runs. The cache is found by its type (`transformers.Cache`) among the layer's arguments,
never by keyword: transformers renames those keywords between minor versions (5.23 passes it as
`past_key_values`, 5.24 as `cache`) and dropped `cache_position` in 5.23.

Every `steer` block counts the (row, position) pairs its hook edited (`SteeredCount`), so that
callers can check that steering reached the tokens it should (see `check_steered`): a lost cache
offset, or a hook on a module that never runs, fails loudly instead of measuring the unsteered model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from steering.cache import find_cache
from steering.layers import check_layer, d_model, decoder_layers

_MARK = "_truthsteer_hook"  # attribute set on our hook functions, so active_hooks can count them

ForwardHook = Callable[[nn.Module, tuple[Any, ...], Any], Any]
PreHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]


def _mark(hook: Callable[..., Any]) -> Callable[..., Any]:
    setattr(hook, _MARK, True)
    return hook


def _hidden(output: Tensor | tuple[Any, ...]) -> Tensor:
    """The hidden states of a decoder layer output, whether a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Tensor | tuple[Any, ...], hidden: Tensor) -> Tensor | tuple[Any, ...]:
    """`output` with its hidden states replaced by `hidden`, in the same structure, not in place."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _check_scale(scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(
            f"scale={scale!r} must be a finite float (e.g. 0.0, 1.5, -4); got {type(scale).__name__}"
        )
    return float(scale)


def _check_start_positions(start_positions: object) -> Tensor:
    if (
        not isinstance(start_positions, Tensor)
        or start_positions.ndim != 1
        or start_positions.dtype.is_floating_point
        or start_positions.dtype.is_complex
        or start_positions.dtype == torch.bool
    ):
        raise ValueError(
            f"start_positions={start_positions!r} must be a 1-D integer tensor of shape (batch,), "
            "e.g. torch.full((batch,), prompt_len); pass None to steer every position"
        )
    return start_positions


def _cache_offset_hook(layer: int, offset: list[int]) -> PreHook:
    """Pre-hook storing in `offset[0]` the absolute position of the layer's first input token."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = find_cache((*args, *kwargs.values()))
        # Read before the layer's attention appends this call's keys: tokens already seen.
        offset[0] = cache.get_seq_length(layer) if cache is not None else 0

    return hook


class SteeringNotApplied(RuntimeError):
    """A steered forward or generation whose hook edited fewer (or more) positions than it should."""


class SteeredCount:
    """How many (row, position) pairs the hook of one `steer` block edited, over its forward calls.

    The sum stays on the hidden states' device until read, so counting costs no device sync per call.
    """

    def __init__(self) -> None:
        self.calls = 0
        self._total: Tensor | int = 0

    def add(self, edited: Tensor | int) -> None:
        self.calls += 1
        self._total = self._total + edited

    @property
    def total(self) -> int:
        """(row, position) pairs edited, summed over every call."""
        return int(self._total)


def check_steered(count: SteeredCount, expected: int, what: str) -> None:
    """Fail unless the hook edited exactly ``expected`` positions.

    Args:
        count: the `SteeredCount` a `steer` block yielded.
        expected: the (row, position) pairs the caller's layout says must be steered, counted from
            the input independently of the hook (e.g. batch x new tokens for a generation).
        what: what was steered, for the message (``"generation of 16 answers at layer 15"``).

    Raises:
        SteeringNotApplied: with both counts and what to check.
    """
    got = count.total
    if got != expected:
        raise SteeringNotApplied(
            f"steering was not applied as configured: the hook edited {got} of the {expected} positions of the "
            f"{what} ({count.calls} calls of the layer; transformers {transformers.__version__}). The numbers "
            "would measure a partly unsteered model, so the run stops. Check that the model's decoder layers "
            "still receive their KV cache (steering.hooks finds it by type), or run with the locked versions "
            "(make setup)"
        )


def _additive_hook(
    delta_of: Callable[[Tensor], Tensor], start_positions: Tensor | None, offset: list[int], count: SteeredCount
) -> ForwardHook:
    """Forward hook: hidden -> hidden + delta_of(hidden), at positions >= start_positions if given;
    adds the positions it edited in each row to `count`."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        hidden = _hidden(output)  # (batch, seq, d_model)
        steered = hidden + delta_of(hidden)  # (batch, seq, d_model)
        batch, seq = hidden.shape[:2]
        if start_positions is None:
            count.add(batch * seq)
            return _with_hidden(output, steered)
        if start_positions.shape[0] != batch:
            raise ValueError(
                f"start_positions has {start_positions.shape[0]} rows but the layer sees batch={batch}; "
                "give one start per row (repeat_interleave it for num_return_sequences or beams)"
            )
        positions = offset[0] + torch.arange(seq, device=hidden.device)  # (seq,)
        starts = start_positions.to(hidden.device)  # (batch,)
        steer_here = positions[None, :] >= starts[:, None]  # (batch, seq)
        count.add(steer_here.sum())
        return _with_hidden(output, torch.where(steer_here[..., None], steered, hidden))  # (batch, seq, d_model)

    return hook


@contextmanager
def steer(
    model: nn.Module,
    layer: int,
    *,
    vector: Tensor | None = None,
    scale: float = 1.0,
    module: nn.Module | None = None,
    start_positions: Tensor | None = None,
) -> Iterator[SteeredCount]:
    """Add a steering direction to the output of decoder layer `layer` inside the `with` block.

    With `vector`: h -> h + scale * vector, the product cast to h's device and dtype at hook time.
    With `module`: h -> h + scale * module(h.float()), computed in fp32 and cast to h's dtype, so
    an fp32 steering module works on a bf16 model. Works in plain forwards and in `model.generate`
    with a KV cache. The hook never writes in place and is removed on exit, also on exceptions.
    The block yields a `SteeredCount` of the positions the hook edited (see `check_steered`).

    Args:
        model: A model supported by `steering.layers.decoder_layers`.
        layer: Index of the decoder layer whose output is steered, in `[0, n_layers)`.
        vector: Steering vector of shape `(d_model,)`; exclusive with `module`.
        scale: Finite multiplier of the vector or module output; 0 leaves the model unchanged.
        module: `nn.Module` mapping `(batch, seq, d_model)` fp32 residuals to deltas of the same shape.
        start_positions: `(batch,)` integer tensor; row b is steered only at absolute positions
            `>= start_positions[b]` (indices in the padded input, left padding included, continuing
            through generated tokens). None steers every position.
    """
    if (vector is None) == (module is None):
        raise ValueError(
            f"pass exactly one of vector= or module= (got vector={'set' if vector is not None else None}, "
            f"module={'set' if module is not None else None})"
        )
    scale = _check_scale(scale)
    layers = decoder_layers(model)
    layer = check_layer(layer, len(layers))
    if start_positions is not None:
        start_positions = _check_start_positions(start_positions)

    delta_of: Callable[[Tensor], Tensor]
    if vector is not None:
        width = d_model(model)
        if (
            not isinstance(vector, Tensor)
            or tuple(vector.shape) != (width,)
            or not vector.is_floating_point()
        ):
            shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
            raise ValueError(
                f"vector has shape {shape}; it must be a float tensor of shape (d_model,) = ({width},) for this "
                "model (one layer's vector, not the whole bank)"
            )
        steering_vector = vector

        def delta_of(hidden: Tensor) -> Tensor:
            return (scale * steering_vector).to(device=hidden.device, dtype=hidden.dtype)  # (d_model,)

    else:
        if not isinstance(module, nn.Module):
            raise ValueError(f"module={module!r} must be an nn.Module mapping residuals to deltas")
        steering_module = module

        def delta_of(hidden: Tensor) -> Tensor:
            return (scale * steering_module(hidden.float())).to(hidden.dtype)  # (batch, seq, d_model)

    offset = [0]
    count = SteeredCount()
    handles: list[RemovableHandle] = []
    try:
        if start_positions is not None:
            pre_hook = _mark(_cache_offset_hook(layer, offset))
            handles.append(layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True))
        hook = _mark(_additive_hook(delta_of, start_positions, offset, count))
        handles.append(layers[layer].register_forward_hook(hook, prepend=True))
        yield count
    finally:
        for handle in handles:
            handle.remove()


def _recording_hook(layer: int, store: dict[int, Tensor]) -> ForwardHook:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        store[layer] = _hidden(output).detach()  # (batch, seq, d_model)

    return hook


@contextmanager
def record_residuals(model: nn.Module, layers: Sequence[int] | None = None) -> Iterator[dict[int, Tensor]]:
    """Record the output hidden states of decoder layers during the forward passes in the block.

    Yields a dict `{layer: (batch, seq, d_model) detached tensor}`, filled as the model runs; each
    forward pass overwrites it (the last call wins), so run one forward for extraction. The value is
    the raw layer output, before the final norm, and includes any active `steer` edit.

    Args:
        model: A model supported by `steering.layers.decoder_layers`.
        layers: Decoder layer indices to record; None records all of them.
    """
    modules = decoder_layers(model)
    indices = range(len(modules)) if layers is None else [check_layer(i, len(modules)) for i in layers]
    store: dict[int, Tensor] = {}
    handles: list[RemovableHandle] = []
    try:
        for i in indices:
            handles.append(modules[i].register_forward_hook(_mark(_recording_hook(i, store))))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of `hidden` over the positions where `mask` is nonzero, in fp32; padding is ignored exactly.

    Args:
        hidden: `(batch, seq, d_model)` hidden states.
        mask: `(batch, seq)` attention mask, 1 for real tokens and 0 for padding.

    Returns:
        `(batch, d_model)` fp32 means.
    """
    if hidden.ndim != 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be (batch, seq, d_model) and mask {tuple(mask.shape)} "
            "must be (batch, seq) with the same batch and seq"
        )
    keep = mask.to(hidden.device).bool()[..., None]  # (batch, seq, 1)
    count = keep.sum(dim=1)  # (batch, 1)
    if bool((count == 0).any()):
        empty = (count[:, 0] == 0).nonzero().flatten().tolist()
        raise ValueError(f"mask rows {empty} have no unmasked position; every row needs at least one token")
    # where, not multiply: padding holding inf or nan must not leak into the mean.
    total = torch.where(keep, hidden.float(), 0.0).sum(dim=1)  # (batch, d_model)
    return total / count  # (batch, d_model)


def active_hooks(model: nn.Module) -> int:
    """Number of hooks from this module (steer, record_residuals) still registered on `model`.

    transformers installs its own persistent output-capturing hooks; those are not counted.

    Args:
        model: Any module; all its submodules are inspected.
    """
    return sum(
        getattr(hook, _MARK, False)
        for sub in model.modules()
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks)
        for hook in hooks.values()
    )
