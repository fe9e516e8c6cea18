"""train: an MLP steering module on the frozen model, from the vector bank.

Branch mc: hinge loss on the log-prob margin of a correct over an incorrect answer. Branch gen:
negative log-likelihood of a correct answer. Branch both: one child run per branch.

Parameters: --model, --branch (mc|gen|both, sets mlp.branch), --data, --split, --data-run,
--bank-run (required: the bank stage's run id), --overrides, --preset, --dry-run.
Logs: train_loss and val_loss per step, initial/final train and val loss, seconds_per_step;
artifacts: mlp/<branch>/mlp.safetensors (the module and its bank) and mlp/<branch>/mlp.json (its
config, the branch and the resolved run config).
"""

import argparse

from entrypoints import _cli


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("train", __doc__)
    _cli.add_model(p)
    _cli.add_data(p)
    p.add_argument("--branch", default="", help="mc, gen or both; default: mlp.branch")
    _cli.run_arg(p, "data-run", "MLflow run id of a data stage whose splits to use")
    _cli.run_arg(p, "bank-run", "MLflow run id of the bank stage")
    _cli.add_config(p)
    return p


def main() -> None:
    from core.tracking import stage_run
    from stages import train

    args = build_parser().parse_args()
    cfg = _cli.build_config(args, [f"mlp.branch={args.branch}"] if args.branch else [])
    plan = train.plan(cfg, bank_run=args.bank_run, data_run=args.data_run)
    if args.dry_run:
        _cli.print_plan("train", cfg, plan)
        return
    with stage_run("train", cfg, run_name=f"{cfg.model.alias}-train-{cfg.mlp.branch}"):
        train.run(cfg, bank_run=args.bank_run, data_run=args.data_run)


if __name__ == "__main__":
    _cli.main(main)
