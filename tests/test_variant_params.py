"""A variant run's params are what that variant ran: the config sections it reads and ``variant.*``."""

from __future__ import annotations

import torch

from core.config_io import flat_params, load_config
from evaluation.variant_params import variant_params
from steering.methods.intervention import steering_key_fields
from steering.mlp import MLPSteering, MLPSteeringConfig

FLAT = flat_params(load_config("smollm2-135m", "steering.layer=7,steering.scale=2.5"))


def _key(variant: str, scale: float) -> dict[str, object]:
    return steering_key_fields(variant, layer=7, scale=scale, positions="from_prompt_end", source_run="run-1")


def test_baseline_logs_no_steering_and_nothing_empty() -> None:
    assert "" in FLAT.values()  # the config has unset settings (judge.trained, ...)
    params = variant_params(FLAT, steering_key_fields("baseline", layer=None, scale=1.0, positions="all",
                                                      source_run=""))
    assert params["variant"] == "baseline" and "" not in params.values()
    assert not any(k.startswith(("steering.", "mlp.", "bank.", "iti.", "extract.", "variant.")) for k in params)
    assert params["eval.max_new_tokens"] == FLAT["eval.max_new_tokens"] and params["model.alias"] == "smollm2-135m"


def test_caa_logs_its_layer_multiplier_and_source_but_no_mlp_settings() -> None:
    params = variant_params(FLAT, _key("caa", 2.5))
    assert {k: params[k] for k in ("variant", "variant.layer", "variant.scale", "variant.source_run")} == {
        "variant": "caa", "variant.layer": "7", "variant.scale": "2.5", "variant.source_run": "run-1"}
    assert params["steering.scale"] == "2.5" and params["bank.n_bootstrap"] == FLAT["bank.n_bootstrap"]
    assert not any(k.startswith(("mlp.", "iti.")) for k in params) and "variant.mlp_expansion" not in params


def test_an_mlp_variant_logs_its_module_width_and_bank_multiplier() -> None:
    module = MLPSteering(MLPSteeringConfig(model="smollm2-135m", layer=7, d_model=4, n_bank=2, expansion=4,
                                           scale=3.0), torch.zeros(2, 4))
    params = variant_params(FLAT, _key("mlp_gen", 1.0), module=module)
    assert (params["variant.mlp_expansion"], params["variant.mlp_scale"], params["variant.scale"]) == ("4", "3.0", "1.0")
    assert params["mlp.expansion"] == FLAT["mlp.expansion"] and not any(k.startswith("iti.") for k in params)
