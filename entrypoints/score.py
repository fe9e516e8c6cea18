"""score: re-score an evaluate run's saved generations with any judges, without regenerating.

Reads the generations table (evaluate/generations.jsonl) of --source-run, or a local copy given as
--generations, and scores every variant's answers with the judges of --judges (eval.judges). mc
scores the model itself, so it needs --source-run (its config and source runs rebuild the model
and each variant's steering).

Parameters: --model, --source-run (evaluate run id) or --generations (a generations file), --judges
(e.g. semantic|bleu; eval.judges), --judge (judge model alias; judge.model), --trained-judge
(judge.trained), --overrides,
--preset, --dry-run.
Logs: a new run tagged truthsteer.source_run with one nested run per variant (the metric names of
evaluate), the re-scored table (evaluate/generations.jsonl, .csv and an MLflow table), the
per-category table and the summary, as evaluate does.
"""

import argparse

from entrypoints import _cli


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("score", __doc__)
    _cli.add_model(p)
    _cli.run_arg(p, "source-run", "MLflow run id of the evaluate run to re-score")
    p.add_argument("--generations", default="", help="a generations JSONL file, in place of --source-run")
    p.add_argument("--judges", default="", help="judges separated by |; default: eval.judges")
    p.add_argument("--judge", default="", help="judge model alias; default: judge.model")
    _cli.add_trained_judge(p)
    _cli.add_config(p)
    return p


def main() -> None:
    from core import artifacts
    from core.tracking import stage_run
    from stages import score

    args = build_parser().parse_args()
    extra = [f"eval.judges={args.judges}"] if args.judges else []
    extra += [f"judge.model={args.judge}"] if args.judge else []
    extra += _cli.trained_judge_override(args)
    cfg = _cli.build_config(args, extra)
    score.check_sources(cfg, source_run=args.source_run, generations=args.generations)  # before any run starts
    if args.dry_run:
        _cli.print_plan("score", cfg, score.plan(cfg, source_run=args.source_run, generations=args.generations))
        return
    source = args.source_run or args.generations
    with stage_run("score", cfg, tags={artifacts.TAG_SOURCE_RUN: source}):
        score.run(cfg, source_run=args.source_run, generations=args.generations)


if __name__ == "__main__":
    _cli.main(main)
