"""tune: an Optuna study of the CAA steering layer and scale, one study per (model, objective).

Trials score (layer, scale) on the val split with the vectors of one all-layer extraction (an
extract run's, or computed once and cached under $TRUTHSTEER_OUTPUTS/tune/extractions/), the model
loaded once per worker. Objectives: mc (default: teacher-forced MC2, no generation) or judge
(greedy answers scored by the semantic judge's semantic_diff; pruned per question by Wilcoxon).
Running it again with the same study name resumes the study; several workers (processes, SLURM
array tasks) may share one study: see docs/tune.md.

Parameters: --model, --data, --split, --objective (mc|judge), --n-trials (trials this worker runs,
0: no limit), --total-trials (the study stops at exactly this many COMPLETE trials over all
workers; 0: no limit, the grid stops at its size), --timeout (seconds; 0: none), --storage (default
sqlite file $TRUTHSTEER_OUTPUTS/tune/optuna.db; any RDB URL such as postgresql://user:pass@host/db;
journal:PATH or PATH.log for a journal file), --study-name (default truthsteer-<model>-<objective>),
--sampler (tpe|grid), --layers (8:20, 8:20:2 or 6,9,12; default a band around the model's default
layer), --scales (0.5:8, 0:8:2 or 1,2,4; default 0:8, grid 0:8:2), --seed, --pruner
(auto|wilcoxon|median|none), --heartbeat (seconds between RDB heartbeats; 0: off), --extract-run,
--overrides, --preset, --dry-run.
Logs: this worker as a `tune` run (tags truthsteer.study, truthsteer.objective_metric and
_direction, truthsteer.best_layer, _best_scale, _best_trial, _best_run; metrics best_<metric>,
n_complete, n_pruned, n_failed, n_worker_trials) with one nested run per trial (params layer and
scale, metrics objective and <metric>); artifacts tune/best_config.yaml ({steering: {layer, scale}},
for `full --tuned <run id>`), tune/trials.csv, tune/history.png, tune/importance.png.
"""

import argparse

from entrypoints import _cli


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("tune", __doc__)
    _cli.add_model(p)
    _cli.add_data(p)
    p.add_argument("--objective", default="mc", help="mc or judge")
    p.add_argument("--n-trials", type=int, default=24, help="trials this worker runs (0: no limit)")
    p.add_argument("--total-trials", type=int, default=0,
                   help="COMPLETE trials of the study, over all workers, at which every worker stops (0: no limit)")
    p.add_argument("--timeout", type=float, default=0.0, help="seconds this worker runs at most (0: no limit)")
    p.add_argument("--storage", default="", help="Optuna storage URL or journal file; default: a local sqlite file")
    p.add_argument("--study-name", default="", help="default: truthsteer-<model>-<objective>")
    p.add_argument("--sampler", default="tpe", help="tpe or grid")
    p.add_argument("--layers", default="", help="layer range or list: 8:20, 8:20:2 or 6,9,12")
    p.add_argument("--scales", default="", help="scale range or list: 0.5:8, 0:8:2 or 1,2,4")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--pruner", default="auto", help="auto, wilcoxon, median or none")
    p.add_argument("--heartbeat", type=int, default=60, help="seconds between RDB storage heartbeats (0: off)")
    _cli.run_arg(p, "extract-run", "MLflow run id of an extract stage whose vectors to use instead of the cache")
    _cli.add_config(p)
    return p


def main() -> None:
    from core.tracking import stage_run
    from stages import tune, tune_storage

    args = build_parser().parse_args()
    cfg = _cli.build_config(args)
    settings = tune_storage.TuneSettings(
        objective=args.objective, sampler=args.sampler, n_trials=args.n_trials, total_trials=args.total_trials,
        timeout=args.timeout, storage=args.storage, study_name=args.study_name, layers=args.layers,
        scales=args.scales, seed=args.seed, pruner=args.pruner, heartbeat=args.heartbeat,
        extract_run=args.extract_run,
    )
    if args.dry_run:
        _cli.print_plan("tune", cfg, tune.plan(cfg, settings))
        return
    with stage_run("tune", cfg, run_name=f"{cfg.model.alias}-tune-{settings.objective}"):
        tune.run(cfg, settings)


if __name__ == "__main__":
    _cli.main(main)
