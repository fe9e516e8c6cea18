"""full: the whole pipeline, data -> extract -> bank -> train (mc, gen) -> evaluate, as nested runs.

Finished stage runs with the same parameters and code version are reused, so a killed run
continues when started again.

Parameters: --model, --data, --split, --judge, --tuned (a tune run id whose best params to use),
--overrides, --preset, --dry-run.
Logs: a parent run with the summary table.
"""

import argparse

from entrypoints import _cli


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("full", __doc__)
    _cli.add_model(p)
    _cli.add_data(p)
    p.add_argument("--judge", default="", help="judge model alias; default: judge.model")
    _cli.run_arg(p, "tuned", "MLflow run id of a tune study whose best layer and scale to use")
    _cli.add_config(p)
    return p


def main() -> None:
    from core.tracking import ensure_store, stage_run, tracking_uri
    from stages import pipeline

    args = build_parser().parse_args()
    extra = [f"judge.model={args.judge}"] if args.judge else []
    cfg = _cli.build_config(args, extra)
    if args.tuned:  # the study's best layer and scale, under the user's own overrides
        ensure_store(tracking_uri(cfg))
        cfg = _cli.build_config(args, [*extra, *pipeline.tuned_overrides(args.tuned)])
    if args.dry_run:
        _cli.print_plan("full", cfg, pipeline.plan(cfg))
        return
    with stage_run("full", cfg, run_name=f"{cfg.model.alias}-full-{cfg.data.split}",
                   tags={"truthsteer.tuned_from": args.tuned} if args.tuned else None):
        pipeline.run(cfg)


if __name__ == "__main__":
    _cli.main(main)
