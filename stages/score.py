"""The ``score`` stage: re-score an evaluate run's saved answers with any judges, regenerating nothing.

The answers are the generations table of an evaluate (or score) run, ``evaluate/generations.jsonl``,
read from ``--source-run`` or from a local file (``--generations``). Each row keeps its answer,
question, category and references; the judges of ``eval.judges`` replace the judge fields it had.
The results are logged like an evaluation's: one nested run per variant (same metric names in
every variant, tagged ``variant``, ``model``, ``layer``, ``scale``, ``dtype`` and
``truthsteer.source_run``), the tables and the summary in the active run, tagged
``truthsteer.source_run`` too.

``mc`` scores the model rather than the answers: it needs ``--source-run``, whose config and
source runs rebuild the model and each variant's steering.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow

from core import artifacts, profile
from core.config import Config, ConfigError
from core.config_io import config_from_dict, read_yaml
from core.models import LoadedModel, load_from_config
from core.tracking import CONFIG_ARTIFACT, download
from evaluation import judge_loading
from evaluation import mc as _mc
from evaluation.judges import Judge
from evaluation.linear import onednn_linears
from stages import evaluate
from stages.source_runs import SourceRuns
from steering.methods.intervention import Steering

REQUIRED_COLUMNS = ("qid", "question", "category", "variant", "model", "dtype", "answer", "best_answer",
                    "correct_answers", "incorrect_answers")


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a generations table (JSONL), checked, with only the columns before any judge's fields.

    Args:
        path: an evaluate run's ``evaluate/generations.jsonl``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"generations file {path} does not exist; pass the {artifacts.GENERATIONS} of an "
                          "evaluate run, or --source-run")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ConfigError(f"{path}: line {number} is not JSON ({err}); pass an evaluate run's "
                              f"{artifacts.GENERATIONS}") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise ConfigError(f"{path}: line {number} lacks {missing}; a generations table row has "
                              f"{', '.join(evaluate.BASE_COLUMNS)} (the generation store's own file does not "
                              f"hold the references: pass the evaluate run's {artifacts.GENERATIONS})")
        rows.append({c: row.get(c) for c in evaluate.BASE_COLUMNS})
    if not rows:
        raise ConfigError(f"generations file {path} holds no rows")
    return rows


def rows_by_variant(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by variant, baseline first, each in its file order; every variant must answer the
    same questions in the same order (they are paired against baseline).

    Args:
        rows: generations-table rows (``read_generations``).
    """
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(str(row["variant"]), []).append(dict(row))
    ordered = {v: grouped[v] for v in evaluate.ordered_variants(list(grouped))}
    first = next(iter(ordered.values()))
    order = [r["qid"] for r in first]
    for variant, variant_rows in ordered.items():
        if [r["qid"] for r in variant_rows] != order:
            raise ConfigError(f"variant {variant!r} does not answer the same questions in the same order as "
                              f"{next(iter(ordered))!r}; re-score a complete generations table")
    return ordered


def check_sources(cfg: Config, *, source_run: str = "", generations: str = "") -> None:
    """Fail, before any run starts, unless exactly one source is given (and ``mc`` has its run).

    Args:
        cfg: the resolved config (``eval.judges``).
        source_run: an evaluate run id.
        generations: a local generations file.
    """
    if bool(source_run) == bool(generations):
        raise ConfigError("pass exactly one of --source-run (an evaluate run id) or --generations (a generations "
                          f"JSONL file); got source_run={source_run!r}, generations={generations!r}")
    if "mc" in cfg.eval.judges and not source_run:
        raise ConfigError("the mc judge scores the model and its steering, not the saved answers: pass "
                          "--source-run (the evaluate run) instead of --generations, or drop mc from --judges")
    if generations and not Path(generations).is_file():
        raise ConfigError(f"generations file {generations} does not exist; pass the {artifacts.GENERATIONS} of an "
                          "evaluate run, or --source-run")


def _source_config(source_run: str) -> tuple[Config, SourceRuns]:
    cfg = config_from_dict(read_yaml(download(source_run, CONFIG_ARTIFACT)))
    params = mlflow.MlflowClient().get_run(source_run).data.params
    return cfg, SourceRuns.from_params(params)


def run(cfg: Config, *, source_run: str = "", generations: str = "") -> evaluate.EvaluationResult:
    """Re-score saved answers in the active MLflow run.

    Args:
        cfg: the resolved config: ``eval.judges`` (which judges), ``judge`` (judge model and budgets),
            ``eval`` (intervals), ``runtime`` (devices).
        source_run: an evaluate (or score) run whose ``evaluate/generations.jsonl`` to re-score.
        generations: a local generations JSONL file, in place of ``source_run``.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("score.run needs an active MLflow run: call it inside tracking.stage_run")
    check_sources(cfg, source_run=source_run, generations=generations)
    path = download(source_run, artifacts.GENERATIONS) if source_run else Path(generations)
    grouped = rows_by_variant(read_generations(path))
    origin = source_run or str(Path(generations).resolve())
    mlflow.set_tag(artifacts.TAG_SOURCE_RUN, origin)

    main: LoadedModel | None = None
    steerings: dict[str, Steering] = {}
    if "mc" in cfg.eval.judges:
        source_cfg, sources = _source_config(source_run)
        main = load_from_config(source_cfg)
        dtype = evaluate.dtype_name(main)
        saved = {str(r["dtype"]) for rows in grouped.values() for r in rows}
        if saved != {dtype}:
            raise ConfigError(f"the answers were generated in {sorted(saved)} but the source config loads "
                              f"{dtype}; mc would score a different model")
        steerings = {v: evaluate.build_steering(source_cfg, v, sources, main) for v in grouped}
    judge_model = judge_loading.load_judge_model(cfg, cfg.eval.judges, main)
    judges = judge_loading.make_judges(cfg, cfg.eval.judges, judge_model)

    bound = {id(j): j.bind_all(main, steerings) for j in judges if isinstance(j, _mc.MCJudge)} if main else {}

    def judges_for(variant: str) -> list[Judge]:
        if main is None:
            return judges
        return [bound[id(j)][variant] if isinstance(j, _mc.MCJudge) else j for j in judges]

    info = {v: {k: rows[0].get(k) for k in ("model", "dtype", "layer", "scale")} for v, rows in grouped.items()}
    profile.take()  # this stage's steps only
    with onednn_linears(main.model, main.device) if main is not None else contextlib.nullcontext():  # as evaluate
        result = evaluate.judge_and_log(cfg, grouped, judges_for, info, extra_tags={artifacts.TAG_SOURCE_RUN: origin})
    profile.log()
    return result


def plan(cfg: Config, *, source_run: str = "", generations: str = "") -> list[str]:
    """What ``run`` would do, for a dry run: nothing loads but the generations table's name.

    Args:
        cfg: the resolved config.
        source_run: the evaluate run to re-score.
        generations: a local generations file, in place of ``source_run``.
    """
    check_sources(cfg, source_run=source_run, generations=generations)
    where = f"run {source_run} ({artifacts.GENERATIONS})" if source_run else f"file {generations}"
    needs_llm = [j for j in cfg.eval.judges if j in judge_loading.LLM_JUDGES]
    return [f"answers: {where}; nothing is regenerated",
            f"judges: {', '.join(cfg.eval.judges)}"
            + (f"; judge model {cfg.judge.model} on {cfg.runtime.judge_device}" if needs_llm else "")]


__all__ = ["REQUIRED_COLUMNS", "check_sources", "plan", "read_generations", "rows_by_variant", "run"]
