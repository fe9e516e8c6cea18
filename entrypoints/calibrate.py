"""calibrate: each judge's agreement with TruthfulQA's human labels, on questions held out from it.

Parameters: --data, --split, --data-run (a data run: its eval.split questions are the ones scored),
--judges ("judge|semantic|rouge|bleu"; default calibrate.judges), --trained-judge (judge.trained, e.g.
models:/truthsteer-judge/1), --overrides (e.g. "eval.n_bootstrap=500,judge.labels=PATH"), --preset,
--dry-run.
Logs per judge, label (truth, info) and subset (all, nonref: answers that are not verbatim reference
answers): <judge>_<label>_<subset>_<accuracy|balanced_accuracy|kappa> with _ci_low/_ci_high (bootstrap
over questions) and _n; artifacts calibrate/agreement.csv (also an MLflow table), confusion.csv,
per_category.csv, agreement.md.
"""

from entrypoints import _cli

ENTRY = _cli.Entry(
    "calibrate", __doc__, lambda cfg, args: _cli.stage("calibrate").plan(cfg, args.data_run),
    lambda cfg, args: _cli.stage("calibrate").run(cfg, data_run=args.data_run),
    runs={"data-run": "MLflow run id of a data stage run (its eval.split questions are scored)"},
    options=[("judges", str, "", 'judges separated by "|", e.g. "judge|semantic"')],
    sets={"judges": "calibrate.judges"}, trained_judge=True,
    run_name=lambda cfg, args: f"calibrate-{cfg.eval.split}", tags=lambda cfg, args: {"truthsteer.data_run": args.data_run},
)
main = ENTRY.main

if __name__ == "__main__":
    _cli.main(main)
