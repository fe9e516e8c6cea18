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

from argparse import Namespace
from typing import Any

from entrypoints import _cli

FLAGS = {  # the tune settings: flag -> (type, default, help)
    "objective": (str, "mc", "mc or judge"), "n-trials": (int, 24, "trials this worker runs (0: no limit)"),
    "total-trials": (int, 0, "COMPLETE trials of the study, over all workers, at which every worker stops (0: none)"),
    "timeout": (float, 0.0, "seconds this worker runs at most (0: no limit)"),
    "storage": (str, "", "Optuna storage URL or journal file; default: a local sqlite file"),
    "study-name": (str, "", "default: truthsteer-<model>-<objective>"), "sampler": (str, "tpe", "tpe or grid"),
    "layers": (str, "", "layer range or list: 8:20, 8:20:2 or 6,9,12"),
    "scales": (str, "", "scale range or list: 0.5:8, 0:8:2 or 1,2,4"), "seed": (int, 0, "sampler seed"),
    "pruner": (str, "auto", "auto, wilcoxon, median or none"),
    "heartbeat": (int, 60, "seconds between RDB storage heartbeats (0: off)"),
}


def settings(args: Namespace) -> Any:
    """The ``stages.tune_storage.TuneSettings`` of the flags."""
    from stages.tune_storage import TuneSettings

    return TuneSettings(**{f.replace("-", "_"): getattr(args, f.replace("-", "_")) for f in FLAGS},
                        extract_run=args.extract_run)


ENTRY = _cli.Entry(
    "tune", __doc__, lambda cfg, args: _cli.stage("tune").plan(cfg, settings(args)),
    lambda cfg, args: _cli.stage("tune").run(cfg, settings(args)),
    runs={"extract-run": "MLflow run id of an extract stage whose vectors to use instead of the cache"},
    options=[(flag, kind, default, help_text) for flag, (kind, default, help_text) in FLAGS.items()],
    run_name=lambda cfg, args: f"{cfg.model.alias}-tune-{args.objective}",
)
main = ENTRY.main

if __name__ == "__main__":
    _cli.main(main)
