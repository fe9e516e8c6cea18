"""``mlp_mc``: the MLP steering module trained on the MC margin (``steering.mlp``, branch ``mc``)."""

from __future__ import annotations

from steering.methods import Method, register
from steering.mlp import mlp_key_fields, mlp_steering

METHOD = register(Method(name="mlp_mc", stage="train_mc", section="",
                         needs="a train stage run with branch mc or both",
                         load=lambda cfg, source, model: mlp_steering(cfg, "mlp_mc", source, model),
                         key_fields=lambda cfg, source: mlp_key_fields(cfg, "mlp_mc", source)))
