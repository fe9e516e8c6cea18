"""Config: layering, overrides, and every kind of bad value failing with a message that helps."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from core.config import CONFIGS_DIR, Config, ConfigError
from core.config_io import (
    config_from_dict,
    config_to_dict,
    config_yaml,
    flat_params,
    load_config,
    model_aliases,
    parse_overrides,
    preset_names,
    read_yaml,
)


def test_defaults_resolve_the_offline_model() -> None:
    cfg = load_config()
    assert cfg.model.alias == "smollm2-135m"
    assert cfg.data.sizes == {"pool": 60, "train": 80, "val": 40, "test": 80}
    assert cfg.layer == 15  # 0.5 of 30 layers
    assert cfg.eval.batch_size == 80  # the model file overrides base.yaml


def test_overrides_are_typed_and_layered() -> None:
    cfg = load_config("gemma-2-9b", "steering.layer=12,eval.max_new_tokens=96,eval.variants=[baseline,caa]")
    assert cfg.layer == 12
    assert cfg.eval.max_new_tokens == 96
    assert cfg.eval.variants == ("baseline", "caa")
    assert cfg.judge.model == "gemma-3-12b-it"
    assert cfg.model.dtype == "bfloat16"
    assert load_config("smollm2-135m", "mlp.lr=1e-3").mlp.lr == 0.001  # YAML reads 1e-3 as a string


def test_preset_layers_between_model_and_overrides() -> None:
    cfg = load_config("gemma-3-27b-it", "extract.max_length=300", preset="gemma3-fp16-maxlen384")
    assert cfg.extract.dtype == "float16" and cfg.extract.max_length == 300
    assert cfg.extract_dtype == "float16" and cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize("preset", preset_names())
def test_a_preset_never_lengthens_the_context(preset: str) -> None:
    """The NaN-mitigation preset caps the context at 384: a longer one is shortened, the default 256 kept."""
    for model in model_aliases():
        for section in ("extract", "iti"):
            plain = getattr(load_config(model), section).max_length
            assert getattr(load_config(model, preset=preset), section).max_length <= plain, (model, section)
    base = read_yaml(CONFIGS_DIR / "base.yaml")
    longer = {**base, "extract": {**base["extract"], "max_length": 1024}}
    if preset == "gemma3-fp16-maxlen384":
        assert load_config("gemma-3-27b-it", preset=preset, base=longer).extract.max_length == 384
        assert load_config("gemma-3-27b-it", preset=preset).extract.max_length == 256


def test_custom_split_sizes_replace_the_preset() -> None:
    cfg = load_config(None, "data.split=full,data.test=50")
    assert cfg.data.sizes == {"pool": 100, "train": 250, "val": 117, "test": 50}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steering.layr=3", "unknown config key steering.layr (did you mean layer?)"),
        ("stering.layer=3", "unknown config section 'stering' (did you mean steering?)"),
        ("eval.max_new_token=3", "did you mean max_new_tokens?"),
        ("steering.layer=30", "steering.layer=30 must be in [0, 30)"),
        ("steering.layer=-1", "steering.layer=-1 must be >= 0"),
        ("steering.layer=2.5", "steering.layer=2.5 must be an integer"),
        ("steering.layer=true", "steering.layer=True must be an integer"),
        ("steering.depth=1.5", "steering.depth=1.5 must be a fraction of the depth in [0, 1]"),
        ("steering.depth=0.5,steering.layer=3", "steering.layer=3 and steering.depth=0.5 both name the layer"),
        ("steering.scale=nan", "steering.scale=nan must be a finite number"),
        ("steering.scale=inf", "steering.scale=inf must be a finite number"),
        ("steering.scale=-.inf", "steering.scale=-inf must be a finite number"),
        ("steering.scale=big", "steering.scale='big' must be a number"),
        ("eval.batch_size=0", "eval.batch_size=0 must be > 0"),
        ("mlp.steps=-2", "mlp.steps=-2 must be > 0"),
        ("mlp.expansion=3", "mlp.expansion=3 must be 1, 2 or 4"),
        ("judge.invalid_ceiling=1.5", "judge.invalid_ceiling=1.5 must be a probability in [0, 1]"),
        ("eval.top_p=-0.1", "eval.top_p=-0.1 must be a probability in [0, 1]"),
        ("eval.do_sample=maybe", "eval.do_sample='maybe' must be true or false"),
        ("eval.variants=[basline]", "'basline' is not one of baseline, caa, mlp_mc, mlp_gen, mlp_joint, iti (did you mean baseline?)"),
        ("eval.judges=[semantik]", "did you mean semantic?"),
        ("steering.positions=some", "steering.positions='some' is not one of all, from_prompt_end"),
        ("data.split=smok", "data.split='smok' is not one of smoke, full (did you mean smoke?)"),
        ("runtime.device=gpu", "runtime.device='gpu' must be auto, cpu, mps, cuda or cuda:N"),
        ("model.dtype=float8", "model.dtype='float8' is not one of float32, bfloat16, float16"),
        ("layer=3", "must be section.key"),
        ("steering.layer", "must look like section.key=value"),
    ],
)
def test_bad_overrides_fail_naming_value_and_fix(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("smollm2-135m", override)
    assert message in str(err.value)


def test_gemma3_refuses_fp16_as_its_model_dtype() -> None:
    with pytest.raises(ConfigError, match="float16 for Gemma-3 model 'gemma-3-1b-it' overflows"):
        load_config("gemma-3-1b-it", "model.dtype=float16")


def test_unknown_model_and_preset_suggest_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'gema-2-9b'; known: .* \(did you mean gemma-2-9b\?\)"):
        load_config("gema-2-9b")
    with pytest.raises(ConfigError, match="unknown preset 'gemma3-fp16'.*did you mean gemma3-fp16-maxlen384"):
        load_config(None, preset="gemma3-fp16")


def test_yaml_is_read_safely_and_checked(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    (configs / "models").mkdir(parents=True)
    (configs / "presets").mkdir()
    (configs / "models" / "m.yaml").write_text(
        "model: {alias: m, source: gguf, gguf_package: p, gguf_file: f, architecture: llama,"
        " n_layers: 4, d_model: 8, n_params_b: 0.1, dtype: float32}\n"
    )
    (configs / "base.yaml").write_text("model: m\nsteering: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(configs_dir=configs)
    (configs / "base.yaml").write_text("model: m\nsteering: {scale: .nan}\n")
    with pytest.raises(ConfigError, match="steering.scale=nan must be a finite number"):
        load_config(configs_dir=configs)
    (configs / "base.yaml").write_text("model: m\neval: {decode_rows: -1}\n")
    with pytest.raises(ConfigError, match=r"eval.decode_rows=-1 must be >= 0 \(0: each variant decodes alone"):
        load_config(configs_dir=configs)
    (configs / "base.yaml").write_text("model: m\nmlp: {hiden: 3}\n")
    with pytest.raises(ConfigError, match="unknown config key mlp.hiden"):
        load_config(configs_dir=configs)
    (configs / "base.yaml").write_text("model: m\nsteering: {layer: 3}\n")
    assert load_config(configs_dir=configs).layer == 3


def test_frozen_and_round_trips_through_yaml() -> None:
    cfg = load_config("gemma-3-4b-it", "eval.variants=[caa],bank.sample_size=10")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steering.scale = 2.0  # type: ignore[misc]
    assert config_from_dict(yaml.safe_load(config_yaml(cfg))) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_flat_params_cover_every_field_as_strings() -> None:
    cfg = load_config()
    params = flat_params(cfg)
    n_fields = sum(len(dataclasses.fields(getattr(cfg, f.name))) for f in dataclasses.fields(Config)
                   if f.name != "preset")
    assert len(params) == n_fields + 1  # + preset
    assert params["steering.layer"] == "15"  # resolved, not "None"
    assert params["eval.variants"] == "baseline,caa,mlp_mc,mlp_gen"
    assert all(isinstance(v, str) for v in params.values())


def test_parse_overrides_keeps_lists_and_commas_in_brackets() -> None:
    assert parse_overrides("a.b=1,c.d=[x, y],e.f=text") == {"a": {"b": 1}, "c": {"d": ["x", "y"]}, "e": {"f": "text"}}


@pytest.mark.parametrize("alias", model_aliases())
def test_every_model_file_resolves(alias: str) -> None:
    cfg = load_config(alias)
    assert cfg.model.alias == alias
    assert 0 <= cfg.layer < cfg.model.n_layers
    if alias.startswith("gemma"):
        assert cfg.model.dtype in ("bfloat16", "float32")


def test_the_layer_as_a_fraction_of_the_depth_is_the_same_place_on_every_model() -> None:
    for alias, n_layers, middle in (("smollm2-135m", 30, 15), ("gemma-2-9b", 42, 21), ("gemma-3-270m", 18, 9)):
        cfg = load_config(alias, "steering.depth=0.5")
        assert (cfg.model.n_layers, cfg.layer) == (n_layers, middle)
        assert load_config(alias, "steering.depth=1.0").layer == n_layers - 1  # the last layer, never past it
        assert load_config(alias, "steering.depth=0.25").layer == round(0.25 * n_layers)
    assert load_config("smollm2-135m", "steering.layer=7").layer == 7
