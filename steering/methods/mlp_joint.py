"""``mlp_joint``: the MLP steering module trained on the weighted sum of the MC margin and the best answers'
likelihood (``steering.mlp``, branch ``joint``; weights ``mlp.mc_weight`` and ``mlp.gen_weight``)."""

from __future__ import annotations

from steering.methods import Method, register
from steering.mlp import mlp_key_fields, mlp_steering

METHOD = register(Method(name="mlp_joint", stage="train_joint", section="",
                         needs="a train stage run with branch joint",
                         load=lambda cfg, source, model: mlp_steering(cfg, "mlp_joint", source, model),
                         key_fields=lambda cfg, source: mlp_key_fields(cfg, "mlp_joint", source)))
