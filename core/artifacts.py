"""The names of the artifacts and tags that the stages write and read, in one place, and the one way
tensors are stored: safetensors beside a JSON sidecar (never pickle)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SPLITS = "data/splits.json"
CAA_TENSORS = "extract/caa.safetensors"
CAA_META = "extract/caa.json"
BANK_TENSORS = "bank/bank.safetensors"
BANK_META = "bank/bank.json"
MLP_DIR = "mlp/{branch}"  # holds MLP_TENSORS and MLP_META
MLP_TENSORS = "mlp.safetensors"
MLP_META = "mlp.json"
ITI_HEADS = "iti/heads.safetensors"  # every head ranked by probe accuracy, with its direction and sigma
ITI_META = "iti/heads.json"
TUNED = "tune/best_config.yaml"  # {section: {key: value}}: the best params of a study, for `full -P tuned=`
TUNE_TRIALS = "tune/trials.csv"  # every trial of the study (all workers): number, state, value, params, attrs
TUNE_HISTORY = "tune/history.png"  # optuna's optimisation history
TUNE_IMPORTANCE = "tune/importance.png"  # optuna's param importances (absent with < 2 completed trials)
TUNE_PARETO = "tune/pareto.csv"  # a study with a cost: every complete trial's value and cost, its front, the chosen one
TUNE_PARETO_FIGURE = "tune/pareto.png"  # the same as a figure (gain against cost)

# evaluate and score: the same files, so that `score` can re-score a `score` run too
GENERATIONS = "evaluate/generations.jsonl"  # one row per (question, variant): answer, references, verdicts
GENERATIONS_CSV = "evaluate/generations.csv"
GENERATIONS_TABLE = "evaluate/generations_table.json"  # the same rows, as an MLflow table (mlflow.log_table)
PER_CATEGORY = "evaluate/per_category.csv"  # variant x metric x category: n, mean, delta vs baseline
SUMMARY_MD = "evaluate/summary.md"  # variants x metrics with intervals
SUMMARY_CSV = "evaluate/summary.csv"
COMPARISON_FIGURE = "evaluate/comparison.png"  # variants x headline metrics, intervals and deltas
COMPARISON_TABLE = "evaluate/comparison.json"  # the same, as an MLflow table
JUDGE_DIR = "judge"  # the trained judge: judge.safetensors and judge.json (train_judge)
CALIBRATION_TABLE = "calibrate/agreement_table.json"  # judge x label x subset agreement, an MLflow table
CALIBRATION_CSV = "calibrate/agreement.csv"
CALIBRATION_MARKDOWN = "calibrate/agreement.md"
CALIBRATION_CONFUSION = "calibrate/confusion.csv"  # tp, fp, fn, tn per judge, label and subset
CALIBRATION_CATEGORIES = "calibrate/per_category.csv"  # kappa, accuracy and n per judge, label and category

# analyze: one folder, written to --out-dir and logged under ANALYSIS_DIR, so that report.md's
# relative links work in both places. Each figure stem gets <stem>.png, <stem>.pdf and the table
# it plots, <stem>.csv.
ANALYSIS_DIR = "analysis"
ANALYSIS_REPORT = "report.md"
ANALYSIS_RUNS = "runs.csv"  # the selected runs: id, stage, model, variant, name
ANALYSIS_MISSING = "missing.csv"  # model, run_id, what: everything the analysis looked for and did not find
ANALYSIS_VARIANT_METRICS = "variant_metrics.csv"  # per model and variant: each judge metric with intervals
ANALYSIS_BEST_SETTINGS = "best_settings.csv"  # per model: best layer and scale (tune trials, evaluate runs)
ANALYSIS_SCALE_SWEEP = "scale_sweep"
ANALYSIS_RELATIVE_SCALE = "relative_scale"  # the metric against the relative scale, one line per model
ANALYSIS_LAYER_SCALE = "layer_scale"
ANALYSIS_CROSS_MODEL = "cross_model"
ANALYSIS_SWEEP_SCALE = "sweep_scale"  # a sweep's figures (analysis.ablations): accuracy against scale,
ANALYSIS_SWEEP_LAYER = "sweep_layer"  # against layer,
ANALYSIS_SWEEP_MLP_ARMS = "sweep_mlp_arms"  # the MLP's width and branch arms,
ANALYSIS_SWEEP_SEEDS = "sweep_seeds"  # and the spread over seeds
ANALYSIS_SWEEP_RUNS = "sweep_runs.csv"  # one row per sweep variant run and metric
ANALYSIS_SWEEP_POINTS = "sweep_points.csv"  # the same, averaged over seeds
ANALYSIS_PARETO = "pareto"  # tune studies with a cost: each trial's gain against its cost, the front, the chosen one
ANALYSIS_JUDGE_AGREEMENT = "judge_agreement"
ANALYSIS_CATEGORY_DELTA = "category_delta"
ANALYSIS_TRAINING_CURVES = "training_curves"


def save_tensors(tensors_path: Path, meta_path: Path, tensors: Mapping[str, torch.Tensor],
                 meta: Mapping[str, Any]) -> None:
    """Write contiguous CPU copies of ``tensors`` as safetensors and ``meta`` as indented JSON."""
    from safetensors.torch import save_file  # not at the top: `--help` and the tag names need no torch

    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tensors_path))
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_tensors(tensors_path: Path, meta_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what ``save_tensors`` wrote; a missing file is an error naming it."""
    from safetensors.torch import load_file

    for path in (tensors_path, meta_path):
        if not Path(path).exists():
            raise FileNotFoundError(f"artifact file {path} is missing")
    return load_file(str(tensors_path)), json.loads(Path(meta_path).read_text())


