"""full: the whole pipeline, data -> extract -> bank -> train (mc, gen) -> evaluate, as nested runs.

Finished stage runs with the same parameters and code version are reused, so a killed run
continues when started again.

Parameters: --model, --data, --split, --judge, --tuned (a tune run id whose best params to use),
--overrides, --preset, --dry-run.
Logs: a parent run with the summary table.
"""

from argparse import Namespace

from core.config import Config
from entrypoints import _cli


class FullEntry(_cli.Entry):
    def config(self, args: Namespace) -> Config:
        """With ``--tuned``, the study's best layer and scale under the user's own overrides."""
        cfg = super().config(args)
        if not args.tuned:
            return cfg
        from core.tracking import ensure_store, tracking_uri

        ensure_store(tracking_uri(cfg))
        extra = [f"judge.model={args.judge}"] if args.judge else []
        return _cli.build_config(args, [*extra, *_cli.stage("pipeline").tuned_overrides(args.tuned)])


ENTRY = FullEntry(
    "full", __doc__, lambda cfg, args: _cli.stage("pipeline").plan(cfg), lambda cfg, args: _cli.stage("pipeline").run(cfg),
    runs={"tuned": "MLflow run id of a tune study whose best layer and scale to use"},
    options=[("judge", str, "", "judge model alias; default: judge.model")], sets={"judge": "judge.model"},
    run_name=lambda cfg, args: f"{cfg.model.alias}-full-{cfg.data.split}",
    tags=lambda cfg, args: {"truthsteer.tuned_from": args.tuned} if args.tuned else None,
)
main = ENTRY.main

if __name__ == "__main__":
    _cli.main(main)
