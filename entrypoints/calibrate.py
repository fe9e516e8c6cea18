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

import argparse

from entrypoints import _cli


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("calibrate", __doc__)
    _cli.add_model(p)
    _cli.add_data(p)
    _cli.run_arg(p, "data-run", "MLflow run id of a data stage run (its eval.split questions are scored)")
    p.add_argument("--judges", default="", help='judges separated by "|", e.g. "judge|semantic"')
    _cli.add_trained_judge(p)
    _cli.add_config(p)
    return p


def main() -> None:
    from core.tracking import stage_run
    from stages import calibrate

    args = build_parser().parse_args()
    extra = []
    if args.judges:
        extra.append(f"calibrate.judges=[{','.join(j.strip() for j in args.judges.split('|') if j.strip())}]")
    extra += _cli.trained_judge_override(args)
    cfg = _cli.build_config(args, extra)
    if args.dry_run:
        _cli.print_plan("calibrate", cfg, calibrate.plan(cfg, args.data_run))
        return
    with stage_run("calibrate", cfg, run_name=f"calibrate-{cfg.eval.split}", tags={"truthsteer.data_run": args.data_run}):
        calibrate.run(cfg, data_run=args.data_run)


if __name__ == "__main__":
    _cli.main(main)
