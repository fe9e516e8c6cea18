"""iti: every attention head ranked by a truthfulness probe on its output (inference-time intervention).

For each pool question, iti.pairs_per_question (correct, incorrect) answer pairs run through the
frozen model; each head's output before o_proj at the answer's last token is a probe example. A
logistic probe per head, trained on 1 - iti.val_fraction of the examples, is scored on the rest, and
every head is stored best first with its mass-mean direction (true minus false) and sigma. The iti
variant of evaluate steers the best iti.k heads by iti.alpha x sigma x direction (Li et al., 2023).

Parameters: --model, --data, --split, --data-run (reuse a data run's splits), --overrides (e.g.
"iti.pairs_per_question=4,iti.val_fraction=0.25"), --preset, --dry-run (print the plan; load no weights).
Logs: metrics n_examples, best_accuracy, top_k_accuracy, best_accuracy_by_layer (step = layer);
artifacts iti/heads.safetensors (layers, heads, directions, sigmas, accuracies) and iti/heads.json.
"""

import argparse

from entrypoints import _cli


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("iti", __doc__)
    _cli.add_model(p)
    _cli.add_data(p)
    _cli.run_arg(p, "data-run", "MLflow run id of a data stage whose splits to use")
    _cli.add_config(p)
    return p


def main() -> None:
    from core.tracking import stage_run
    from stages import iti

    args = build_parser().parse_args()
    cfg = _cli.build_config(args)
    if args.dry_run:
        _cli.print_plan("iti", cfg, iti.plan(cfg, args.data_run))
        return
    with stage_run("iti", cfg):
        iti.run(cfg, data_run=args.data_run)


if __name__ == "__main__":
    _cli.main(main)
