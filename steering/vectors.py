"""Steering vectors: one fp32 ``(d_model,)`` direction per decoder layer, with the model they
belong to and where they came from.

Arithmetic builds the vectors a sweep needs: ``scale * v`` for a scale sweep, ``a - b`` or
``a + b`` between vectors of the same model and layers (``v - v`` is all zeros, the baseline).
Stored as one safetensors file holding ``vectors`` ``(n_layers, d_model)`` in layer order beside a
JSON sidecar with the model, the layer indices and the provenance (``core.artifacts``), so the
CAA artifact of the extract stage loads directly with ``SteeringVectors.load``.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.artifacts import load_tensors, save_tensors

VECTORS_KEY = "vectors"  # the safetensors key of the stacked (n_layers, d_model) vectors


def _check_scale(scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(
            f"cannot scale steering vectors by a {type(scale).__name__}; use a finite real number (e.g. 0.5, 4, -2.0)"
        )
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale={scale!r} must be a finite real number (e.g. 0.5, 4, -2.0)")
    return float(scale)


def _json_copy(provenance: object) -> dict[str, Any]:
    """A JSON round trip, so that what is kept equals what a save/load gives back."""
    if not isinstance(provenance, Mapping):
        raise ValueError(f"provenance={provenance!r} must be a dict of JSON values, e.g. {{'run_id': '...'}}")
    try:
        copied = json.loads(json.dumps(dict(provenance), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"provenance must hold only JSON values (str, int, finite float, bool, None, list, dict with str keys): "
            f"{err}; convert tensors and paths with .tolist() / str() first"
        ) from None
    return dict(copied)


@dataclass(frozen=True, eq=False)
class SteeringVectors:
    """Per-layer steering directions of one model.

    Args:
        vectors: ``{layer: (d_model,) tensor}``; stored as detached fp32 copies in layer order.
        model: the model alias the vectors were read from, e.g. ``smollm2-135m``.
        provenance: JSON-compatible facts about their origin (run id, config hash, ...).
    """

    vectors: dict[int, Tensor]
    model: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.vectors, Mapping) or not self.vectors:
            raise ValueError(f"vectors={self.vectors!r} must be a non-empty dict {{layer: (d_model,) tensor}}")
        if not self.model:
            raise ValueError("model is empty; pass the model alias the vectors belong to, e.g. 'smollm2-135m'")
        widths = set()
        for layer, vector in self.vectors.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"layer key {layer!r} must be a non-negative int decoder-layer index")
            if not isinstance(vector, Tensor) or vector.ndim != 1 or not vector.is_floating_point():
                shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
                raise ValueError(f"vectors[{layer}] has shape {shape}; each must be a float tensor of shape (d_model,)")
            widths.add(vector.shape[0])
        if len(widths) != 1:
            raise ValueError(f"vectors have different widths {sorted(widths)}; all layers need the same d_model")
        ordered = {layer: self.vectors[layer].detach().float().clone() for layer in sorted(self.vectors)}
        object.__setattr__(self, "vectors", ordered)
        object.__setattr__(self, "provenance", _json_copy(self.provenance))

    @property
    def layers(self) -> tuple[int, ...]:
        """The layer indices, ascending."""
        return tuple(self.vectors)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    def at(self, layer: int) -> Tensor:
        """The ``(d_model,)`` vector of ``layer``.

        Args:
            layer: a decoder layer index present in ``layers``.
        """
        if isinstance(layer, bool) or layer not in self.vectors:
            raise ValueError(
                f"layer={layer!r} has no vector; this {self.model} set has layers "
                f"{self.layers[0]}..{self.layers[-1]} ({len(self.layers)} of them)"
            )
        return self.vectors[layer]

    def norms(self) -> dict[int, float]:
        """``{layer: L2 norm}``."""
        return {layer: float(vector.norm()) for layer, vector in self.vectors.items()}

    # ---------------------------------------------------------------- arithmetic

    def _scaled(self, scale: float) -> SteeringVectors:
        return SteeringVectors(
            {layer: scale * vector for layer, vector in self.vectors.items()},  # (d_model,) each
            self.model,
            {"op": "scale", "scale": scale, "of": self.provenance},
        )

    def __mul__(self, scale: object) -> SteeringVectors:
        return self._scaled(_check_scale(scale))

    __rmul__ = __mul__

    def __truediv__(self, scale: object) -> SteeringVectors:
        value = _check_scale(scale)
        if value == 0.0:
            raise ValueError("scale=0 cannot divide steering vectors; multiply by 0 for the zero vectors instead")
        return self._scaled(1.0 / value)

    def __neg__(self) -> SteeringVectors:
        return self._scaled(-1.0)

    def _combine(self, other: object, op: str) -> SteeringVectors:
        if not isinstance(other, SteeringVectors):
            raise ValueError(
                f"cannot {op} {type(other).__name__} and SteeringVectors; combine two SteeringVectors, or scale by "
                "a number with *"
            )
        if other.model != self.model or other.layers != self.layers or other.d_model != self.d_model:
            raise ValueError(
                f"cannot {op} vectors of {self.model!r} (layers {list(self.layers)}, d_model {self.d_model}) and "
                f"{other.model!r} (layers {list(other.layers)}, d_model {other.d_model}); both need the same "
                "model, layers and width"
            )
        sign = 1.0 if op == "add" else -1.0
        combined = {
            layer: self.vectors[layer] + sign * other.vectors[layer].to(self.vectors[layer].device)  # (d_model,)
            for layer in self.layers
        }
        return SteeringVectors(combined, self.model, {"op": op, "left": self.provenance, "right": other.provenance})

    def __add__(self, other: object) -> SteeringVectors:
        return self._combine(other, "add")

    def __sub__(self, other: object) -> SteeringVectors:
        return self._combine(other, "subtract")

    def __eq__(self, other: object) -> bool:
        """Same model, provenance, layers and bit-identical vectors."""
        if not isinstance(other, SteeringVectors):
            return NotImplemented
        return (
            self.model == other.model
            and self.provenance == other.provenance
            and self.layers == other.layers
            and all(torch.equal(self.vectors[layer], other.vectors[layer]) for layer in self.layers)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable tensors inside

    # ---------------------------------------------------------------- storage

    def to_tensors(self) -> dict[str, Tensor]:
        """``{"vectors": (n_layers, d_model)}`` in ``layers`` order, for safetensors."""
        return {VECTORS_KEY: torch.stack([v.cpu() for v in self.vectors.values()])}  # (n_layers, d_model)

    def to_meta(self) -> dict[str, Any]:
        """The JSON sidecar: model, layers (row order of ``vectors``), d_model, provenance."""
        return {"model": self.model, "layers": list(self.layers), "d_model": self.d_model,
                "provenance": self.provenance}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> SteeringVectors:
        """Rebuild from ``to_tensors`` / ``to_meta`` output (extra keys, as in the CAA artifact, are ignored).

        Args:
            tensors: must hold ``vectors`` ``(n_layers, d_model)``.
            meta: must hold ``model``, ``layers`` and ``provenance``.
        """
        missing = [k for k in ("model", "layers", "provenance") if k not in meta]
        if VECTORS_KEY not in tensors or missing:
            raise ValueError(
                f"not a steering-vectors artifact: tensors have {sorted(tensors)} (need {VECTORS_KEY!r}), "
                f"meta lacks {missing}; write it with SteeringVectors.save"
            )
        stacked = tensors[VECTORS_KEY]  # (n_layers, d_model)
        layers = [int(layer) for layer in meta["layers"]]
        if stacked.ndim != 2 or stacked.shape[0] != len(layers):
            raise ValueError(
                f"{VECTORS_KEY!r} has shape {tuple(stacked.shape)} but meta lists {len(layers)} layers; "
                "the artifact is inconsistent, re-run the stage that wrote it"
            )
        return cls({layer: stacked[row] for row, layer in enumerate(layers)}, str(meta["model"]),
                   dict(meta["provenance"]))

    def save(self, tensors_path: str | Path, meta_path: str | Path) -> None:
        """Write ``tensors_path`` (safetensors) and ``meta_path`` (JSON).

        Args:
            tensors_path: e.g. ``out/caa.safetensors``.
            meta_path: e.g. ``out/caa.json``.
        """
        save_tensors(Path(tensors_path), Path(meta_path), self.to_tensors(), self.to_meta())

    @classmethod
    def load(cls, tensors_path: str | Path, meta_path: str | Path) -> SteeringVectors:
        """Read what ``save`` wrote (or the extract stage's CAA artifact).

        Args:
            tensors_path: the safetensors file.
            meta_path: its JSON sidecar.
        """
        tensors, meta = load_tensors(Path(tensors_path), Path(meta_path))
        return cls.from_tensors(tensors, meta)
