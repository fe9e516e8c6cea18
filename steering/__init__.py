"""truthsteer's steering library: hooks, layers, the KV cache, CAA vectors, the vector bank, the MLP
and its training maths. It imports ``core`` and never ``evaluation`` or ``stages``.

Public names are re-exported lazily, so that ``import steering`` does not import torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "decoder_layers": "steering.layers",
    "record_residuals": "steering.hooks",
    "steer": "steering.hooks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'steering' has no attribute {name!r}")
