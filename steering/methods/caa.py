"""``caa``: contrastive activation addition, the extract run's mean difference at ``steering.layer``
added to that layer's output times ``steering.scale`` (Rimsky et al., 2024)."""

from __future__ import annotations

from typing import Any

from core import artifacts
from core.config import Config, ConfigError
from core.tracking import download
from steering.methods import Method, register
from steering.methods.intervention import Steering, steering_key_fields


def load(cfg: Config, source: str, model: Any = None) -> Steering:
    """The CAA steering of the extract run ``source`` at ``cfg.layer``, scaled by ``steering.scale``."""
    from steering.vectors import SteeringVectors

    vectors = SteeringVectors.load(download(source, artifacts.CAA_TENSORS), download(source, artifacts.CAA_META))
    if vectors.model != cfg.model.alias:
        raise ConfigError(f"extract run {source} holds vectors of {vectors.model!r}, not {cfg.model.alias!r}; "
                          f"pass an extract run of {cfg.model.alias} (--sources caa=<run id>)")
    return Steering("caa", layer=cfg.layer, scale=cfg.steering.scale, vector=vectors.at(cfg.layer),
                    positions=cfg.steering.positions, source_run=source)


def key_fields(cfg: Config, source: str) -> dict[str, Any]:
    return steering_key_fields("caa", layer=cfg.layer, scale=cfg.steering.scale, positions=cfg.steering.positions,
                               source_run=source)


METHOD = register(Method(name="caa", stage="extract", section="",
                         needs="an extract stage run (its extract/caa.safetensors)", load=load, key_fields=key_fields))
