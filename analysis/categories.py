"""The per-category figure's table: which steered variants it shows, and their change against baseline in each
TruthfulQA category with enough questions, with paired intervals.

The variant is chosen on the validation split, never on the questions it is then plotted on: where a model has an
evaluation on ``val`` (``evaluate --overrides eval.split=val``), its best steered variant there is shown; without
one, every steered variant is shown, and the missing list says how to choose one. A category with fewer than
``min_n`` questions is left out (its mean over a handful of questions says little), and so is said.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from analysis.runs import Missing
from analysis.tables import best_variants, latest_evaluations, variant_metrics_table, variant_order

MIN_CATEGORY_N = 10  # the default: categories with fewer questions are not drawn
CATEGORY_COLUMNS = ["model", "variant", "chosen_on", "metric", "category", "n", "mean", "delta", "delta_ci_low",
                    "delta_ci_high"]


def chosen_variants(variants: pd.DataFrame, evaluations: Mapping[str, str], metric: str, higher: bool,
                    missing: Missing) -> dict[str, tuple[list[str], str]]:
    """Per model of ``evaluations``: the steered variants its per-category figure shows, and how they were chosen.

    Args:
        variants: ``tables.variant_runs`` output (every split).
        evaluations: model -> the evaluation the figure reads (``tables.latest_evaluations``).
        metric: the metric that ranks variants.
        higher: whether higher values of it are better.
        missing: records models without a validation evaluation to choose on.
    """
    on_val = latest_evaluations(variants, validation=True)
    ranked = variant_metrics_table(variants, on_val, [metric], Missing(), sorted(on_val)) if on_val else None
    best = best_variants(ranked, metric, higher) if ranked is not None and not ranked.empty else {}
    out: dict[str, tuple[list[str], str]] = {}
    for model, evaluation in evaluations.items():
        shown = variants[(variants["model"] == model) & (variants["evaluation"] == evaluation)]["variant"]
        steered = [v for v in variant_order(shown) if v != "baseline"]
        if best.get(model) in steered and on_val.get(model) != evaluation:
            n = variants[variants["evaluation"] == on_val[model]].get("metrics.n_questions", pd.Series(dtype=float))
            count = f", n={int(n.max())}" if n.notna().any() else ""
            out[model] = ([best[model]], f"chosen as best {metric} on val (evaluation {on_val[model][:8]}{count})")
            continue
        out[model] = (steered, "every steered variant (no evaluation on val to choose one)")
        if steered:
            missing.add("per-category figure shows every steered variant: no evaluation on the val split to choose the "
                        "best one (mlflow run . -e evaluate -P overrides=eval.split=val)", model=model,
                        run_id=evaluation)
    return out


def category_delta_table(categories_by_model: Mapping[str, pd.DataFrame],
                         chosen: Mapping[str, tuple[list[str], str]], metric_name: str, missing: Missing,
                         model_order: Sequence[str] | None = None, *, min_n: int = MIN_CATEGORY_N) -> pd.DataFrame:
    """Per model and chosen variant: the per-category mean, change against baseline and its interval, for
    categories of at least ``min_n`` questions.

    Args:
        categories_by_model: model -> its evaluation's ``evaluate/per_category.csv`` (columns ``variant``,
            ``metric``, ``category``, ``n``, ``mean``, ``delta``; ``delta_ci_low``/``delta_ci_high`` since the
            evaluate stage computes them: NaN for older evaluations, and said in ``missing``).
        chosen: ``chosen_variants`` output.
        metric_name: the metric.
        missing: records models whose table lacks the variant, metric, deltas or intervals, and the categories
            left out as too small.
        model_order: the models' order; default by name.
        min_n: the fewest questions a category needs to be shown.
    """
    frames = []
    for model in model_order or sorted(categories_by_model):
        if model not in categories_by_model or model not in chosen:
            continue
        table = categories_by_model[model]
        needed = {"variant", "metric", "category", "n", "mean", "delta"}
        if not needed <= set(table.columns):
            missing.add(f"per-category table without columns {', '.join(sorted(needed - set(table.columns)))}: "
                        f"no per-category figure", model=model)
            continue
        if "delta_ci_low" not in table:
            missing.add("per-category table without intervals (an evaluation from before they were computed): "
                        "evaluate again to draw them", model=model)
            table = table.assign(delta_ci_low=math.nan, delta_ci_high=math.nan)
        variants, how = chosen[model]
        for variant in variants:
            rows = table[(table["variant"] == variant) & (table["metric"] == metric_name)].sort_values("category")
            if rows.empty:
                missing.add(f"per-category table has no rows for {variant} and {metric_name}", model=model)
                continue
            small = rows[rows["n"] < min_n]
            if len(small):
                missing.add(f"{variant}: {len(small)} of {len(rows)} categories have fewer than {min_n} questions "
                            f"and are not drawn ({', '.join(map(str, small['category']))})", model=model)
            rows = rows[rows["n"] >= min_n]
            frames.append(pd.DataFrame({
                "model": model, "variant": variant, "chosen_on": how, "metric": metric_name,
                "category": rows["category"].astype(str), "n": rows["n"].astype(int), "mean": rows["mean"].astype(float),
                "delta": rows["delta"].astype(float), "delta_ci_low": rows["delta_ci_low"].astype(float),
                "delta_ci_high": rows["delta_ci_high"].astype(float)}))
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in CATEGORY_COLUMNS})
    return pd.concat(frames, ignore_index=True)[CATEGORY_COLUMNS]


__all__ = ["CATEGORY_COLUMNS", "MIN_CATEGORY_N", "category_delta_table", "chosen_variants"]
