"""The KV cache across transformers versions, found by type and by the model's own signature.

transformers renames the cache's keyword between minor versions: 5.23 takes and returns
``past_key_values``, 5.24 ``cache`` (the old name deprecated, to be removed in 5.40), and decoder
layers follow their own schedule. Nothing here names a keyword blindly: a cache is recognised by its
type (``transformers.Cache``), and the keyword a model's ``forward`` takes is read from its signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from torch import nn
from transformers import Cache

CACHE_KEYWORDS = ("cache", "past_key_values")  # newest first


def find_cache(values: Iterable[Any]) -> Cache | None:
    """The first ``transformers.Cache`` among ``values``, or None.

    Args:
        values: e.g. a decoder layer's positional and keyword argument values, or a model output's values.
    """
    for value in values:
        if isinstance(value, Cache):
            return value
    return None


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by (``cache`` or ``past_key_values``).

    Args:
        model: a causal LM or base model.

    Raises:
        ValueError: when its forward takes neither.
    """
    parameters = inspect.signature(model.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise ValueError(
        f"{type(model).__name__}.forward takes none of {', '.join(CACHE_KEYWORDS)}; this transformers version "
        "renamed the KV cache argument again: add its name to steering.cache.CACHE_KEYWORDS"
    )


def with_cache(model: nn.Module, cache: Cache | None) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to ``model.forward`` under the name it takes.

    Args:
        model: the model (or base model) to call.
        cache: the cache, or None for a forward that starts a fresh one (with ``use_cache=True``).
    """
    return {cache_keyword(model): cache}


def output_cache(output: Any) -> Cache:
    """The KV cache a forward with ``use_cache=True`` returned, whatever its field is called.

    Args:
        output: the model's output (a ``ModelOutput``).

    Raises:
        ValueError: when the output holds no cache.
    """
    found = find_cache(output.values())
    if found is None:
        raise ValueError(f"{type(output).__name__} holds no KV cache; call the model with use_cache=True")
    return found


__all__ = ["CACHE_KEYWORDS", "cache_keyword", "find_cache", "output_cache", "with_cache"]
