"""Attention for decoding on a CPU: one query token a row, heads that share a key/value head packed together.

A decode step attends each row's one new token to its whole KV cache, and on a CPU that reading is the
cost: PyTorch's math kernel (what ``transformers``' ``sdpa`` runs there) rescales the cache's keys at every
step and layer before multiplying, and a static cache holds columns that no row has filled yet.
``packed_decode_attention`` computes the same softmax attention with the query scaled instead of the keys,
the query heads that share a key/value head as the rows of one product (grouped-query attention without
copying the cache), and only the columns some row attends (worked out once a forward from its mask, which
every layer shares). Its two products (the scores, and the values weighted by their softmax) run in C++
(``evaluation.native``: each key and value row read once for the query heads that share it, where PyTorch's
``bmm`` runs one tiny matrix product per row and key/value head; each call 1.42x ``bmm``, ``benchmarks.generate``)
where that is built and the tensors are fp32, else by ``bmm``; a decode block's first call through the C++
products is checked against ``bmm`` on the same call, to float32 rounding. It is registered with
``transformers``' ``AttentionInterface`` as ``PACKED_DECODE`` and ``decode_attention`` switches a model to it
while it decodes.

Anything else (several query tokens a row, a float mask, soft-capped scores, attention sinks, dropout) is
passed on to ``transformers``' own ``sdpa`` attention, under the math kernel as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from evaluation import native

PACKED_DECODE = "truthsteer_packed_decode"
_PASSED_ON = ("softcap", "s_aux", "position_bias")  # attention keywords the packed path does not implement


def packed_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Softmax attention of one query token a row, as ``transformers``' attention functions are called.

    Args:
        module: the attention module (passed on to ``sdpa`` when the packed path does not apply).
        query: ``(batch, heads, 1, head_dim)``.
        key: ``(batch, kv_heads, kv_len, head_dim)``; ``heads`` is a multiple of ``kv_heads``.
        value: ``(batch, kv_heads, kv_len, head_dim)``.
        attention_mask: ``(batch, 1, 1, kv_len)`` boolean, True where a row attends; None: every column.
        dropout: must be 0 for the packed path.
        scaling: the scores' scale (``head_dim ** -0.5`` when None).
        is_causal: passed on to ``sdpa`` only (one query token attends to the whole cache).

    Returns:
        ``(batch, 1, heads, head_dim)`` attention output, and None (no weights).
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    mask = attention_mask
    if (q_len != 1 or dropout or heads % kv_heads or any(kwargs.get(name) is not None for name in _PASSED_ON)
            or (mask is not None and (mask.dtype != torch.bool or mask.shape[1] != 1 or mask.shape[2] != 1))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    lo, hi, blocked = 0, kv_len, None
    if mask is not None:
        span = _attended_span(mask, kv_len)
        if span is None:  # a row attending nothing: sdpa's softmax gives it zeros
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        lo, hi, blocked = span
    scale = head_dim**-0.5 if scaling is None else scaling
    packed = query.reshape(batch, kv_heads, heads // kv_heads, head_dim) * scale  # (batch, kv_heads, groups, head_dim)
    products = _products(packed, key, value)
    scores = products.scores(packed, key, lo, hi)  # (batch, kv_heads, groups, hi - lo)
    if blocked is not None:
        scores.masked_fill_(blocked, float("-inf"))  # (batch, kv_heads, groups, hi - lo): a fresh product, filled in place
    probs = scores.softmax(dim=-1)  # (batch, kv_heads, groups, hi - lo)
    output = products.weighted(probs, value, lo)  # (batch, kv_heads, groups, head_dim)
    if products is not _TORCH and not _checked[0]:
        _check(packed, key[:, :, lo:hi], value[:, :, lo:hi], scores, probs, output)
        _checked[0] = True
    return output.reshape(batch, 1, heads, head_dim), None  # (batch, 1, heads, head_dim)


class _Torch:
    """The two products by PyTorch's ``bmm`` (what ``evaluation.native``'s C++ ones replace)."""

    @staticmethod
    def scores(packed: torch.Tensor, key: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return packed @ key[:, :, lo:hi].transpose(-1, -2)  # (batch, kv_heads, groups, hi - lo)

    @staticmethod
    def weighted(probs: torch.Tensor, value: torch.Tensor, lo: int) -> torch.Tensor:
        return probs @ value[:, :, lo:lo + probs.shape[-1]]  # (batch, kv_heads, groups, head_dim)


_TORCH = _Torch()
_checked = [False]  # whether this decode_attention block's first call through the C++ products was checked


def _products(packed: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> Any:
    """``evaluation.native``'s C++ products where they apply (fp32 on a CPU, rows contiguous) and are built,
    else PyTorch's."""
    if (packed.dtype == key.dtype == value.dtype == torch.float32 and key.device.type == "cpu"
            and key.stride(-1) == 1 and value.stride(-1) == 1):
        built = native.kernels()
        if built is not None:
            return built
    return _TORCH


