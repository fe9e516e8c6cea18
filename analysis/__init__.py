"""Figures and a report from the tracking store (the `analyze` stage)."""

from analysis.ablation_figures import (
    mlp_arms_figure,
    seed_spread_figure,
    sweep_layer_figure,
    sweep_scale_figure,
)
from analysis.ablations import ABLATION_FIGURES, ablation_tables, seed_points, sweep_runs
from analysis.agreement import agreement_table, cohen_kappa, kappa_interval
from analysis.categories import category_delta_table, chosen_variants
from analysis.figures import (
    PAPER_STYLE,
    category_delta_figure,
    cross_model_figure,
    judge_agreement_figure,
    save_figure,
    training_curves_figure,
)
from analysis.frames import FIGURES, FigureSpec, MlflowReader, StoreReader
from analysis.report import Analysis, analysis_run, analyze, plan, run
from analysis.runs import Missing, Selection, SelectionError, connect, select_runs
from analysis.sweep_figures import layer_scale_figure, scale_sweep_figure
from analysis.sweeps import best_settings_table, layer_scale_table, scale_sweep_table, tune_trials
from analysis.tables import (
    cross_model_table,
    training_curves_table,
    variant_metrics_table,
    variant_runs,
)
from core.artifacts import ANALYZE_STAGE

__all__ = [
    "ABLATION_FIGURES",
    "ANALYZE_STAGE",
    "FIGURES",
    "PAPER_STYLE",
    "Analysis",
    "FigureSpec",
    "Missing",
    "MlflowReader",
    "Selection",
    "SelectionError",
    "StoreReader",
    "ablation_tables",
    "agreement_table",
    "analysis_run",
    "analyze",
    "best_settings_table",
    "category_delta_table",
    "category_delta_figure",
    "chosen_variants",
    "cohen_kappa",
    "connect",
    "cross_model_figure",
    "cross_model_table",
    "judge_agreement_figure",
    "kappa_interval",
    "layer_scale_figure",
    "layer_scale_table",
    "mlp_arms_figure",
    "plan",
    "run",
    "save_figure",
    "scale_sweep_figure",
    "scale_sweep_table",
    "seed_points",
    "seed_spread_figure",
    "select_runs",
    "sweep_layer_figure",
    "sweep_runs",
    "sweep_scale_figure",
    "training_curves_figure",
    "training_curves_table",
    "tune_trials",
    "variant_metrics_table",
    "variant_runs",
]
