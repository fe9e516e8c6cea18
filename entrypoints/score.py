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

from core import artifacts
from entrypoints import _cli

ENTRY = _cli.Entry(
    "score", __doc__,
    lambda cfg, args: _cli.stage("score").plan(cfg, source_run=args.source_run, generations=args.generations),
    lambda cfg, args: _cli.stage("score").run(cfg, source_run=args.source_run, generations=args.generations),
    data=False, runs={"source-run": "MLflow run id of the evaluate run to re-score"},
    options=[("generations", str, "", "a generations JSONL file, in place of --source-run"),
             ("judges", str, "", "judges separated by |; default: eval.judges"),
             ("judge", str, "", "judge model alias; default: judge.model")],
    sets={"judges": "eval.judges", "judge": "judge.model"}, trained_judge=True,
    check=lambda cfg, args: _cli.stage("score").check_sources(cfg, source_run=args.source_run,
                                                               generations=args.generations),
    tags=lambda cfg, args: {artifacts.TAG_SOURCE_RUN: args.source_run or args.generations},
)
main = ENTRY.main

if __name__ == "__main__":
    _cli.main(main)
