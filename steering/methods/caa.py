"""``caa``: contrastive activation addition, the extract run's mean difference at ``steering.layer``
added to that layer's output times ``steering.scale`` (Rimsky et al., 2024)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from core import artifacts
from core.config import Config, ConfigError, ModelSpec
from core.tracking import download
from steering.methods import Method, register
from steering.methods.intervention import Steering, steering_key_fields
from steering.methods.tuning import Tunable, TuneAxis, per_sampler
from steering.scale import scales_from_meta


def _scales(cfg: Config, source: str) -> tuple[float, float | None]:
    """``(multiplier, relative scale)`` of ``steering.scale`` (in ``steering.scale_mode``) at ``cfg.layer``,
    from the extract run's metadata alone, so a loaded steering and its key agree exactly."""
    meta = json.loads(download(source, artifacts.CAA_META).read_text())
    return scales_from_meta(cfg.steering.scale, cfg.steering.scale_mode, meta, cfg.layer, f"extract run {source}")


def load(cfg: Config, source: str, model: Any = None) -> Steering:
    """The CAA steering of the extract run ``source`` at ``cfg.layer``, scaled by ``steering.scale`` (a
    multiplier, or in relative mode a fraction of the layer's mean residual norm: ``steering.scale``)."""
    from steering.vectors import SteeringVectors

    vectors = SteeringVectors.load(download(source, artifacts.CAA_TENSORS), download(source, artifacts.CAA_META))
    if vectors.model != cfg.model.alias:
        raise ConfigError(f"extract run {source} holds vectors of {vectors.model!r}, not {cfg.model.alias!r}; "
                          f"pass an extract run of {cfg.model.alias} (--sources caa=<run id>)")
    multiplier, relative = _scales(cfg, source)
    return Steering("caa", layer=cfg.layer, scale=multiplier, vector=vectors.at(cfg.layer),
                    positions=cfg.steering.positions, source_run=source, relative_scale=relative)


def key_fields(cfg: Config, source: str) -> dict[str, Any]:
    multiplier = _scales(cfg, source)[0] if cfg.steering.scale_mode == "relative" else cfg.steering.scale
    return steering_key_fields("caa", layer=cfg.layer, scale=multiplier, positions=cfg.steering.positions,
                               source_run=source)


def default_layers(spec: ModelSpec, sampler: str = "") -> str:
    """A band of about half the depth, centred on the model's default layer (its
    ``layer_fraction`` of the depth), clipped to the model: ``8:22`` for a 30-layer model.

    Args:
        spec: the model's registry entry.
        sampler: unused (the band is the same for every sampler).
    """
    centre, half = spec.default_layer, max(1, spec.n_layers // 4)
    return f"{max(0, centre - half)}:{min(spec.n_layers - 1, centre + half)}"


def _check_layers(low: float, high: float, spec: ModelSpec) -> str:
    if low < 0 or high >= spec.n_layers:
        return (f"must lie in [0, {spec.n_layers}) for {spec.alias}, which has {spec.n_layers} decoder layers; "
                f"e.g. layers={default_layers(spec)}")
    return ""


def steer(cfg: Config, vectors: Any, source: str, params: Mapping[str, float]) -> Steering:
    """One trial: ``vectors[layer]`` of the extraction (``steering.scale.LayerVectors``) times ``scale``, a
    multiplier or (``steering.scale_mode: relative``) a fraction of the layer's mean residual norm."""
    layer = int(params["layer"])
    multiplier, relative = vectors.scales(float(params["scale"]), cfg.steering.scale_mode, layer)
    return Steering("caa", layer=layer, scale=multiplier, vector=vectors[layer],  # (d_model,)
                    positions=cfg.steering.positions, source_run=source, relative_scale=relative)


LAYER = TuneAxis("layer", "layers", True, default_layers, example="8:20 or 6,9,12", check=_check_layers,
                 unit="layer index", help="caa: layer range or list: 8:20, 8:20:2 or 6,9,12")
SCALE = TuneAxis("scale", "scales", False, per_sampler("0:8", "0:8:2"), example="0.5:8 or 1,2,4",
                 help="caa: scale range or list: 0.5:8, 0:8:2 or 1,2,4 (relative mode: 0:1, 0:1:0.25)",
                 relative_default=per_sampler("0:1", "0:1:0.25"))
# caa's studies predate methods: they keep their names (truthsteer-<model>-<objective>) and setups
TUNE = Tunable(axes=(LAYER, SCALE), section="steering", noun="vectors", steer=steer, named=False)

METHOD = register(Method(name="caa", stage="extract", section="",
                         needs="an extract stage run (its extract/caa.safetensors)", load=load, key_fields=key_fields,
                         tune=TUNE))
