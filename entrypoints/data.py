"""data: TruthfulQA split deterministically into pool/train/val/test, stratified by category.

Parameters: --data (CSV/Parquet path or Hugging Face dataset id), --split (smoke: 60/80/40/80,
full: 100/250/117/200; custom sizes with --overrides "data.test=50"), --overrides (e.g.
"data.seed=1"), --preset, --dry-run.
Logs: one MLflow dataset input per split (truthfulqa-pool, ...), metrics n_pool, n_train, n_val,
n_test, n_categories, n_questions, and the artifact data/splits.json (ids and records per split).
"""

import argparse

from entrypoints import _cli


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("data", __doc__)
    _cli.add_data(p)
    _cli.add_config(p)
    return p


def main() -> None:
    from core import data
    from core.tracking import stage_run
    from stages import data as data_stage

    args = build_parser().parse_args()
    cfg = _cli.build_config(args)
    if args.dry_run:
        questions = data.load_questions(cfg.data.source)
        data.check_sizes(cfg.data.sizes, len(questions))
        _cli.print_plan("data", cfg, [f"source: {cfg.data.source} ({len(questions)} questions)",
                                      f"split sizes: {cfg.data.sizes}, seed {cfg.data.seed}"])
        return
    with stage_run("data", cfg, run_name=f"data-{cfg.data.split}"):
        data_stage.run(cfg)


if __name__ == "__main__":
    _cli.main(main)
