"""Reading a run's configuration: ``load_config`` merges base.yaml, the model file, a preset and the
command-line overrides (``yaml.safe_load`` only), checks every key and coerces every value to its field's
type, naming the nearest valid key or the expected type; and the config back to dicts, YAML and params."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from core.checks import _nearest
from core.config import (
    CONFIGS_DIR,
    SECTIONS,
    Config,
    ConfigError,
    ModelSpec,
)

_SECTION_TYPES = typing.get_type_hints(Config)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            allowed = [str(a) for a in args]
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}{_nearest(str(value), allowed)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split("|")) if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. [a, b]")
        return tuple(_coerce(key, v, args[0]) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, str):  # YAML reads "nan", "inf" and "1e-3" as strings
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be a number") from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{key}={value} must be a finite number")
            return value
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, section: str, raw: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(
                f"unknown config key {section}.{key}{_nearest(key, valid)}; valid keys in {section}: {', '.join(valid)}"
            )
        values[key] = _coerce(f"{section}.{key}", value, hints[key])
    try:
        return cls(**values)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{section}: {err}") from None


def _merge(base: dict[str, Any], update: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value, where)
        else:
            out[key] = value
    return out


def _apply_caps(raw: dict[str, Any], caps: Mapping[str, Any], preset: str) -> dict[str, Any]:
    """A preset's ``caps`` (``{"extract.max_length": 384}``): upper bounds, so that the preset shortens a
    setting and never lengthens it (the value becomes ``min(value so far, cap)``)."""
    if not isinstance(caps, Mapping):
        raise ConfigError(f"preset {preset!r}: caps must map dotted keys to numbers, e.g. extract.max_length: 384")
    out = dict(raw)
    for dotted, cap in caps.items():
        section, _, key = str(dotted).partition(".")
        current = out.get(section, {}).get(key) if isinstance(out.get(section), Mapping) else None
        if not key or isinstance(cap, bool) or not isinstance(cap, (int, float)) or not isinstance(current, (int, float)):
            raise ConfigError(f"preset {preset!r}: cap {dotted}={cap!r} must bound a numeric setting <section>.<key>")
        out[section] = {**out[section], key: min(current, cap)}
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with ``safe_load``; anything else is an error naming the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, found {type(data).__name__}")
    return data


def model_aliases(configs_dir: Path = CONFIGS_DIR) -> list[str]:
    return sorted(p.stem for p in (configs_dir / "models").glob("*.yaml"))


def preset_names(configs_dir: Path = CONFIGS_DIR) -> list[str]:
    return sorted(p.stem for p in (configs_dir / "presets").glob("*.yaml"))


def _model_file(alias: str, configs_dir: Path) -> Path:
    known = model_aliases(configs_dir)
    if alias not in known:
        raise ConfigError(f"unknown model {alias!r}; known: {', '.join(known)}{_nearest(alias, known)}")
    return configs_dir / "models" / f"{alias}.yaml"


def model_spec(alias: str, configs_dir: Path = CONFIGS_DIR) -> ModelSpec:
    """The registry entry of ``alias`` (the ``model:`` section of its file), without loading weights."""
    raw = read_yaml(_model_file(alias, configs_dir)).get("model", {})
    spec = _build(ModelSpec, "model", raw)
    if spec.alias != alias:
        raise ConfigError(f"configs/models/{alias}.yaml declares model.alias={spec.alias!r}; they must match")
    return spec


def split_overrides(text: str) -> list[str]:
    """Split ``a=1,b=[x,y]`` on commas outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_overrides(overrides: str | Sequence[str]) -> dict[str, Any]:
    """Parse ``"steering.layer=12,eval.max_new_tokens=96"`` into a nested dict.

    Values are read as YAML scalars or flow lists (``eval.variants=[baseline,caa]``).
    """
    items = split_overrides(overrides) if isinstance(overrides, str) else [o for o in overrides if o.strip()]
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text.strip()
        path = key.split(".")
        if len(path) != 2:
            raise ConfigError(f"override key {key!r} must be section.key, e.g. steering.layer=12")
        nested.setdefault(path[0], {})[path[1]] = value
    return nested


