"""analyze: figures and a report from the tracking store, for any set of runs.

Selects the FINISHED truthsteer runs of --experiment (default: every experiment, so runs that `mlflow run`
logged in Default are found too; or --parent-run and all its descendants), narrowed to
--models and --tags, from MLFLOW_TRACKING_URI (else tracking.uri of configs/base.yaml), and draws
per model and variant: truthfulness against steering scale (and against the relative scale, one line
per model), the tuning objective over layer and scale, what tuning buys against what steering costs
(Pareto fronts), the models compared by size, the LLM judge against the semantic judge (Cohen's kappa), the
change per category of the best variant, and the MLP training curves. Where the selection holds a sweep's
variant runs (tag sweep.name), its ablations too, one panel per model, sweep and metric (mc1 and
judge_truthful_informative, else judge_truthful or semantic_acc), the knobs a figure does not vary held at the
sweep's reference point, means over seeds with the bootstrap interval averaged over seeds: truthfulness against
scale and against layer, the MLP arms by width and branch, and the spread over seeds; each only where a sweep
varied its knob. A piece missing from some runs is listed in the report, never an error; no matching run is an
error naming the filter.

Parameters: --experiment, --models (aliases separated by |), --tags (key=value,...; params.key=value
filters a param), --parent-run, --out-dir, --dry-run (list the runs and the figures; write nothing).
Logs: to a new run tagged truthsteer.stage=analyze (params: the selection), under analysis/:
report.md; per figure <name>.png, <name>.pdf and <name>.csv (the table it plots) for scale_sweep,
relative_scale, layer_scale, pareto, cross_model, judge_agreement, category_delta and training_curves, and with sweep
runs sweep_scale, sweep_layer, sweep_mlp_arms and sweep_seeds; variant_metrics.csv, best_settings.csv, sweep_runs.csv
(one row per sweep variant run and metric), sweep_points.csv (the same averaged over seeds: seed_mean, seed_sd,
n_seeds, ci_low_seed_mean, ci_high_seed_mean), runs.csv and missing.csv. The same files are written to --out-dir.
"""

import argparse

from entrypoints import _cli


def _min_n(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1; e.g. --min-category-n 10")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("analyze", __doc__)
    p.add_argument("--experiment", default="", help="experiment name to read runs from (default: every experiment)")
    p.add_argument("--models", default="", help="model aliases separated by |; default: all")
    p.add_argument("--tags", default="", help="tag filters, key=value,...; params.key=value filters a param")
    _cli.run_arg(p, "parent-run", "only this run and all its descendants")
    p.add_argument("--out-dir", default="outputs/analysis", help="folder for the figures and the report")
    p.add_argument("--min-category-n", "--min_category_n", dest="min_category_n", type=_min_n, default=10,
                   help="the fewest questions a TruthfulQA category needs to be drawn in the per-category figure")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", type=_cli._bool, nargs="?", const=True,
                   default=False, help="list the selected runs and the figures; write nothing")
    return p


def main() -> None:
    from analysis import report, runs
    from core.tracking import log_params_once

    args = build_parser().parse_args()
    selection = runs.Selection.parse(args.experiment, args.models, args.tags, args.parent_run)
    print(f"tracking store: {runs.connect()}")
    selected = runs.select_runs(selection)
    if args.dry_run:
        print("\n".join(["dry run of analyze: nothing written or logged", *report.plan(selected, selection)]))
        return
    with report.analysis_run(selection):
        log_params_once({"analysis.min_category_n": args.min_category_n})
        result = report.run(selected, args.out_dir, title=selection.describe(), min_category_n=args.min_category_n)
    print(f"{len(result.drawn)} figures, {len(result.missing)} missing items; report: {result.report}")


if __name__ == "__main__":
    _cli.main(main)
