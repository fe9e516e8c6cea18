"""The ``sweep`` stage: the researchers' ablations as one command, over steering scale, layer, MLP width,
MLP branch and seed.

A grid (a YAML file under ``configs/sweeps/`` or an inline ``"scale=[0,2,4];variants=[caa,mlp_mc]"``) names
the values of each knob; the cells are their product. Each cell is one ``evaluate`` run, nested in the sweep's
parent run, whose variant runs have exactly ``evaluate``'s metric names and carry the cell's knobs as tags
(``sweep.scale``, ``sweep.layer``, ``sweep.mlp_expansion``, ``sweep.branch``, ``sweep.seed``; ``sweep.name``
and ``sweep.reference``, the point a figure holds a knob it does not vary at). A variant is evaluated only
in the cells its result depends on (``depends``): CAA per scale and layer, an MLP arm per scale, layer, width
and seed (greedy answers do not depend on the seed), and baseline in every cell, so that every variant has its
paired difference from baseline; its answers are generated once and then read from the generation store.

What the knobs set:
  - ``scale``: ``steering.scale`` of CAA at evaluation, and ``eval.mlp_scale`` of the MLP arms: each module,
    trained at the config's ``steering.scale``, has its delta rescaled so that its bank mixture starts at the
    cell's scale, as CAA's vector is multiplied by it (``steering.mlp.mlp_hook_scale``);
  - ``layer``: ``steering.layer`` (the bank, the MLP modules and the evaluation; the extraction has every layer);
  - ``mlp_expansion``: ``mlp.expansion``;
  - ``branch``: the MLP arms, ``mlp_<branch>`` for ``mc``, ``gen`` and ``joint`` (they replace the ``mlp_*``
    of ``variants``);
  - ``seed``: the stochastic parts: ``bank.seed`` (bootstrap), ``mlp.seed`` (initialisation, batch order, the
    incorrect answer contrasted), ``iti.seed`` and, with ``eval.do_sample``, ``eval.seed``.
A knob the grid does not name keeps the config's value and is not overridden.

Every stage goes through ``pipeline.run_stage``: a finished run with the same stage key is reused, so the
extraction runs once, a bank once per (layer, seed), an MLP once per (layer, width, branch, seed), and a
sweep killed mid-way recomputes no finished cell when started again (the cell's key has the sweep's name, so
a ``full`` run's evaluation is never taken for a cell). The parent logs ``sweep/cells.json`` after each cell.
The dry run is ``stages.sweep_plan``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import RunTag

from core.artifacts import (
    SWEEP_CELLS,
    SWEEP_KNOBS,
    TAG_PARENT,
    TAG_REUSED,
    TAG_SWEEP_NAME,
    TAG_SWEEP_REFERENCE,
    TAG_VARIANT,
    sweep_tag,
)
from core.config import Config, ConfigError
from core.config_io import CONFIGS_DIR
from stages import pipeline
from steering.methods import check_variants, variant_order

SWEEPS_DIR = CONFIGS_DIR / "sweeps"
BRANCH_KNOB_VALUES = ("mc", "gen", "joint")
CELL_KNOBS = ("layer", "seed", "mlp_expansion", "scale")  # a cell's knobs, outermost first (branch: its MLP arms)
DESIGNS = ("product", "one_at_a_time")


@dataclasses.dataclass(frozen=True)
class Grid:
    """A sweep's grid.

    Args:
        name: its name (a file's stem, or ``inline``): the ``sweep.name`` tag and part of each cell's key.
        knobs: the values of each swept knob (``SWEEP_KNOBS``), in order.
        variants: the variants; None takes ``eval.variants``.
        overrides: settings of every cell, ``section.key=value`` (before the command's ``--overrides``).
        design: ``product`` (every combination of the knobs' values) or ``one_at_a_time`` (the reference point,
            and each knob's other values with the rest at the reference: what the figures draw, at a fraction
            of the cells).
        crossed: with ``one_at_a_time``, knobs whose every value repeats each point (e.g. ``[seed]``: every
            point of the scale curve is repeated over seeds).
    """

    name: str
    knobs: Mapping[str, tuple[Any, ...]]
    variants: tuple[str, ...] | None = None
    overrides: tuple[str, ...] = ()
    design: str = "product"
    crossed: tuple[str, ...] = ()


def _values(knob: str, raw: Any, where: str) -> tuple[Any, ...]:
    values = tuple(raw) if isinstance(raw, list | tuple) else (raw,)
    if not values:
        raise ConfigError(f"{where}: {knob}=[] has no values; give at least one, e.g. {knob}=[{_example(knob)}]")
    for value in values:
        ok = (value in BRANCH_KNOB_VALUES if knob == "branch"
              else isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
              and (knob == "scale" or float(value).is_integer()))
        if not ok:
            raise ConfigError(f"{where}: {knob} value {value!r} is not {_kind(knob)}; e.g. {knob}=[{_example(knob)}]")
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}: {knob}={list(values)} repeats a value; list each once")
    return tuple(v if knob == "branch" else float(v) if knob == "scale" else int(v) for v in values)


def _kind(knob: str) -> str:
    return {"scale": "a number", "branch": "one of " + ", ".join(BRANCH_KNOB_VALUES)}.get(knob, "a whole number")


def _example(knob: str) -> str:
    return {"scale": "0,2,4", "layer": "10,15", "mlp_expansion": "1,2,4", "branch": "mc,gen,joint", "seed": "0,1,2"}[knob]


def _grid_from_mapping(data: Mapping[str, Any], name: str, where: str) -> Grid:
    allowed = {"name", "grid", "variants", "overrides", "description", "design", "crossed"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; a sweep file has {', '.join(sorted(allowed))}")
    knobs_raw = data.get("grid") or {}
    if not isinstance(knobs_raw, Mapping):
        raise ConfigError(f"{where}: grid must map knobs to lists of values, e.g. grid: {{scale: [0, 2, 4]}}")
    bad = sorted(set(knobs_raw) - set(SWEEP_KNOBS))
    if bad:
        raise ConfigError(f"{where}: {', '.join(bad)} is not a sweep knob; choose from {', '.join(SWEEP_KNOBS)}")
    knobs = {knob: _values(knob, knobs_raw[knob], where) for knob in SWEEP_KNOBS if knob in knobs_raw}
    variants = data.get("variants")
    if variants is not None:
        variants = tuple(str(v) for v in (variants if isinstance(variants, list) else [variants]))
        check_variants(list(variants))
    overrides = data.get("overrides") or {}
    if isinstance(overrides, Mapping):
        overrides = [f"{key}={_yaml_value(value)}" for key, value in overrides.items()]
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ConfigError(f"{where}: overrides must map section.key to values (or list section.key=value strings)")
    design = str(data.get("design", "product"))
    if design not in DESIGNS:
        raise ConfigError(f"{where}: design={design!r} is not one of {', '.join(DESIGNS)}")
    crossed_raw = data.get("crossed") or []
    crossed = tuple(str(k) for k in (crossed_raw if isinstance(crossed_raw, list) else [crossed_raw]))
    bad = [k for k in crossed if k not in CELL_KNOBS]
    if bad or (crossed and design != "one_at_a_time"):
        raise ConfigError(f"{where}: crossed={list(crossed)} needs design=one_at_a_time and knobs among "
                          f"{', '.join(CELL_KNOBS)}")
    return Grid(str(data.get("name") or name), knobs, variants, tuple(overrides), design, crossed)


def _yaml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def parse_grid(text: str) -> Grid:
    """The grid of ``-P grid=...``: a YAML file (a path, or a name under ``configs/sweeps/``) or inline
    ``knob=[values];...;variants=[...]``."""
    text = text.strip()
    if not text:
        raise ConfigError("sweep needs a grid: -P grid=configs/sweeps/smoke.yaml or "
                          "-P grid=\"scale=[0,2,4];variants=[caa,mlp_mc]\"")
    path = Path(text).expanduser()
    candidates = [path, SWEEPS_DIR / text, SWEEPS_DIR / f"{text}.yaml"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is not None:
        loaded = yaml.safe_load(found.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{found}: a sweep file is a mapping with grid, variants and overrides")
        return _grid_from_mapping(loaded, found.stem, str(found))
    if text.endswith((".yaml", ".yml")):
        raise ConfigError(f"grid file {text} does not exist; the shipped ones are "
                          f"{', '.join(sorted(p.name for p in SWEEPS_DIR.glob('*.yaml')))} in configs/sweeps/")
    data: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"grid part {part!r} is not knob=[values]; e.g. \"scale=[0,2,4];layer=[10,15]\"")
        key = key.strip()
        parsed = yaml.safe_load(value)
        if key in ("variants", "name"):
            data[key] = parsed
        else:
            data.setdefault("grid", {})[key] = parsed
    return _grid_from_mapping(data, "inline", f"grid {text!r}")


# ------------------------------------------------------------------------------------------- cells


def is_mlp(variant: str) -> bool:
    return variant.startswith("mlp_")


def depends(variant: str, sampling: bool) -> frozenset[str]:
    """The knobs ``variant``'s result depends on; it is evaluated only once over the others."""
    seed = {"seed"} if sampling else set()
    if is_mlp(variant):
        return frozenset(SWEEP_KNOBS)
    if variant == "caa":
        return frozenset({"scale", "layer"} | seed)
    if variant == "iti":
        return frozenset({"seed"})
    return frozenset(seed)  # baseline


def arms(cfg: Config, grid: Grid) -> tuple[str, ...]:
    """The variants a sweep evaluates: ``grid.variants`` (or ``eval.variants``), with ``branch``'s values as
    the MLP arms when the grid names branches."""
    variants = list(grid.variants or cfg.eval.variants)
    if "branch" in grid.knobs:
        variants = [v for v in variants if not is_mlp(v)] + [f"mlp_{b}" for b in grid.knobs["branch"]]
    check_variants(variants)
    return tuple(variant_order(variants))


def values(cfg: Config, grid: Grid) -> dict[str, tuple[Any, ...]]:
    """Each knob's values: the grid's, else the config's one value (branch: the MLP arms')."""
    own = {"scale": (cfg.steering.scale,), "layer": (cfg.layer,), "mlp_expansion": (cfg.mlp.expansion,),
           "seed": (cfg.mlp.seed,),
           "branch": tuple(v.removeprefix("mlp_") for v in arms(cfg, grid) if is_mlp(v)) or ("",)}
    return {knob: tuple(grid.knobs.get(knob) or own[knob]) for knob in SWEEP_KNOBS}


def reference(cfg: Config, grid: Grid) -> dict[str, Any]:
    """The point each figure holds a knob it does not vary at: the config's value when the grid has it, else
    the grid's first."""
    own = {"scale": cfg.steering.scale, "layer": cfg.layer, "mlp_expansion": cfg.mlp.expansion,
           "seed": cfg.mlp.seed, "branch": None}
    return {knob: own[knob] if own[knob] in vals else vals[0] for knob, vals in values(cfg, grid).items()}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One evaluation of a sweep: its knobs and the variants evaluated in it."""

    scale: float
    layer: int
    mlp_expansion: int
    seed: int
    variants: tuple[str, ...]

    def knobs(self) -> dict[str, Any]:
        return {"scale": self.scale, "layer": self.layer, "mlp_expansion": self.mlp_expansion, "seed": self.seed}

    def tags(self, variant: str, sampling: bool) -> dict[str, str]:
        """``variant``'s knob tags: only the knobs its result depends on."""
        knobs = {**self.knobs(), "branch": variant.removeprefix("mlp_") if is_mlp(variant) else ""}
        return {sweep_tag(k): _text(knobs[k]) for k in SWEEP_KNOBS if k in depends(variant, sampling)}

    def label(self) -> str:
        return ", ".join(f"{k} {_text(v)}" for k, v in self.knobs().items())


def _text(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def points(cfg: Config, grid: Grid) -> list[dict[str, Any]]:
    """The cells' knob values, layer outermost (a bank and its MLPs serve a run of cells), then seed, width and
    scale: the product of the values, or one knob at a time around the reference (crossed with ``crossed``)."""
    vals, ref = values(cfg, grid), reference(cfg, grid)
    if grid.design == "product":
        chosen = [dict(zip(CELL_KNOBS, combo, strict=True)) for combo in itertools.product(*(vals[k] for k in CELL_KNOBS))]
    else:
        around = [{k: ref[k] for k in CELL_KNOBS}]
        around += [{**around[0], knob: v} for knob in CELL_KNOBS if knob not in grid.crossed for v in vals[knob]]
        chosen = [{**p, **dict(zip(grid.crossed, combo, strict=True))} for p in around
                  for combo in itertools.product(*(vals[k] for k in grid.crossed))]
    unique = {json.dumps(p, sort_keys=True): p for p in chosen}.values()
    return sorted(unique, key=lambda p: tuple(vals[k].index(p[k]) for k in CELL_KNOBS))


def cells(cfg: Config, grid: Grid) -> list[Cell]:
    """Every cell with a steered variant: a variant is in the cells whose knobs it does not depend on are at
    the reference point; baseline is in every cell (its answers come from the generation store after the
    first), so that every variant has its paired difference from baseline (``m_delta``)."""
    ref, sampling = reference(cfg, grid), cfg.eval.do_sample
    out = []
    for point in points(cfg, grid):
        chosen = tuple(v for v in arms(cfg, grid) if v == "baseline"
                       or all(point[k] == ref[k] for k in CELL_KNOBS if k not in depends(v, sampling)))
        if any(v != "baseline" for v in chosen) or point == {k: ref[k] for k in CELL_KNOBS}:
            out.append(Cell(float(point["scale"]), int(point["layer"]), int(point["mlp_expansion"]), int(point["seed"]),
                            chosen))
    return out


def cell_configs(cfg: Config, grid: Grid, cell: Cell) -> tuple[Config, Config]:
    """``(config of every other stage, evaluation config)`` of ``cell``: the knobs the grid names, set. The MLP
    modules train at the config's ``steering.scale``, and the evaluation rescales them to the cell's; only the
    evaluation has the cell's variants (the judge stages read ``eval`` too, and are the same for every cell)."""
    knobs = grid.knobs
    steering = cfg.steering if "layer" not in knobs else dataclasses.replace(cfg.steering, layer=cell.layer,
                                                                             depth=None)
    mlp, bank, iti, ev = cfg.mlp, cfg.bank, cfg.iti, cfg.eval
    if "mlp_expansion" in knobs:
        mlp = dataclasses.replace(mlp, expansion=cell.mlp_expansion)
    if "seed" in knobs:
        mlp = dataclasses.replace(mlp, seed=cell.seed)
        bank = dataclasses.replace(bank, seed=cell.seed)
        iti = dataclasses.replace(iti, seed=cell.seed)
        if ev.do_sample:
            ev = dataclasses.replace(ev, seed=cell.seed)
    try:
        train = dataclasses.replace(cfg, steering=steering, mlp=mlp, bank=bank, iti=iti, eval=ev)
        scaled = "scale" in knobs
        evaluate = dataclasses.replace(
            train, steering=dataclasses.replace(steering, scale=cell.scale) if scaled else steering,
            eval=dataclasses.replace(ev, variants=cell.variants,
                                     mlp_scale=cell.scale if scaled and any(map(is_mlp, cell.variants)) else ev.mlp_scale))
    except ConfigError as err:
        raise ConfigError(f"sweep cell ({cell.label()}): {err}") from err
    return train, evaluate


def stage_config(stage: str, train: Config, evaluate: Config) -> Config:
    """The evaluation config for ``evaluate``, the train config for every other stage."""
    return evaluate if stage == "evaluate" else train


# --------------------------------------------------------------------------------------------- run


@dataclasses.dataclass
class CellOutcome:
    cell: Cell
    run_id: str
    reused: bool
    stages: dict[str, str]


def tag_cell(run_id: str, cell: Cell, grid: Grid, ref: Mapping[str, Any], sampling: bool) -> None:
    """Tag a cell's evaluate run and its variant runs (set again on a reused cell: tags are not write-once), one
    batched request per run."""
    client = mlflow.MlflowClient()
    common = {TAG_SWEEP_NAME: grid.name, TAG_SWEEP_REFERENCE: json.dumps(ref, sort_keys=True)}

    def tag(run: str, tags: Mapping[str, str]) -> None:
        client.log_batch(run, tags=[RunTag(key, value) for key, value in tags.items()])

    tag(run_id, {**common, **{sweep_tag(k): _text(v) for k, v in cell.knobs().items()}})
    run = client.get_run(run_id)
    children = mlflow.search_runs(experiment_ids=[run.info.experiment_id], output_format="list",
                                  filter_string=f"tags.`{TAG_PARENT}` = '{run_id}'")
    for child in children:
        tag(child.info.run_id, {**common, **cell.tags(child.data.tags.get(TAG_VARIANT, ""), sampling)})


def run(cfg: Config, grid: Grid) -> list[CellOutcome]:
    """Every cell of ``grid`` (run or reused), as nested runs of the active parent run.

    Args:
        cfg: the resolved config: the grid's overrides, then the command's.
        grid: the sweep's grid.
    """
    experiment_id = pipeline.start(cfg, "sweep.run")
    todo, ref = cells(cfg, grid), reference(cfg, grid)
    mlflow.set_tag(TAG_SWEEP_NAME, grid.name)
    outcomes: list[CellOutcome] = []
    for number, cell in enumerate(todo, start=1):
        print(f"cell {number}/{len(todo)}: {cell.label()}; {', '.join(cell.variants)}")
        train, evaluate = cell_configs(cfg, grid, cell)
        runs: dict[str, str] = {}
        for stage in pipeline.stages_of(evaluate):
            stage_cfg = stage_config(stage, train, evaluate)
            outcome = pipeline.run_stage(stage, stage_cfg, runs, experiment_id,
                                         key_extra={"sweep.name": grid.name} if stage == "evaluate" else None)
        tag_cell(runs["evaluate"], cell, grid, ref, cfg.eval.do_sample)
        outcomes.append(CellOutcome(cell, runs["evaluate"], outcome.reused, dict(runs)))
        _log_cells(grid, ref, outcomes, len(todo))
    mlflow.set_tag(TAG_REUSED, f"{sum(o.reused for o in outcomes)} of {len(outcomes)} cells")
    return outcomes


def _log_cells(grid: Grid, ref: Mapping[str, Any], outcomes: Sequence[CellOutcome], total: int) -> None:
    mlflow.log_dict({"name": grid.name, "knobs": {k: list(v) for k, v in grid.knobs.items()}, "reference": ref,
                     "overrides": list(grid.overrides), "n_cells": total,
                     "cells": [{"knobs": o.cell.knobs(), "variants": list(o.cell.variants), "run_id": o.run_id,
                                "reused": o.reused, "stages": o.stages} for o in outcomes]}, SWEEP_CELLS)


__all__ = ["Cell", "CellOutcome", "Grid", "arms", "cell_configs", "cells", "depends", "parse_grid", "points",
           "reference", "run", "stage_config", "values"]