def load_config(
    model: str | None = None,
    overrides: str | Sequence[str] = "",
    preset: str | None = None,
    configs_dir: Path = CONFIGS_DIR,
    base: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve base.yaml, the model's file, a preset and overrides into a validated Config.

    Args:
        model: model alias; ``None`` or ``""`` takes base.yaml's ``model``.
        overrides: dotted overrides, a comma-separated string or a list of ``key=value``.
        preset: name of a file under ``configs/presets/``.
        configs_dir: where base.yaml, models/ and presets/ live.
        base: a raw config mapping used in place of base.yaml (to rebuild a logged config).
    """
    raw = dict(base) if base is not None else read_yaml(configs_dir / "base.yaml")
    parsed = parse_overrides(overrides)
    alias = model or str(parsed.pop("model", {}).get("alias", "") or raw.pop("model", "") or "")
    raw.pop("model", None)
    raw.pop("preset", None)
    if not alias:
        raise ConfigError("no model given; pass --model (e.g. smollm2-135m) or set model in base.yaml")
    model_raw = read_yaml(_model_file(alias, configs_dir))
    raw = _merge(raw, {k: v for k, v in model_raw.items() if k != "model"}, "model file")
    spec_raw = dict(model_raw.get("model", {}))
    if preset:
        known = preset_names(configs_dir)
        if preset not in known:
            raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(known) or 'none'}{_nearest(preset, known)}")
        fragment = read_yaml(configs_dir / "presets" / f"{preset}.yaml")
        raw = _apply_caps(_merge(raw, {k: v for k, v in fragment.items() if k != "caps"}, "preset"),
                          fragment.get("caps") or {}, preset)
    spec_raw = _merge(spec_raw, raw.pop("model", {}) if isinstance(raw.get("model"), Mapping) else {}, "model")
    spec_raw = _merge(spec_raw, parsed.pop("model", {}), "overrides")
    raw = _merge(raw, parsed, "overrides")
    return _from_raw(spec_raw, raw, preset or "")


def _from_raw(spec_raw: Mapping[str, Any], raw: Mapping[str, Any], preset: str) -> Config:
    sections = [name for name in SECTIONS if name != "model"]
    for name, value in raw.items():
        if name not in sections:
            valid = ["model", *sections]
            raise ConfigError(f"unknown config section {name!r}{_nearest(name, valid)}; valid sections: {', '.join(valid)}")
        if not isinstance(value, Mapping):
            raise ConfigError(f"config section {name!r} must be a mapping of keys, got {value!r}")
    built = {name: _build(_SECTION_TYPES[name], name, raw.get(name, {})) for name in sections}
    spec = _build(ModelSpec, "model", spec_raw)
    return Config(model=spec, preset=preset, **built)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (lists for tuples), as written to ``config.yaml``."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a Config from ``config_to_dict`` output (e.g. a logged ``config.yaml``)."""
    raw = {k: v for k, v in data.items() if k not in ("model", "preset")}
    return _from_raw(data["model"], raw, str(data.get("preset", "")))


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def flat_params(cfg: Config) -> dict[str, str]:
    """``{"steering.layer": "12", ...}``: the resolved config as MLflow params (strings)."""
    flat: dict[str, str] = {}
    for section, values in config_to_dict(cfg).items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        else:  # "preset": prefixed, as MLproject's own `preset` param is logged under that name
            flat[f"config.{section}"] = str(values)
    flat["steering.layer"] = str(cfg.layer)
    return flat


__all__ = ['config_from_dict', 'config_to_dict', 'config_yaml', 'flat_params', 'load_config', 'model_aliases', 'model_spec', 'parse_overrides', 'preset_names', 'read_yaml', 'split_overrides']
