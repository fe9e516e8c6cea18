"""train_judge: the trained judge, learned from TruthfulQA's human truth and informativeness labels.

Parameters: --data (the TruthfulQA CSV; the labels are read from its folder unless judge.labels is
set), --split, --data-run (a data run whose val and test questions are held out), --overrides (e.g.
"judge.hidden=[64],judge.folds=5,judge.labels=../shared/data/truthfulqa"), --preset, --dry-run.
Logs: held-out-question agreement by cross-validation (cv_truth_all_kappa, cv_truth_nonref_kappa,
cv_info_all_kappa, ... with accuracy and balanced accuracy), n_truth_labels, n_info_labels,
n_train_questions, train_seconds; the artifact judge/ (judge.safetensors, judge.json with the training
questions); the MLflow model judge_model, registered as truthsteer-judge; the tag truthsteer.judge_uri,
which evaluate, score and calibrate take as judge.trained.
"""

import argparse

from entrypoints import _cli


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("train_judge", __doc__)
    _cli.add_data(p)
    _cli.run_arg(p, "data-run", "MLflow run id of a data stage run whose val and test questions are held out")
    _cli.add_config(p)
    return p


def main() -> None:
    from core.tracking import stage_run
    from stages import train_judge

    args = build_parser().parse_args()
    cfg = _cli.build_config(args)
    if args.dry_run:
        _cli.print_plan("train_judge", cfg, train_judge.plan(cfg, args.data_run))
        return
    with stage_run("train_judge", cfg, run_name="train-judge", tags={"truthsteer.data_run": args.data_run}):
        train_judge.run(cfg, data_run=args.data_run)


if __name__ == "__main__":
    _cli.main(main)
