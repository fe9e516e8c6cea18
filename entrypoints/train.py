"""train: an MLP steering module on the frozen model, from the vector bank.

Branch mc: hinge loss on the log-prob margin of a correct over an incorrect answer. Branch gen:
negative log-likelihood of a correct answer. Branch both: one child run per branch.

Parameters: --model, --branch (mc|gen|both, sets mlp.branch), --data, --split, --data-run,
--bank-run (required: the bank stage's run id), --overrides, --preset, --dry-run.
Logs: train_loss and val_loss per step, initial/final train and val loss, seconds_per_step;
artifacts: mlp/<branch>/mlp.safetensors (the module and its bank) and mlp/<branch>/mlp.json (its
config, the branch and the resolved run config).
"""

from entrypoints import _cli

ENTRY = _cli.Entry(
    "train", __doc__,
    lambda cfg, args: _cli.stage("train").plan(cfg, bank_run=args.bank_run, data_run=args.data_run),
    lambda cfg, args: _cli.stage("train").run(cfg, bank_run=args.bank_run, data_run=args.data_run),
    runs={"data-run": "MLflow run id of a data stage whose splits to use",
          "bank-run": "MLflow run id of the bank stage"},
    options=[("branch", str, "", "mc, gen or both; default: mlp.branch")], sets={"branch": "mlp.branch"},
    run_name=lambda cfg, args: f"{cfg.model.alias}-train-{cfg.mlp.branch}",
    check=lambda cfg, args: _cli.stage("train").check_bank_run(args.bank_run),
)
main = ENTRY.main

if __name__ == "__main__":
    _cli.main(main)
