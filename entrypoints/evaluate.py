"""evaluate: batched steered generation for the variants of eval.variants, judged.

Each question of eval.split is answered by every variant in eval.variants, a registered steering
method (steering.methods: baseline, caa, mlp_mc, mlp_gen) whose source run --sources names, e.g.
--sources "caa=<extract run>|mlp_mc=<train run>|mlp_gen=<train run>". Generation is batched, left-padded and greedy unless
eval.do_sample, steered from the prompt end on; finished answers are kept in a generation store
(outputs/evaluate/<hash>/generations.jsonl, root $TRUTHSTEER_OUTPUTS), so a restarted run
regenerates nothing. The judges of eval.judges score the answers (the judge model is loaded once).

Parameters: --model, --data, --split, --data-run, --sources (variant=RUN pairs), --variants (e.g. baseline|caa; eval.variants), --judge (judge model alias;
judge.model), --trained-judge (judge.trained: the trained judge, models:/truthsteer-judge/<version>),
--overrides, --preset, --dry-run (print the plan; load no weights).
Logs: one nested run per variant (<variant>-<model>, tags truthsteer.variant, .layer, .scale, .dtype; params
the config that variant reads plus variant.* (layer, scale, positions, source run, MLP width)) with
the same metric names: each judge metric with _ci_low/_ci_high, _delta with its interval and
_mcnemar_p against baseline, <judge>_invalid_rate, n_generated, n_reused; in the parent run the
generations table (evaluate/generations.jsonl, .csv and an MLflow table), evaluate/per_category.csv
and the summary evaluate/summary.md and .csv.
"""

from argparse import Namespace
from typing import Any

from entrypoints import _cli


def _sources(args: Namespace) -> Any:  # a stages.source_runs.SourceRuns
    from stages.source_runs import SourceRuns

    return SourceRuns.parse(args.data_run, args.sources)


ENTRY = _cli.Entry(
    "evaluate", __doc__, lambda cfg, args: _cli.stage("evaluate").plan(cfg, _sources(args)),
    lambda cfg, args: _cli.stage("evaluate").run(cfg, sources=_sources(args)),
    runs={"data-run": "MLflow run id of a data stage whose splits to use"},
    options=[("sources", str, "", "each steered variant's source run, variant=RUN separated by |"),
             ("variants", str, "", "variants separated by |; default: eval.variants"),
             ("judge", str, "", "judge model alias; default: judge.model")],
    sets={"variants": "eval.variants", "judge": "judge.model"}, trained_judge=True,
    check=lambda cfg, args: _sources(args).check(cfg.eval.variants),
)
main = ENTRY.main

if __name__ == "__main__":
    _cli.main(main)
