"""Time a tune study with the shared extraction cache against re-extracting per trial, and compare
the best value TPE finds with the optimum of the full grid, in one process.

Model smollm2-135m (fp32; CPU unless a GPU is visible), the smoke split with ``--val`` val
questions and its 60-question pool, objective ``mc`` (MC2, teacher-forced), search space
``--layers`` x ``--scales`` (6 layers x 5 scales by default). ``--val`` is 4 by default: on two
shared CPU cores a trial scores about 0.7 s per answer row, so 20 val questions (144 rows) cost
about 100 s a trial and the 54 trials below well over an hour; 4 questions (34 rows) about 25 s. Everything runs through
``stages.tune.run`` in a throw-away tracking store and Optuna storage (so MLflow and Optuna
overheads are included), with the model loaded once:

1. the shared extraction: computed once, cold (timed), then read from the cache by every trial;
2. ``--trials`` TPE trials (seed ``--seed``) with the cache (wall time of the study);
3. without the cache, every trial re-extracts the pool before it scores: ``--no-cache-trials``
   such trials are timed (extraction + scoring, the TPE study's first settings) and the study's
   time is extrapolated as (cached study) + trials x (mean extraction time per trial), since the
   rest of a trial is the same in both;
4. the full grid over the same space with the grid sampler: its optimum, against the best of the
   TPE trials (the same objective on the same val split and vectors, so equal cells score equally).

Run: ``python -m benchmarks.tune`` (options: ``--help``); writes ``benchmarks/results/tune.json``.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from benchmarks import RESULTS_DIR, parser, write_report
from core.config_io import load_config
from core.data import splits_for
from core.models import load_from_config
from core.tracking import stage_run
from stages import tune, tune_scoring, tune_space, tune_storage
from steering.extract import contrastive_pairs, extract_caa

RESULTS = RESULTS_DIR / "tune.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = parser("tune", __doc__)
    p.add_argument("--val", type=int, default=4, help="val questions (data.val)")
    p.add_argument("--trials", type=int, default=24, help="TPE trials")
    p.add_argument("--no-cache-trials", type=int, default=2, help="timed trials that re-extract (extrapolated)")
    p.add_argument("--layers", default="10:20:2")
    p.add_argument("--scales", default="0:8:2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    os.environ[tune_storage.OUTPUTS_ENV] = str(tmp / "outputs")  # a cold extraction cache
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    cfg = load_config(args.model, [f"data.source={args.data}", "data.split=smoke", f"data.val={args.val}",
                                   f"runtime.device={args.device}"])
    storage = f"sqlite:///{tmp}/optuna.db"
    common = {"axes": {"layers": args.layers, "scales": args.scales}, "seed": args.seed, "storage": storage, "heartbeat": 0}
    tpe_settings = tune_storage.TuneSettings(sampler="tpe", n_trials=args.trials, study_name="bench-tpe", **common)
    grid_settings = tune_storage.TuneSettings(sampler="grid", n_trials=0, study_name="bench-grid", **common)
    space = grid_settings.search_space(cfg)
    splits = splits_for(cfg)

    tick = time.perf_counter()
    loaded = load_from_config(cfg)
    load_seconds = time.perf_counter() - tick

    # 1. the shared extraction, cold
    _sync(loaded.device)
    tick = time.perf_counter()
    extraction, source = tune_scoring.shared_extraction(cfg, splits["pool"], loaded)
    _sync(loaded.device)
    extract_once = time.perf_counter() - tick
    if source != "computed":
        raise RuntimeError(f"the extraction came from {source}, not a cold computation; check {tune_storage.OUTPUTS_ENV}")

    # 2. the TPE study with the cache
    with stage_run("tune", cfg, run_name="bench-tpe"):
        tick = time.perf_counter()
        tpe = tune.run(cfg, tpe_settings, loaded=loaded)
        tpe_seconds = time.perf_counter() - tick
    study = optuna.load_study(study_name="bench-tpe", storage=tune_storage.open_storage(storage, heartbeat=0))
    tpe_trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    eval_seconds = [float(t.duration.total_seconds()) for t in tpe_trials if t.duration is not None]

    # 3. trials that re-extract before scoring, timed; the rest of the study extrapolated
    scorer = tune_scoring.TrialScorer(cfg, tune_space.OBJECTIVES["mc"], loaded, extraction.vectors, source)  # (n_layers, d_model)
    pairs = contrastive_pairs(splits["pool"], cfg.extract.pairs_per_question, cfg.data.seed)
    no_cache: list[dict[str, float]] = []
    for trial in tpe_trials[:args.no_cache_trials]:
        _sync(loaded.device)
        tick = time.perf_counter()
        fresh = extract_caa(loaded, pairs, batch_size=cfg.extract.batch_size, max_length=cfg.extract.max_length,
                            nan_threshold=cfg.extract.nan_threshold)
        _sync(loaded.device)
        extracted = time.perf_counter() - tick
        rows = tune_scoring.TrialScorer(cfg, scorer.objective, loaded, fresh.vectors, source).score(
            splits["val"], int(trial.params["layer"]), float(trial.params["scale"]))
        value = math.fsum(float(r["mc2"]) for r in rows) / len(rows)
        no_cache.append({"extract_seconds": extracted, "trial_seconds": time.perf_counter() - tick,
                         "value": value, "cached_value": float(trial.value or math.nan)})
    mean_extract = statistics.mean(r["extract_seconds"] for r in no_cache)
    no_cache_estimate = tpe_seconds + args.trials * mean_extract

    # 4. the full grid
    with stage_run("tune", cfg, run_name="bench-grid"):
        tick = time.perf_counter()
        grid = tune.run(cfg, grid_settings, loaded=loaded)
        grid_seconds = time.perf_counter() - tick
    grid_study = optuna.load_study(study_name="bench-grid", storage=tune_storage.open_storage(storage, heartbeat=0))
    cells = {(t.params["layer"], t.params["scale"]): float(t.value) for t in grid_study.trials  # type: ignore[arg-type]
             if t.state == optuna.trial.TrialState.COMPLETE}
    ranked = sorted(cells.values(), reverse=True)
    if tpe.best_value is None or grid.best_value is None or tpe.best_params is None or grid.best_params is None:
        raise RuntimeError("a study ended without a completed trial; see the log above")
    tpe_cell = (tpe.best_params["layer"], tpe.best_params["scale"])
    first_best = next(i for i, t in enumerate(tpe_trials) if t.value == tpe.best_value)
    visited = {(t.params["layer"], t.params["scale"]) for t in tpe_trials}

    with_cache = extract_once + tpe_seconds
    print(f"model {cfg.model.alias} on {loaded.device}, {len(splits['val'])} val questions, pool {len(pairs)} pairs, "
          f"space {space.describe()} ({space.n_cells} cells)")
    print(f"{'':>34} | {'seconds':>8} | per trial")
    print(f"{'shared extraction (once, cold)':>34} | {extract_once:>8.1f} |")
    print(f"{f'TPE {args.trials} trials, cached vectors':>34} | {tpe_seconds:>8.1f} | {tpe_seconds / args.trials:.2f} "
          f"(optuna trial duration {statistics.mean(eval_seconds):.2f})")
    print(f"{'with cache: extraction + study':>34} | {with_cache:>8.1f} |")
    print(f"{f'no cache: {len(no_cache)} timed trials':>34} | {sum(r['trial_seconds'] for r in no_cache):>8.1f} | "
          f"{statistics.mean(r['trial_seconds'] for r in no_cache):.2f} (extraction {mean_extract:.2f})")
    print(f"{f'no cache: {args.trials} trials, extrapolated':>34} | {no_cache_estimate:>8.1f} | "
          f"{no_cache_estimate / args.trials:.2f}")
    print(f"speedup of the cache: {no_cache_estimate / with_cache:.2f}x")
    print(f"{f'grid, {len(cells)} cells':>34} | {grid_seconds:>8.1f} | {grid_seconds / max(len(cells), 1):.2f}")
    print(f"TPE best mc2 {tpe.best_value:.4f} at layer {tpe_cell[0]}, scale {tpe_cell[1]:g} (trial {first_best}, "
          f"{len(visited)} distinct cells in {len(tpe_trials)} trials); grid optimum {grid.best_value:.4f} at layer "
          f"{grid.best_params['layer']}, scale {grid.best_params['scale']:g}; TPE's best is rank "
          f"{ranked.index(cells[tpe_cell]) + 1} of {len(cells)} grid cells; regret {grid.best_value - tpe.best_value:.4f}")

    report: dict[str, Any] = {
        "model": cfg.model.alias, "device": str(loaded.device), "dtype": cfg.model.dtype, "objective": "mc (mc2)",
        "n_val": len(splits["val"]), "n_pool_pairs": len(pairs), "space": space.describe(), "n_cells": space.n_cells,
        "seed": args.seed, "model_load_seconds": load_seconds,
        "cache": {"extract_once_seconds": extract_once, "tpe_study_seconds": tpe_seconds,
                  "total_seconds": with_cache, "trial_objective_seconds": eval_seconds},
        "no_cache": {"timed_trials": no_cache, "mean_extract_seconds": mean_extract,
                     "estimated_study_seconds": no_cache_estimate,
                     "method": f"{len(no_cache)} trials timed (re-extract + score), study extrapolated as cached study "
                               f"+ {args.trials} x mean extraction"},
        "speedup_cache_vs_no_cache": no_cache_estimate / with_cache,
        "tpe": {"n_trials": len(tpe_trials), "best_value": tpe.best_value, "best_params": tpe.best_params,
                "first_trial_at_best": first_best, "distinct_cells": len(visited),
                "values": [t.value for t in tpe_trials]},
        "grid": {"n_cells": len(cells), "seconds": grid_seconds, "best_value": grid.best_value,
                 "best_params": grid.best_params,
                 "cells": [{"layer": k[0], "scale": k[1], "value": v} for k, v in sorted(cells.items())]},
        "tpe_best_rank_in_grid": ranked.index(cells[tpe_cell]) + 1,
        "regret_tpe_vs_grid": grid.best_value - tpe.best_value,
        "optuna": optuna.__version__,
    }
    write_report(args.output, report)


if __name__ == "__main__":
    main()
