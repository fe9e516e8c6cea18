"""``mlp_gen``: the MLP steering module trained on the best answers' likelihood (``steering.mlp``, branch ``gen``)."""

from __future__ import annotations

from steering.methods import Method, register
from steering.mlp import mlp_key_fields, mlp_steering

METHOD = register(Method(name="mlp_gen", stage="train_gen", section="",
                         needs="a train stage run with branch gen or both",
                         load=lambda cfg, source, model: mlp_steering(cfg, "mlp_gen", source, model),
                         key_fields=lambda cfg, source: mlp_key_fields(cfg, "mlp_gen", source)))