# ---------------------------------------------------------------- tags and stage names
# Every tag a stage sets and a later stage or the analysis reads, and the stage names that mark runs.

TAG_STAGE = "truthsteer.stage"
TAG_MODEL = "truthsteer.model"
TAG_CODE = "truthsteer.code_version"
TAG_HOST = "truthsteer.host"
TAG_PID = "truthsteer.pid"  # with TAG_HOST: lets a later run mark this one KILLED if its process died
TAG_HEARTBEAT = "truthsteer.heartbeat"  # unix seconds, refreshed while the run's process lives (other hosts' runs)
TAG_REAPED = "truthsteer.reaped"  # why a later run ended this one
TAG_BRANCH_RUN = "truthsteer.mlp_{branch}_run"  # set on a parent run whose branches trained in child runs
TAG_FAST_PATH = "truthsteer.fast_path"
TAG_BRANCH = "truthsteer.branch"
TAG_MODELS = "truthsteer.models"  # the models an analysis covers, separated by |
TUNE_STAGE = "tune"
TRAIN_STAGE = "train"
ANALYZE_STAGE = "analyze"
TAG_PARENT = "mlflow.parentRunId"
TAG_EXTRACT_RUN = "truthsteer.extract_run"
TAG_NOTES = "truthsteer.bank_notes"
TRIAL_METRIC = "objective"  # the trials' metric as MLflowCallback logs it; the metric's own name too
TRIAL_STAGE = "tune.trial"
TAG_STUDY = "truthsteer.study"
TAG_OBJECTIVE_METRIC = "truthsteer.objective_metric"
TAG_OBJECTIVE_DIRECTION = "truthsteer.objective_direction"
TAG_CONSTRAINT = "truthsteer.constraint"  # a tune study's bound on its cost, e.g. kl_neutral<=0.5
TAG_COST = "truthsteer.cost"  # a tune study's measured cost of steering (its constraint's or second direction's)
TAG_EXTRACTION = "truthsteer.extraction_source"
TAG_BEST_RUN = "truthsteer.best_run"
TAG_BEST_TRIAL = "truthsteer.best_trial"
TAG_BEST_LAYER = "truthsteer.best_layer"
TAG_BEST_SCALE = "truthsteer.best_scale"
TAG_BEST_K = "truthsteer.best_k"  # an ITI study's best number of heads
TAG_BEST_ALPHA = "truthsteer.best_alpha"  # and its best alpha


def best_tag(param: str) -> str:
    """The tag of a study's best value of ``param`` (``TAG_BEST_LAYER`` for ``layer``)."""
    return f"truthsteer.best_{param}"
TAG_STOPPED = "truthsteer.stopped"  # a signal stopped the worker before its trials were done
VARIANT_STAGE = "evaluate.variant"  # TAG_STAGE of the nested per-variant runs
# What tells the variant runs apart (runs logged before these were namespaced carry "variant", "layer", ...)
TAG_VARIANT = "truthsteer.variant"
TAG_LAYER = "truthsteer.layer"  # unset for baseline
TAG_SCALE = "truthsteer.scale"  # the hook multiplier; unset for baseline
TAG_DTYPE = "truthsteer.dtype"
TAG_STORE = "truthsteer.generation_store"
TAG_LINEAR = "truthsteer.linear"  # onednn: the fp32 linear layers on a CPU by oneDNN (evaluation.linear); torch
TAG_ATTENTION = "truthsteer.attention"  # on a CPU, the packed decode attention's products: cpp (evaluation.native) or bmm
TAG_SOURCE_RUN = "truthsteer.source_run"
TAG_JUDGE_URI = "truthsteer.judge_uri"
TAG_KEY = "truthsteer.stage_key"
TAG_REUSED = "truthsteer.reused"
# The sweep (stages.sweep): one parent run, one evaluate run per cell, whose variant runs carry the cell's knobs
SWEEP_STAGE = "sweep"
SWEEP_CELLS = "sweep/cells.json"  # on the sweep's parent run: the grid, the reference point and every cell's run
SWEEP_KNOBS = ("scale", "layer", "mlp_expansion", "branch", "seed")
TAG_SWEEP_NAME = "sweep.name"  # the grid's name (its file's stem, or "inline")
TAG_SWEEP_REFERENCE = "sweep.reference"  # JSON: the value each knob is held at in a figure that does not vary it


def sweep_tag(knob: str) -> str:
    """The tag of a swept knob on a cell's runs, e.g. ``sweep.scale`` (values as strings)."""
    return f"sweep.{knob}"
