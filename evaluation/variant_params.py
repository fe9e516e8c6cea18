"""What a variant run records as params: the config that variant ran, and the knobs that tell it from the others.

Every variant run of an evaluation shares its parent's config, but not every setting applies to every variant:
baseline steers nothing, so it logs no ``steering.*``; CAA reads no MLP settings. ``variant_params`` keeps the
sections a variant uses and adds ``variant.*``, the settings its answers depend on (``key_fields`` of its
steering: layer, the multiplier it resolved to, positions, source run; for an MLP module its width and bank
multiplier), so that
MLflow's Compare page can plot and tell apart the variants. Empty values are left out rather than logged as ``''``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The config sections a variant does not read, by variant (others: ``iti.`` only). ``run.`` and ``eval.``
# (what was asked and how it was judged) always stay.
UNUSED = {
    "baseline": ("steering.", "mlp.", "bank.", "iti.", "extract."),
    "caa": ("mlp.", "iti."),
    "iti": ("steering.", "mlp.", "bank."),
}
DEFAULT_UNUSED = ("iti.",)
VARIANT_PREFIX = "variant."


def variant_params(flat: Mapping[str, str], key_fields: Mapping[str, Any], *, module: Any = None) -> dict[str, str]:
    """A variant run's params.

    Args:
        flat: the evaluation's config as params (``core.config_io.flat_params``).
        key_fields: the variant's ``Steering.key_fields()`` (``variant`` and, when steered, ``layer``, ``scale``,
            ``positions``, ``source_run``, ``steering_revision``).
        module: the variant's steering module (an MLP), whose width ``config.expansion`` and bank-mixture
            multiplier ``config.scale`` are logged as ``variant.mlp_expansion`` and ``variant.mlp_scale``; None
            for a vector or no steering.
    """
    variant = str(key_fields["variant"])
    unused = UNUSED.get(variant, DEFAULT_UNUSED)
    params = {k: v for k, v in flat.items() if v != "" and not k.startswith(unused)}
    params.update({f"{VARIANT_PREFIX}{k}" if k != "variant" else "variant": str(v)
                   for k, v in key_fields.items() if v is not None and v != ""})
    config = getattr(module, "config", None)
    for name in ("expansion", "scale"):
        if getattr(config, name, None) is not None:
            params[f"{VARIANT_PREFIX}mlp_{name}"] = str(getattr(config, name))
    return params


__all__ = ['UNUSED', 'VARIANT_PREFIX', 'variant_params']