def _check(packed: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scores: torch.Tensor, probs: torch.Tensor,
           output: torch.Tensor) -> None:
    """Fail when the C++ products differ from PyTorch's by more than float32 rounding can: each is a sum of
    ``n`` terms (``n``: the head dimension for the scores, the columns for the output), which may differ by
    ``n`` roundings of its terms' magnitudes in either order, so by at most ``2 * n * eps * sum |terms|``."""
    eps = torch.finfo(torch.float32).eps
    attended = torch.isfinite(scores)  # (batch, kv_heads, groups, columns): masked columns are -inf either way
    want = packed @ key.transpose(-1, -2)  # (batch, kv_heads, groups, columns)
    bound = 2 * packed.shape[-1] * eps * (packed.abs() @ key.abs().transpose(-1, -2))
    want_out = probs @ value  # (batch, kv_heads, groups, head_dim)
    bound_out = 2 * probs.shape[-1] * eps * (probs @ value.abs())
    for name, got, expected, allowed, where in (("scores", scores, want, bound, attended),
                                                ("output", output, want_out, bound_out, None)):
        bad = (got - expected).abs() > allowed
        if where is not None:
            bad &= where
        if bool(bad.any()):
            raise RuntimeError(f"decode attention: the C++ products' {name} differ from PyTorch's beyond float32 "
                               f"rounding; run with {native.OPT_OUT}=torch to use PyTorch's")


# the last mask seen and its span: every layer of a forward gets the same mask object (transformers makes one a
# forward and does not change it), so its span is worked out once a forward, not once a layer; the mask is held
# (its id cannot be reused meanwhile) until ``decode_attention`` exits
_last_span: list[Any] = [None, None]


def _attended_span(mask: torch.Tensor, kv_len: int) -> tuple[int, int, torch.Tensor] | None:
    """The columns ``lo .. hi - 1`` that some row of a ``(batch, 1, 1, kv_len)`` boolean mask attends, and
    the mask's complement over them (``(batch, 1, 1, hi - lo)``, True where a row does not attend); None when
    a row attends no column."""
    if _last_span[0] is mask:
        return _last_span[1]  # type: ignore[no-any-return]
    flat = mask.reshape(-1, kv_len)  # (batch or 1, kv_len)
    span = None
    if bool(flat.any(dim=1).all()):
        attended = flat.any(dim=0).nonzero()  # (n_attended, 1): the columns some row attends
        lo, hi = int(attended[0, 0]), int(attended[-1, 0]) + 1
        span = lo, hi, ~mask[..., lo:hi]
    _last_span[:] = [mask, span]
    return span


AttentionInterface.register(PACKED_DECODE, packed_decode_attention)
AttentionMaskInterface.register(PACKED_DECODE, sdpa_mask)  # the same boolean masks as sdpa


@contextlib.contextmanager
def decode_attention(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Decode ``model`` with the attention that suits ``device``: on a CPU, a model on ``sdpa`` attention
    switches to ``packed_decode_attention`` (what it passes on runs under PyTorch's math kernel), and back
    on exit; elsewhere, or on another attention (eager for soft-capped Gemma-2), nothing changes."""
    if device.type != "cpu":
        yield
        return
    config = getattr(model, "config", None)
    switch = getattr(config, "_attn_implementation", None) == "sdpa"
    try:
        if switch:
            model.set_attn_implementation(PACKED_DECODE)  # type: ignore[operator]
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _last_span[:] = [None, None]
        _checked[0] = False
        if switch:
            model.set_attn_implementation("sdpa")  # type: ignore[operator]


__all__ = ['PACKED_DECODE', 'decode_attention', 'packed_decode_attention']
