"""``baseline``: the unsteered model, against which every other variant's deltas are measured."""

from __future__ import annotations

from steering.methods import Method, register
from steering.methods.intervention import Steering

METHOD = register(Method(
    name="baseline", stage="", section="", needs="",
    load=lambda cfg, source, model: Steering.baseline(),
    key_fields=lambda cfg, source: Steering.baseline().key_fields(),
))
