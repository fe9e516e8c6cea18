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
Logs: one nested run per variant (<model>-<variant>, tags variant, model, layer, scale, dtype) with
the same metric names: each judge metric with _ci_low/_ci_high, _delta with its interval and
_mcnemar_p against baseline, <judge>_invalid_rate, n_generated, n_reused; in the parent run the
generations table (evaluate/generations.jsonl, .csv and an MLflow table), evaluate/per_category.csv
and the summary evaluate/summary.md and .csv.
"""

import argparse

from entrypoints import _cli


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("evaluate", __doc__)
    _cli.add_model(p)
    _cli.add_data(p)
    _cli.run_arg(p, "data-run", "MLflow run id of a data stage whose splits to use")
    p.add_argument("--sources", default="", help="each steered variant's source run, variant=RUN separated by |")
    p.add_argument("--variants", default="", help="variants separated by |; default: eval.variants")
    p.add_argument("--judge", default="", help="judge model alias; default: judge.model")
    _cli.add_trained_judge(p)
    _cli.add_config(p)
    return p


def main() -> None:
    from core.tracking import stage_run
    from stages import evaluate
    from stages.source_runs import SourceRuns

    args = build_parser().parse_args()
    extra = [f"eval.variants={args.variants}"] if args.variants else []
    extra += [f"judge.model={args.judge}"] if args.judge else []
    extra += _cli.trained_judge_override(args)
    cfg = _cli.build_config(args, extra)
    sources = SourceRuns.parse(args.data_run, args.sources)
    sources.check(cfg.eval.variants)  # before any run starts
    if args.dry_run:
        _cli.print_plan("evaluate", cfg, evaluate.plan(cfg, sources))
        return
    with stage_run("evaluate", cfg):
        evaluate.run(cfg, sources=sources)


if __name__ == "__main__":
    _cli.main(main)
