"""The dry run of ``sweep`` (``stages.sweep``): each cell, what each of its stages would reuse, share with an
earlier cell or run, and an estimate of the work left; loads no weights."""

from __future__ import annotations

import json
from collections.abc import Sequence

import mlflow

from core.config import Config
from stages import pipeline
from stages.sweep import Cell, Grid, arms, cell_configs, cells, reference, stage_config, values


def work(cfg: Config, cell: Cell, stages: Sequence[str]) -> dict[str, float]:
    """The work of the stages ``stages`` of ``cell`` that would run, as counts and forward tokens (an upper
    estimate: sequences of ~80 tokens, prompts of ~64, MC answers of ~12 tokens, ~9 MC answers a question; the
    prefix caches of training and MC skip much of it)."""
    sizes = cfg.data.sizes
    questions = sizes[cfg.eval.split]
    counts: dict[str, float] = {}
    tokens = 0.0
    if "extract" in stages:
        pairs = sizes["pool"] * cfg.extract.pairs_per_question
        tokens += pairs * 2 * 80
    for stage in stages:
        if stage.startswith("train_") and stage in pipeline.TRAIN_STAGES:
            counts["MLP trainings"] = counts.get("MLP trainings", 0) + 1
            per_question = {"mc": 2, "gen": 1, "joint": 3}[pipeline.TRAIN_STAGES[stage]]  # sequences of a question
            # forward and backward (x3) of each step's batch, then the whole val split after every step
            tokens += cfg.mlp.steps * per_question * 80 * (3 * cfg.mlp.batch_size + sizes["val"])
    if "evaluate" in stages:
        n_variants = len(cell.variants)
        counts["variant evaluations"] = n_variants
        counts["answers generated (at most)"] = n_variants * questions
        tokens += n_variants * questions * (64 + cfg.eval.max_new_tokens)  # generation
        tokens += n_variants * questions * 9 * 12 + questions * 64  # MC: the prompts once, answers per variant
    counts["forward tokens"] = tokens
    return counts


def plan(cfg: Config, grid: Grid) -> list[str]:
    """Dry run: the cells, which stages each would reuse or run, and an estimate of the work; loads no weights."""
    from core.tracking import ensure_store, tracking_uri

    ensure_store(tracking_uri(cfg))
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    todo, ref = cells(cfg, grid), reference(cfg, grid)
    vals = values(cfg, grid)
    lines = [f"sweep {grid.name!r} on {cfg.model.alias}: {len(todo)} cells over "
             + "; ".join(f"{k} {list(v)}" for k, v in vals.items() if k in grid.knobs)
             + f"; variants {', '.join(arms(cfg, grid))}",
             f"reference point (figures hold the other knobs here): {json.dumps(ref, sort_keys=True)}",
             *(f"grid override: {o}" for o in grid.overrides)]
    total: dict[str, float] = {}
    planned: set[tuple[str, str]] = set()  # (stage, key) that an earlier cell of this plan would already run
    for number, cell in enumerate(todo, start=1):
        train, evaluate = cell_configs(cfg, grid, cell)
        runs: dict[str, str] = {}
        status = []
        to_run = []
        for stage in pipeline.stages_of(evaluate):
            stage_cfg = stage_config(stage, train, evaluate)
            if any(name not in runs for name in pipeline.upstream(stage, stage_cfg)):
                status.append(f"{stage} runs")
                to_run.append(stage)
                runs[stage] = f"<{stage} of cell {number}>"
                continue
            params = {**pipeline.stage_params(stage, stage_cfg, runs),
                      **({"sweep.name": grid.name} if stage == "evaluate" else {})}
            key = pipeline.stage_key(stage, params)
            found = pipeline.find_finished(experiment.experiment_id, key) if experiment else None
            if found:
                runs[stage] = found
                status.append(f"{stage} reused")
            elif (stage, key) in planned:
                runs[stage] = f"<{stage} {key}>"
                status.append(f"{stage} shared")
            else:
                planned.add((stage, key))
                runs[stage] = f"<{stage} {key}>"
                status.append(f"{stage} runs")
                to_run.append(stage)
        for name, count in work(cfg, cell, to_run).items():
            total[name] = total.get(name, 0) + count
        lines.append(f"cell {number}: {cell.label()}; {', '.join(cell.variants)}: {', '.join(status)}")
    flop = 2 * cfg.model.n_params_b * 1e9 * total.get("forward tokens", 0)
    lines.append("work to do: " + ", ".join(f"{int(v):,} {k}" for k, v in total.items() if k != "forward tokens")
                 + f"; about {total.get('forward tokens', 0):,.0f} forward tokens = {flop:.2g} FLOP "
                 f"(2 x {cfg.model.n_params_b:g}B parameters per token): {flop / 50e9 / 3600:.2g} h at 50 GFLOP/s "
                 f"(2 CPU cores, fp32), {flop / 100e12 / 3600:.2g} h at 100 TFLOP/s (one GPU, bf16, well used)")
    return lines


__all__ = ["plan", "work"]
