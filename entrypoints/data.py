"""data: TruthfulQA split deterministically into pool/train/val/test, stratified by category.

Parameters: --data (CSV/Parquet path or Hugging Face dataset id), --split (smoke: 60/80/40/80,
full: 100/250/117/200; custom sizes with --overrides "data.test=50"), --overrides (e.g.
"data.seed=1"), --preset, --dry-run.
Logs: one MLflow dataset input per split (truthfulqa-pool, ...), metrics n_pool, n_train, n_val,
n_test, n_categories, n_questions, and the artifact data/splits.json (ids and records per split).
"""

from argparse import Namespace

from core.config import Config
from entrypoints import _cli


def _plan(cfg: Config, args: Namespace) -> list[str]:
    from core import data

    questions = data.load_questions(cfg.data.source)
    data.check_sizes(cfg.data.sizes, len(questions))
    return [f"source: {cfg.data.source} ({len(questions)} questions)",
            f"split sizes: {cfg.data.sizes}, seed {cfg.data.seed}"]


ENTRY = _cli.Entry("data", __doc__, _plan, lambda cfg, args: _cli.stage("data").run(cfg), model=False,
                   run_name=lambda cfg, args: f"data-{cfg.data.split}")
main = ENTRY.main

if __name__ == "__main__":
    _cli.main(main)
