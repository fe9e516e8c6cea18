"""Steering scales that transfer across models: a relative scale is a fraction of the residual stream's size.

``steering.scale_mode: absolute`` multiplies the steering vector by ``steering.scale`` as it is. In
``relative`` mode the added vector's norm is ``steering.scale`` times the mean residual-stream norm at the
steering layer (``Extraction.resid_norm``, measured by ``extract`` on the pool's answer tokens), so the
multiplier it resolves to is ``scale * resid_norm / ||vector||``. A relative scale of 0.5 then means the
same thing on a 30-layer 135M model as on a 42-layer 9B one, whose residual norms differ by 10x or more.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from core.config import ConfigError

RESID_NORM_KEY = "resid_norm_by_layer"  # CAA_META's list of the mean residual norm per layer
SCALE_METRIC = "steering_scale"  # the multiplier a run steered with, after resolving a relative scale
RELATIVE_SCALE_METRIC = "steering_scale_relative"  # the same as a fraction of the layer's mean residual norm


def resid_norm_at(meta: Mapping[str, Any], layer: int, where: str) -> float:
    """The mean residual norm at ``layer`` recorded in an extraction's metadata.

    Args:
        meta: ``CAA_META`` of an extract run (or of tune's cache).
        layer: the steering layer.
        where: what the metadata belongs to, for the error (``extract run <id>``).
    """
    norms: Sequence[float] | None = meta.get(RESID_NORM_KEY)
    if norms is None:
        raise ConfigError(f"{where} has no residual norms ({RESID_NORM_KEY}): it predates steering.scale_mode="
                          "relative; run extract again, or use steering.scale_mode=absolute")
    return float(norms[layer])


def multiplier_per_relative(vector_norm: float, resid_norm: float | None, where: str) -> float:
    """What one unit of relative scale multiplies a vector by: ``resid_norm / ||vector||``.

    Args:
        vector_norm: the steering vector's L2 norm at the layer.
        resid_norm: the mean residual norm at the layer (None when the source did not measure it).
        where: the vector's source, for the errors.
    """
    if resid_norm is None:
        raise ConfigError(f"{where} has no residual norms: it predates steering.scale_mode=relative; run extract "
                          "again, or use steering.scale_mode=absolute")
    if not (math.isfinite(vector_norm) and vector_norm > 0 and math.isfinite(resid_norm) and resid_norm > 0):
        raise ConfigError(f"{where}: the vector's norm {vector_norm:g} or the residual norm {resid_norm:g} is zero "
                          "or not finite, so a relative scale has no size; use steering.scale_mode=absolute")
    return resid_norm / vector_norm


def resolve_scale(scale: float, mode: str, vector_norm: float, resid_norm: float | None, where: str) -> float:
    """The multiplier of a vector that ``steering.scale`` in ``mode`` stands for.

    Args:
        scale: ``steering.scale`` (a multiplier when ``absolute``, a fraction of the residual norm when ``relative``).
        mode: ``steering.scale_mode``.
        vector_norm: the steering vector's L2 norm at the layer.
        resid_norm: the mean residual norm at the layer (only read in relative mode).
        where: the vector's source, for the errors.
    """
    if mode == "absolute":
        return float(scale)
    return float(scale) * multiplier_per_relative(vector_norm, resid_norm, where)


def relative_of(multiplier: float, vector_norm: float, resid_norm: float | None) -> float | None:
    """The relative scale an absolute ``multiplier`` of a vector amounts to, to 12 significant digits (None when the
    residual norm is unknown)."""
    if resid_norm is None or not math.isfinite(resid_norm) or resid_norm <= 0:
        return None
    return float(f"{float(multiplier) * float(vector_norm) / resid_norm:.12g}")  # 0.2, not 0.19999999999999998


def scales_from_meta(scale: float, mode: str, meta: Mapping[str, Any], layer: int, where: str) -> tuple[float, float | None]:
    """``(multiplier, relative scale or None)`` of ``steering.scale`` at ``layer`` of an extraction's metadata
    (its ``norms`` and ``resid_norm_by_layer``), the same numbers whether the vectors are loaded or not.

    Args:
        scale: ``steering.scale``.
        mode: ``steering.scale_mode``.
        meta: ``CAA_META`` of the extraction.
        layer: the steering layer.
        where: the extraction's source, for the errors.
    """
    if "norms" not in meta:
        if mode == "relative":
            raise ConfigError(f"{where} records no vector norms: it predates steering.scale_mode=relative; run "
                              "extract again, or use steering.scale_mode=absolute")
        return float(scale), None
    vector_norm = float(meta["norms"][layer])
    resid = resid_norm_at(meta, layer, where) if mode == "relative" or RESID_NORM_KEY in meta else None
    multiplier = resolve_scale(scale, mode, vector_norm, resid, where)
    return multiplier, relative_of(multiplier, vector_norm, resid)


@dataclasses.dataclass(frozen=True, eq=False)
class LayerVectors:
    """One all-layer extraction's vectors with the residual norms a relative scale needs (tune's shared source).

    Args:
        vectors: ``(n_layers, d_model)`` CAA vectors.
        resid_norm: ``(n_layers,)`` mean residual norm per layer; None when the extraction did not measure it.
        where: where they come from, for errors.
    """

    vectors: Tensor
    resid_norm: Tensor | None = None
    where: str = "the extraction"

    def __getitem__(self, layer: int) -> Tensor:
        return self.vectors[layer]  # (d_model,)

    def scales(self, scale: float, mode: str, layer: int) -> tuple[float, float | None]:
        """``(multiplier, relative scale or None)`` of ``scale`` in ``mode`` at ``layer``."""
        vector_norm = float(self.vectors[layer].norm())
        resid = None if self.resid_norm is None else float(self.resid_norm[layer])
        multiplier = resolve_scale(scale, mode, vector_norm, resid, self.where)
        return multiplier, relative_of(multiplier, vector_norm, resid)


__all__ = ["LayerVectors", "RELATIVE_SCALE_METRIC", "RESID_NORM_KEY", "SCALE_METRIC", "multiplier_per_relative", "relative_of", "resid_norm_at", "resolve_scale",
           "scales_from_meta"]
