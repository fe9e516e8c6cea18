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

from entrypoints import _cli

ENTRY = _cli.Entry("train_judge", __doc__, lambda cfg, args: _cli.stage("train_judge").plan(cfg, args.data_run),
                   lambda cfg, args: _cli.stage("train_judge").run(cfg, data_run=args.data_run), model=False,
                   runs={"data-run": "MLflow run id of a data stage run whose val and test questions are held out"},
                   run_name=lambda cfg, args: "train-judge", tags=lambda cfg, args: {"truthsteer.data_run": args.data_run})
main = ENTRY.main

if __name__ == "__main__":
    _cli.main(main)
