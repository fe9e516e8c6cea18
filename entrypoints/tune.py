"""tune: an Optuna study of CAA's steering layer and scale (or ITI's k and alpha), per (model, method, objective).

Trials score a setting on the val split: CAA's vectors[layer] * scale from one all-layer extraction (an extract
run's, or cached under $TRUTHSTEER_OUTPUTS/tune/extractions/), or (--method iti) the best k heads of one ranking
(an iti run's, --source-run, or cached under $TRUTHSTEER_OUTPUTS/tune/iti/) shifted by alpha. Objectives: mc
(MC2), judge (semantic_diff), truth_info; a cost (--constraint, --directions) is measured per trial on neutral
text. The same study name resumes the study; several workers may share one study: see docs/tune.md.

Parameters: --model, --data, --split, --method, --objective, --constraint, --directions, --n-trials, --total-trials
(COMPLETE trials over all workers), --timeout, --storage (no password in it: PGPASSWORD, ~/.pgpass or the whole URL in
$TRUTHSTEER_STORAGE; default sqlite $TRUTHSTEER_OUTPUTS/tune/optuna.db),
--study-name (default truthsteer-<model>[-iti]-<objective>), --sampler, each tunable method's axes (from the
registry: caa --layers, --scales; iti --ks, --alphas), --seed, --pruner, --heartbeat, --warm-start, --extract-run (caa),
--source-run (a run of the method's source stage), --overrides, --preset, --dry-run.
Logs: a `tune` run (tags truthsteer.study, best_layer and best_scale or best_k and best_alpha, best_trial,
best_run; metrics best_<metric>, n_complete, n_pruned, n_failed) with a nested run per trial (params layer and
scale, or k and alpha; metrics objective, <metric>); artifacts tune/best_config.yaml (for `full --tuned <id>`),
tune/trials.csv, tune/history.png, tune/importance.png, with a cost tune/pareto.csv and tune/pareto.png.
"""

from argparse import Namespace
from typing import Any

from entrypoints import _cli
from steering.methods import tunable_methods

FLAGS = {  # the tune settings: flag -> (type, default, help)
    "method": (str, "caa", "a tunable method: caa (layer, scale) or iti (k, alpha)"),
    "objective": (str, "mc", "mc (= mc2), judge (semantic_diff) or truth_info (the trained judge's True*Info)"),
    "constraint": (str, "", "a bound on a cost of steering per trial, e.g. kl_neutral<=0.5: best feasible trial"),
    "directions": (str, "", "two objectives for a Pareto front, e.g. truth_info:max,kl_neutral:min"),
    "n-trials": (int, 24, "trials this worker runs (0: no limit)"), "sampler": (str, "tpe", "tpe or grid"),
    "total-trials": (int, 0, "COMPLETE trials of the study, over all workers, at which every worker stops (0: none)"),
    "timeout": (float, 0.0, "seconds this worker runs at most (0: no limit)"), "storage": (str, "", "Optuna storage"),
    "study-name": (str, "", "default: truthsteer-<model>[-iti]-<objective>"), "seed": (int, 0, "sampler seed"),
    "pruner": (str, "auto", "auto, wilcoxon, median or none"),
    "heartbeat": (int, 60, "seconds between RDB storage heartbeats (0: off)"),
    "warm-start": (str, "", "a caa tune run (any model) whose best trials run first, converted to this model")}
RUNS = {"extract-run": "caa: MLflow run id of an extract stage whose vectors to use instead of the cache",
        "source-run": "MLflow run id of the method's source stage (iti: an iti run's ranked heads; caa: extract)"}
AXES = {a.flag: a.help for m in tunable_methods().values() for a in m.tune.axes}  # type: ignore[union-attr]


def settings(args: Namespace) -> Any:
    """The ``stages.tune_storage.TuneSettings`` of the flags."""
    from stages.tune_storage import TuneSettings

    return TuneSettings(**{f.replace("-", "_"): getattr(args, f.replace("-", "_")) for f in [*FLAGS, *RUNS]},
                        axes={flag: getattr(args, flag) for flag in AXES if getattr(args, flag)})


def check(cfg: Any, args: Namespace) -> None:
    """A password in --storage fails before anything runs; under ``mlflow run``, whose launcher has already
    logged it as a param, that run is deleted (``mlflow gc`` then purges it)."""
    import os

    from core.config import ConfigError
    from stages.tune_storage import check_no_password, has_password

    if has_password(args.storage) and os.environ.get("MLFLOW_RUN_ID"):
        import mlflow

        mlflow.MlflowClient().delete_run(os.environ["MLFLOW_RUN_ID"])
        try:
            check_no_password(args.storage)
        except ConfigError as err:
            raise ConfigError(f"{err}. The run mlflow run created ({os.environ['MLFLOW_RUN_ID']}) logged it as a "
                              "param and was deleted: purge it with `mlflow gc`") from None
    check_no_password(args.storage)


ENTRY = _cli.Entry(
    "tune", __doc__, lambda cfg, args: _cli.stage("tune").plan(cfg, settings(args)),
    lambda cfg, args: _cli.stage("tune").run(cfg, settings(args)), runs=RUNS,
    options=[(flag, kind, default, help_text) for flag, (kind, default, help_text) in FLAGS.items()]
    + [(flag, str, "", help_text) for flag, help_text in AXES.items()],
    run_name=lambda cfg, args: f"{cfg.model.alias}-tune-{settings(args).label}", check=check,
)
main = ENTRY.main

if __name__ == "__main__":
    _cli.main(main)
