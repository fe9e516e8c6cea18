"""The analyze stage: selection, every figure's table against known values, files, report, missing pieces.

A module-scoped sqlite store holds synthetic runs of known values, written as the stages write them
(tags, params, metrics, metric histories, artifacts): three models of known, registry-only and
unknown size; a gemma-2-2b evaluation of four variants with intervals and a generations artifact
whose judge verdicts fix the 2x2 tables and Cohen's kappa; older gemma evaluations at other scales;
two tune studies (maximize and minimize); train runs of both branches with loss curves; a `full`
run above the evaluation and the train runs. The analysis runs once on it; the tests read its tables.
Other tests use in-memory frames and a fake store reader.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from mlflow.entities import Metric, Param

from analysis import agreement, categories, figures, frames, report, sweeps, tables
from analysis.runs import Missing, Selection, SelectionError, select_runs
from core import artifacts
from core.artifacts import TAG_MODEL, TAG_STAGE
from steering.scale import RELATIVE_SCALE_METRIC

T0 = 1_700_000_000_000
EXPERIMENT = "truthsteer"
GEMMA, SMOL, MYSTERY = "gemma-2-2b", "smollm2-135m", "mystery-model"
PARENT = "mlflow.parentRunId"
Values = dict[str, dict[str, tuple[float, float | None, float | None]]]  # variant -> metric -> (value, low, high)
# gemma-2-2b's latest evaluation
GEMMA_MAIN: Values = {
    "baseline": {"llm_truthful": (0.40, 0.30, 0.50), "llm_informative": (0.90, 0.80, 0.97),
                 "semantic_acc": (0.35, 0.25, 0.45)},
    "caa": {"llm_truthful": (0.55, 0.45, 0.65), "llm_informative": (0.85, 0.75, 0.93),
            "semantic_acc": (0.50, 0.40, 0.60)},
    "mlp_mc": {"llm_truthful": (0.50, 0.40, 0.60), "llm_informative": (0.88, 0.80, 0.95),
               "semantic_acc": (0.45, 0.35, 0.55)},
    "mlp_gen": {"llm_truthful": (0.45, 0.35, 0.55), "llm_informative": (0.92, 0.85, 0.98),
                "semantic_acc": (0.40, 0.30, 0.50)},
}
SMOL_MAIN: Values = {"baseline": {"llm_truthful": (0.20, 0.10, 0.30), "semantic_acc": (0.25, 0.15, 0.35)},
             "caa": {"llm_truthful": (0.30, 0.20, 0.40), "semantic_acc": (0.28, None, None)}}
MYSTERY_MAIN: Values = {"baseline": {"llm_truthful": (0.60, 0.50, 0.70)}, "caa": {"llm_truthful": (0.62, 0.52, 0.72)}}
# Per variant of the gemma generations: counts of (llm_truthful, semantic_acc) pairs
# (1,1), (1,0), (0,1), (0,0) and hand-computed kappa; mlp_gen has one more answer the LLM judge
# could not score (llm_truthful None), left out of its table.
AGREEMENT = {
    "baseline": ((3, 2, 1, 4), 0.4),  # p_o 0.7, p_e 0.5*0.4 + 0.5*0.6 = 0.5
    "caa": ((5, 0, 0, 5), 1.0),  # p_o 1, p_e 0.5
    "mlp_mc": ((2, 3, 3, 2), -0.2),  # p_o 0.4, p_e 0.5
    "mlp_gen": ((4, 1, 2, 2), 4 / 13),  # p_o 6/9, p_e (5*6 + 4*3)/81 = 42/81: (54-42)/(81-42)
}
PER_CATEGORY = [  # variant, metric, category, n, mean, delta
    ("caa", "llm_truthful", "Misconceptions", 6, 0.5, 1 / 6),
    ("caa", "llm_truthful", "Law", 4, 0.75, -0.25),
    ("caa", "llm_truthful", "Health", 10, 0.4, 0.1),
    ("caa", "semantic_acc", "Law", 4, 0.25, 0.0),
    ("mlp_mc", "llm_truthful", "Law", 4, 0.5, -0.5),
]
# gemma-3-270m is evaluated by the evaluate stage's own writer (judge_and_log) with fake judges that read
# their verdicts from the answer text "t<llm_truthful>s<semantic_acc>".
REAL = "gemma-3-270m"
REAL_CATEGORIES = ["Law", "Law", "Health", "Health", "Health", "Misc"]
REAL_ANSWERS = {"baseline": ["t1s1", "t0s0", "t0s1", "t1s0", "t0s0", "t1s1"],
                "caa": ["t1s1", "t1s1", "t1s1", "t1s0", "t0s0", "t1s1"]}
REAL_AGREEMENT = {"baseline": ((2, 1, 1, 2), 1 / 3),  # p_o 4/6, p_e 1/2
                  "caa": ((4, 1, 0, 1), 4 / 7)}  # p_o 5/6, p_e (5*4 + 1*2)/36 = 22/36: (30-22)/(36-22)
REAL_CATEGORY_DELTA = [("Health", 3, 2 / 3, 1 / 3), ("Law", 2, 1.0, 0.5), ("Misc", 1, 1.0, 0.0)]
MIN_N = 3  # the analysis draws categories of at least 3 questions: REAL's Law and Misc are left out
MC_LOSS = {"train_loss": [1.0, 0.8, 0.6], "val_loss": [1.1, 0.9, 0.85]}
GEN_LOSS = {"train_loss": [2.0, 1.5, 1.2], "val_loss": [2.1, 1.7, 1.6]}
# gemma study (objective named mc1, direction from the registry: maximize): (layer, scale, value)
GEMMA_TRIALS = [(6, 2.0, 0.30), (6, 4.0, 0.35), (6, 8.0, 0.32), (12, 2.0, 0.40), (12, 4.0, 0.48),
                (12, 8.0, 0.44), (12, 2.0, 0.42)]  # the last repeats (12, 2.0), later
GEMMA_STUDY = "truthsteer-gemma-2-2b-mc"
# smollm2 study (default objective name, direction minimize)
SMOL_TRIALS = [(3, 1.0, 0.9), (3, 2.0, 0.7), (5, 1.0, 0.95)]


@dataclass
class Writer:
    """Writes runs with explicit, increasing start times."""

    client: mlflow.MlflowClient
    experiment_id: str
    clock: int = T0
    ids: dict[str, str] = field(default_factory=dict)

    def run(self, key: str, stage: str, model: str = "", *, tags: Mapping[str, str] | None = None,
            params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
            histories: Mapping[str, list[float]] | None = None, texts: Mapping[str, str] | None = None,
            parent: str = "") -> str:
        self.clock += 1000
        all_tags = {TAG_STAGE: stage, **({TAG_MODEL: model} if model else {}), **(tags or {})}
        if parent:
            all_tags[PARENT] = self.ids[parent]
        run_id = self.client.create_run(self.experiment_id, start_time=self.clock, tags=all_tags,
                                        run_name=key).info.run_id
        logged = [Metric(k, float(v), self.clock, 0) for k, v in (metrics or {}).items()]
        logged += [Metric(k, v, self.clock + step, step) for k, values in (histories or {}).items()
                   for step, v in enumerate(values)]
        self.client.log_batch(run_id, metrics=logged, params=[Param(k, str(v)) for k, v in (params or {}).items()])
        for path, text in (texts or {}).items():
            self.client.log_text(run_id, text, path)
        self.client.set_terminated(run_id, "FINISHED", end_time=self.clock + 500)
        self.ids[key] = run_id
        return run_id


def _variant_metrics(values: Mapping[str, tuple[float, float | None, float | None]],
                     baseline: Mapping[str, tuple[float, float | None, float | None]] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, (value, low, high) in values.items():
        out[name] = value
        if low is not None and high is not None:
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
        if baseline is not None and name in baseline:
            delta = value - baseline[name][0]
            out.update({f"{name}_delta": delta, f"{name}_delta_ci_low": delta - 0.1,
                        f"{name}_delta_ci_high": delta + 0.1, f"{name}_mcnemar_p": 0.05})
    return out


def _evaluation(w: Writer, key: str, model: str, variants: Mapping[str, Mapping[str, tuple[Any, Any, Any]]],
                layer: int, scale: float, *, params: Mapping[str, Any] | None = None,
                texts: Mapping[str, str] | None = None, parent: str = "") -> None:
    w.run(key, "evaluate", model, params={**(params or {}), "steering.scale": scale}, texts=texts, parent=parent)
    for variant, values in variants.items():
        steered = variant != "baseline"
        w.run(f"{key}/{variant}", "evaluate.variant", model, parent=key, params={"eval.split": "test", **(params or {})},
              tags={"truthsteer.variant": variant, "model": model,
                    **({"truthsteer.layer": str(layer), "truthsteer.scale": str(scale if variant == "caa" else 1.0)}
                       if steered else {})},
              metrics={**_variant_metrics(values, variants.get("baseline") if steered else None), "n_questions": 10})


def _generations() -> str:
    rows = []
    for variant, ((tt, tf, ft, ff), _) in AGREEMENT.items():
        cells: list[tuple[int | None, int]] = [(1, 1), (1, 0), (0, 1), (0, 0), (None, 1)]
        counts = (tt, tf, ft, ff, 1 if variant == "mlp_gen" else 0)
        pairs = [cell for cell, count in zip(cells, counts, strict=True) for _ in range(count)]
        for i, (llm, semantic) in enumerate(pairs):
            rows.append({"qid": f"q{i}", "category": "Law", "variant": variant, "model": GEMMA, "answer": "a",
                         "llm_truthful": llm, "llm_informative": 1, "semantic_acc": semantic})
    return "".join(json.dumps(r) + "\n" for r in rows)


def _per_category_csv() -> str:
    frame = pd.DataFrame(PER_CATEGORY, columns=["variant", "metric", "category", "n", "mean", "delta"])
    return frame.to_csv(index=False)


class AnswerJudge:
    """A fake judge whose verdict is written in the answer: ``t1s0`` is truthful to the LLM judge and
    not to the semantic judge."""

    def __init__(self, name: str, metric_name: str, position: int) -> None:
        self.name, self.metric_name, self.position = name, metric_name, position
        self.metrics = {metric_name: True, f"{name}_invalid_rate": False}

    def score(self, items: Sequence[Any]) -> list[dict[str, Any]]:
        return [{self.metric_name: int(item.answer[self.position])} for item in items]

    def aggregate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        from evaluation.judges import aggregate_judge

        return aggregate_judge(self.name, self.metrics, rows)


def evaluate_with_the_real_writer() -> Any:
    """An evaluate run of REAL as the evaluate stage logs it; its ``EvaluationResult``."""
    from core.config_io import load_config
    from core.tracking import stage_run
    from stages import evaluate

    cfg = load_config(REAL, "eval.n_bootstrap=200")
    rows = {variant: [{"qid": f"q{i}", "question": f"question {i}?", "category": category, "variant": variant,
                       "model": REAL, "answer": answer, "best_answer": "b", "correct_answers": ["b"],
                       "incorrect_answers": ["c"]}
                      for i, (category, answer) in enumerate(zip(REAL_CATEGORIES, answers, strict=True))]
            for variant, answers in REAL_ANSWERS.items()}
    judges = [AnswerJudge("llm", "llm_truthful", 1), AnswerJudge("semantic", "semantic_acc", 3)]
    info: dict[str, dict[str, Any]] = {"baseline": {"model": REAL, "dtype": "float32", "layer": None, "scale": None},
            "caa": {"model": REAL, "dtype": "float32", "layer": 9, "scale": 4.0}}
    with stage_run("evaluate", cfg), contextlib.redirect_stdout(io.StringIO()):
        return evaluate.judge_and_log(cfg, rows, lambda variant: judges, info)


def populate(client: mlflow.MlflowClient) -> dict[str, str]:
    root = Path(client.tracking_uri.removeprefix("sqlite:///")).parent
    w = Writer(client, client.create_experiment(EXPERIMENT, artifact_location=(root / "mlruns").as_uri()))
    gemma = {"model.n_params_b": "2.6"}
    # older gemma evaluations, at other scales of the same layer (the first superseded by the third)
    _evaluation(w, "gemma-old-8a", GEMMA, {"caa": {"llm_truthful": (0.30, 0.20, 0.40)}}, 12, 8.0, params=gemma)
    _evaluation(w, "gemma-old-2", GEMMA, {"baseline": GEMMA_MAIN["baseline"],
                                          "caa": {"llm_truthful": (0.45, 0.35, 0.55)}}, 12, 2.0, params=gemma)
    _evaluation(w, "gemma-old-8", GEMMA, {"caa": {"llm_truthful": (0.50, 0.40, 0.60)}}, 12, 8.0, params=gemma)
    w.run("gemma-train-mc-old", "train", GEMMA, params={**gemma, "mlp.branch": "mc"},
          tags={"truthsteer.branch": "mc"}, histories={"train_loss": [9.0], "val_loss": [9.0]})
    w.run("gemma-full", "full", GEMMA, params=gemma)
    w.run("gemma-train", "train", GEMMA, params={**gemma, "mlp.branch": "both"}, parent="gemma-full")
    for branch, losses in (("mc", MC_LOSS), ("gen", GEN_LOSS)):
        w.run(f"gemma-train-{branch}", "train", GEMMA, params={**gemma, "mlp.branch": branch},
              tags={"truthsteer.branch": branch}, histories=losses, parent="gemma-train")
    _evaluation(w, "gemma-main", GEMMA, GEMMA_MAIN, 12, 4.0, params=gemma, parent="gemma-full",
                texts={artifacts.GENERATIONS: _generations(), artifacts.PER_CATEGORY: _per_category_csv()})
    _evaluation(w, "smol-main", SMOL, SMOL_MAIN, 15, 4.0)
    _evaluation(w, "mystery-main", MYSTERY, MYSTERY_MAIN, 20, 3.0)
    w.run("smol-train-gen", "train", SMOL, params={"mlp.branch": "gen"}, histories={"train_loss": [3.0, 2.0]})
    # two workers of one study; trial 0 has only MLflowCallback's `objective`, the repeat runs in worker 2
    study = {artifacts.TAG_STUDY: GEMMA_STUDY}
    for worker in ("gemma-study", "gemma-study-2"):
        w.run(worker, "tune", GEMMA, params={**gemma, "model.n_layers": "26"},
              tags={artifacts.TAG_OBJECTIVE_METRIC: "mc1", **study})
    for i, (layer, scale, value) in enumerate(GEMMA_TRIALS):  # relative scale: scale / 20
        w.run(f"gemma-trial-{i}", artifacts.TRIAL_STAGE, GEMMA, params={"layer": layer, "scale": scale}, tags=study,
              metrics={artifacts.TRIAL_METRIC if i == 0 else "mc1": value, RELATIVE_SCALE_METRIC: scale / 20},
              parent="gemma-study-2" if i == len(GEMMA_TRIALS) - 1 else "gemma-study")
    w.run("gemma-trial-pruned", artifacts.TRIAL_STAGE, GEMMA, params={"layer": 6, "scale": 1.0}, tags=study,
          metrics={"mc1_partial": 0.1}, parent="gemma-study")
    w.run("smol-study", "tune", SMOL, params={"model.n_layers": "30"},  # no study name
          tags={artifacts.TAG_OBJECTIVE_DIRECTION: "minimize", artifacts.TAG_CONSTRAINT: "kl_neutral<=0.6"})
    for i, (layer, scale, value) in enumerate(SMOL_TRIALS):  # relative scale: scale / 10
        w.run(f"smol-trial-{i}", artifacts.TRIAL_STAGE, SMOL, params={"layer": layer, "scale": scale},
              metrics={"objective": value, "kl_neutral": 0.25 * (i + 1), RELATIVE_SCALE_METRIC: scale / 10},
              parent="smol-study")
    return w.ids


@dataclass(frozen=True)
class Store:
    uri: str
    ids: dict[str, str]
    out: Path  # --out-dir of the analysis
    run: mlflow.entities.Run  # the analyze run
    real: Any  # the EvaluationResult of REAL's evaluation

    def table(self, name: str) -> pd.DataFrame:
        """A table as the analysis wrote it: a figure's CSV (by stem) or a named CSV."""
        path = self.out / (name if name.endswith(".csv") else f"{name}.csv")
        return pd.read_csv(path, keep_default_na=name != artifacts.ANALYSIS_MISSING)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path) -> Iterator[Store]:
    """The synthetic store, analysed once through the entry point (every run of the experiment)."""
    from entrypoints import analyze

    root = tmp_path_factory.mktemp("analysis")
    shutil.copyfile(_migrated_store, root / "mlflow.db")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # what analyze.main sets, undone after
        mlflow.set_tracking_uri(uri)
        ids = populate(mlflow.MlflowClient(uri))
        real = evaluate_with_the_real_writer()
        mp.setattr(sys, "argv", ["analyze", "--experiment", EXPERIMENT, "--out-dir", str(root / "out"),
                                  "--min-category-n", str(MIN_N)])
        analyze.main()
        (run,) = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                                    filter_string=f"tags.`{TAG_STAGE}` = 'analyze'")
        yield Store(uri, ids, root / "out", run, real)


@pytest.fixture
def at_store(store: Store, monkeypatch: pytest.MonkeyPatch) -> Store:
    """Point MLflow at the module's store again (another test's fixture may have moved it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(store.uri)
    return store


def _rows(frame: pd.DataFrame, columns: list[str]) -> list[tuple[Any, ...]]:
    return [tuple(None if isinstance(v, float) and math.isnan(v) else v for v in row)
            for row in frame[columns].itertuples(index=False)]


# ---------------------------------------------------------------- selection


def test_selection_parses_and_writes_filter_strings() -> None:
    selection = Selection.parse("truthsteer", "gemma-2-2b|smollm2-135m", "variant=caa,params.steering.layer=12")
    assert selection.models == ("gemma-2-2b", "smollm2-135m")
    assert selection.filter_strings() == [
        f"attributes.status = 'FINISHED' and tags.`{TAG_STAGE}` IS NOT NULL and tags.`variant` = 'caa' and "
        f"params.`steering.layer` = '12' and tags.`{TAG_MODEL}` = '{m}'" for m in ("gemma-2-2b", "smollm2-135m")]
    with pytest.raises(SelectionError, match=r"tag filter 'variant' has no '='; write key=value"):
        Selection.parse("truthsteer", tags="variant")
    with pytest.raises(SelectionError, match=r"contains a single quote"):
        Selection.parse("truthsteer", models="it's")


def test_selection_by_models_tags_and_parent_run(at_store: Store) -> None:
    ids = at_store.ids
    smol = select_runs(Selection(EXPERIMENT, models=(SMOL,)))
    assert set(smol["run_id"]) == {ids[k] for k in ids if k.startswith("smol")}
    caa = select_runs(Selection.parse(EXPERIMENT, f"{GEMMA}|{MYSTERY}", "truthsteer.variant=caa,truthsteer.layer=12"))
    assert set(caa["run_id"]) == {ids[k] for k in ("gemma-old-8a/caa", "gemma-old-2/caa", "gemma-old-8/caa",
                                                   "gemma-main/caa")}
    below = select_runs(Selection(EXPERIMENT, parent_run=ids["gemma-full"]))  # children and grandchildren
    expected = ["gemma-full", "gemma-train", "gemma-train-mc", "gemma-train-gen", "gemma-main",
                *(f"gemma-main/{v}" for v in GEMMA_MAIN)]
    assert set(below["run_id"]) == {ids[k] for k in expected}
    assert list(below["start_time"]) == sorted(below["start_time"], reverse=True)


def test_no_matching_runs_is_an_error_naming_the_filter(at_store: Store) -> None:
    with pytest.raises(SelectionError, match=r"no runs match experiment 'truthsteer'; status FINISHED; "
                                             r"truthsteer.model in \(gemma-2-9b\).*models: gemma-2-2b, "
                                             r"gemma-3-270m, mystery-model, smollm2-135m"):
        select_runs(Selection(EXPERIMENT, models=("gemma-2-9b",)))
    with pytest.raises(SelectionError, match=r"variant = 'nope'.*filter: .*tags.`variant` = 'nope'"):
        select_runs(Selection.parse(EXPERIMENT, tags="variant=nope"))
    with pytest.raises(SelectionError, match=r"experiment 'nope' is not in the store .*experiments there: .*truthsteer"):
        select_runs(Selection("nope"))
    with pytest.raises(SelectionError, match=r"parent run 'abc' is not in the store"):
        select_runs(Selection(EXPERIMENT, parent_run="abc"))


def test_by_default_the_project_runs_of_every_experiment_are_selected(tracking: str) -> None:
    """`mlflow run . -e full` without --experiment-name logs to Default; `analyze` then still finds its runs."""
    client = mlflow.MlflowClient()
    made = {}
    for name, experiment, tags in (("in-default", "0", {TAG_STAGE: "full"}),
                                   ("in-truthsteer", client.get_experiment_by_name(EXPERIMENT).experiment_id,
                                    {TAG_STAGE: "evaluate"}),
                                   ("not-ours", "0", {})):
        run = client.create_run(experiment, tags=tags, run_name=name)
        client.set_terminated(run.info.run_id, "FINISHED")
        made[name] = run.info.run_id
    assert set(select_runs(Selection())["run_id"]) == {made["in-default"], made["in-truthsteer"]}
    assert set(select_runs(Selection(EXPERIMENT))["run_id"]) == {made["in-truthsteer"]}


def test_an_empty_store_names_the_experiment(tracking: str) -> None:
    mlflow.set_experiment(EXPERIMENT)
    with pytest.raises(SelectionError, match=r"no runs match experiment 'truthsteer'.*holds 0 runs"):
        select_runs(Selection(EXPERIMENT))


# ---------------------------------------------------------------- the tables behind the figures


def test_models_are_ordered_by_size_from_params_then_registry(store: Store) -> None:
    cross = store.table(artifacts.ANALYSIS_CROSS_MODEL)
    truthful = cross[cross["metric"] == "llm_truthful"]
    # sizes: 0.135 from the registry, 0.27 from the config params stage_run logs, 2.6 from a param, unknown
    assert list(dict.fromkeys(zip(truthful["model"], truthful["n_params_b"].fillna(-1), strict=True))) == [
        (SMOL, 0.135), (REAL, 0.27), (GEMMA, 2.6), (MYSTERY, -1)]


def test_cross_model_table_holds_each_variant_with_its_interval(store: Store) -> None:
    cross = store.table(artifacts.ANALYSIS_CROSS_MODEL)
    ids = store.ids
    real = store.real
    assert (real.metrics["baseline"]["llm_truthful"], real.metrics["caa"]["llm_truthful"]) == (0.5, 5 / 6)
    real_values: Values = {v: {"llm_truthful": (m["llm_truthful"], m["llm_truthful_ci_low"], m["llm_truthful_ci_high"])}
                           for v, m in real.metrics.items()}
    ids.update({f"real/{v}": run_id for v, run_id in real.run_ids.items()})
    expected = []
    for metric_name in ("llm_truthful", "llm_informative"):
        for model, values, key in ((SMOL, SMOL_MAIN, "smol-main"), (REAL, real_values, "real"),
                                   (GEMMA, GEMMA_MAIN, "gemma-main"), (MYSTERY, MYSTERY_MAIN, "mystery-main")):
            for variant, metrics in values.items():
                if metric_name in metrics:
                    expected.append((model, variant, metric_name, *metrics[metric_name], ids[f"{key}/{variant}"]))
    assert _rows(cross, ["model", "variant", "metric", "value", "ci_low", "ci_high", "run_id"]) == expected


def test_variant_metrics_table_holds_deltas_against_the_same_evaluation(store: Store) -> None:
    table = store.table(artifacts.ANALYSIS_VARIANT_METRICS)
    gemma = table[(table["model"] == GEMMA) & (table["metric"] == "semantic_acc")]
    assert set(gemma["evaluation"]) == {store.ids["gemma-main"]}
    base = GEMMA_MAIN["baseline"]["semantic_acc"][0]
    assert _rows(gemma, ["variant", "value", "delta", "delta_ci_low", "delta_ci_high", "mcnemar_p"]) == [
        ("baseline", base, None, None, None, None)] + [
        (v, GEMMA_MAIN[v]["semantic_acc"][0], GEMMA_MAIN[v]["semantic_acc"][0] - base,
         GEMMA_MAIN[v]["semantic_acc"][0] - base - 0.1, GEMMA_MAIN[v]["semantic_acc"][0] - base + 0.1, 0.05)
        for v in ("caa", "mlp_mc", "mlp_gen")]
    assert list(dict.fromkeys(table["metric"])) == ["llm_truthful", "semantic_acc", "llm_informative"]


def test_scale_sweep_table_from_evaluations_and_tune_trials(store: Store) -> None:
    sweep = store.table(artifacts.ANALYSIS_SCALE_SWEEP)
    ids = store.ids
    assert _rows(sweep, ["model", "source", "variant", "layer", "scale", "metric", "value", "ci_low", "ci_high",
                         "run_id"]) == [
        (GEMMA, "evaluate", "caa", 12.0, 2.0, "llm_truthful", 0.45, 0.35, 0.55, ids["gemma-old-2/caa"]),
        (GEMMA, "evaluate", "caa", 12.0, 4.0, "llm_truthful", 0.55, 0.45, 0.65, ids["gemma-main/caa"]),
        (GEMMA, "evaluate", "caa", 12.0, 8.0, "llm_truthful", 0.50, 0.40, 0.60, ids["gemma-old-8/caa"]),
        (GEMMA, "evaluate", "baseline", None, None, "llm_truthful", 0.40, 0.30, 0.50, ids["gemma-main/baseline"]),
        (GEMMA, "tune", "caa", 12.0, 2.0, "mc1", 0.42, None, None, ids["gemma-trial-6"]),  # the later repeat
        (GEMMA, "tune", "caa", 12.0, 4.0, "mc1", 0.48, None, None, ids["gemma-trial-4"]),
        (GEMMA, "tune", "caa", 12.0, 8.0, "mc1", 0.44, None, None, ids["gemma-trial-5"]),
        (SMOL, "tune", "caa", 3.0, 1.0, "objective", 0.9, None, None, ids["smol-trial-0"]),  # minimized: layer 3
        (SMOL, "tune", "caa", 3.0, 2.0, "objective", 0.7, None, None, ids["smol-trial-1"]),
    ]
    costs = dict(zip(sweep["run_id"], sweep["kl_neutral"], strict=True))  # measured by the smol trials only
    assert (costs[ids["smol-trial-0"]], costs[ids["smol-trial-1"]]) == (0.25, 0.5)
    assert all(math.isnan(c) for r, c in costs.items() if r not in (ids["smol-trial-0"], ids["smol-trial-1"]))


def test_the_relative_scale_table_puts_every_model_on_one_axis(store: Store) -> None:
    ids = store.ids
    table = store.table(artifacts.ANALYSIS_RELATIVE_SCALE)
    assert _rows(table, ["model", "n_layers", "source", "variant", "layer", "depth", "relative_scale", "scale",
                         "metric", "value", "run_id"]) == [
        (GEMMA, 26, "tune", "caa", 12.0, 12 / 26, 0.1, 2.0, "mc1", 0.42, ids["gemma-trial-6"]),
        (GEMMA, 26, "tune", "caa", 12.0, 12 / 26, 0.2, 4.0, "mc1", 0.48, ids["gemma-trial-4"]),
        (GEMMA, 26, "tune", "caa", 12.0, 12 / 26, 0.4, 8.0, "mc1", 0.44, ids["gemma-trial-5"]),
        (SMOL, 30, "tune", "caa", 3.0, 0.1, 0.1, 1.0, "objective", 0.9, ids["smol-trial-0"]),
        (SMOL, 30, "tune", "caa", 3.0, 0.1, 0.2, 2.0, "objective", 0.7, ids["smol-trial-1"]),
    ]  # evaluations without steering_scale_relative are left out


def test_layer_scale_table_averages_repeated_trials(store: Store) -> None:
    heat = store.table(artifacts.ANALYSIS_LAYER_SCALE)
    rows = _rows(heat, ["model", "study", "metric", "layer", "scale", "value", "n_trials"])
    gemma, smol = GEMMA_STUDY, store.ids["smol-study"]  # pooled over both workers; a study without a name
    assert rows == [
        (GEMMA, gemma, "mc1", 6, 2.0, 0.30, 1), (GEMMA, gemma, "mc1", 6, 4.0, 0.35, 1),
        (GEMMA, gemma, "mc1", 6, 8.0, 0.32, 1), (GEMMA, gemma, "mc1", 12, 2.0, pytest.approx(0.41, abs=1e-15), 2),
        (GEMMA, gemma, "mc1", 12, 4.0, 0.48, 1), (GEMMA, gemma, "mc1", 12, 8.0, 0.44, 1),
        (SMOL, smol, "objective", 3, 1.0, 0.9, 1), (SMOL, smol, "objective", 3, 2.0, 0.7, 1),
        (SMOL, smol, "objective", 5, 1.0, 0.95, 1),
    ]


def test_best_settings_per_model_from_tune_and_evaluate(store: Store) -> None:
    best = store.table(artifacts.ANALYSIS_BEST_SETTINGS)
    ids = store.ids
    assert _rows(best, ["model", "source", "run_id", "variant", "layer", "scale", "metric", "value"]) == [
        (SMOL, "evaluate", ids["smol-main/caa"], "caa", 15.0, 4.0, "llm_truthful", 0.30),
        (SMOL, f"tune {ids['smol-study']}", ids["smol-trial-1"], "caa", 3.0, 2.0, "objective", 0.7),
        (REAL, "evaluate", store.real.run_ids["caa"], "caa", 9.0, 4.0, "llm_truthful", 5 / 6),
        (GEMMA, "evaluate", ids["gemma-main/caa"], "caa", 12.0, 4.0, "llm_truthful", 0.55),
        (GEMMA, f"tune {GEMMA_STUDY}", ids["gemma-trial-4"], "caa", 12.0, 4.0, "mc1", 0.48),
        (MYSTERY, "evaluate", ids["mystery-main/caa"], "caa", 20.0, 3.0, "llm_truthful", 0.62),
    ]


def test_judge_agreement_counts_and_kappa(store: Store) -> None:
    agreement = store.table(artifacts.ANALYSIS_JUDGE_AGREEMENT)
    assert list(agreement["model"]) == [REAL] * 2 + [GEMMA] * 4
    for row in agreement.to_dict("records"):
        counts, kappa = (REAL_AGREEMENT if row["model"] == REAL else AGREEMENT)[row["variant"]]
        assert (row["both_true"], row["llm_only"], row["semantic_only"], row["both_false"]) == counts
        assert row["n"] == sum(counts)
        assert row["agreement"] == pytest.approx((counts[0] + counts[3]) / sum(counts), abs=1e-15)
        assert row["kappa"] == pytest.approx(kappa, abs=1e-12)
        assert (row["llm_metric"], row["semantic_metric"]) == ("llm_truthful", "semantic_acc")


def test_cohen_kappa_against_hand_values_and_sklearn() -> None:
    assert agreement.cohen_kappa(3, 2, 1, 4) == pytest.approx(0.4, abs=1e-15)
    assert agreement.cohen_kappa(20, 5, 10, 15) == pytest.approx(0.4, abs=1e-15)  # p_o 0.7, p_e 0.25 + 0.25
    assert math.isnan(agreement.cohen_kappa(0, 0, 0, 0))
    assert math.isnan(agreement.cohen_kappa(5, 0, 0, 0))  # both raters constant: undefined
    metrics = pytest.importorskip("sklearn.metrics")
    for (tt, tf, ft, ff), _ in AGREEMENT.values():
        first = [1] * (tt + tf) + [0] * (ft + ff)
        second = [1] * tt + [0] * tf + [1] * ft + [0] * ff
        assert agreement.cohen_kappa(tt, tf, ft, ff) == pytest.approx(metrics.cohen_kappa_score(first, second), abs=1e-12)


def test_category_deltas_of_every_steered_variant_without_a_val_evaluation(store: Store) -> None:
    table = store.table(artifacts.ANALYSIS_CATEGORY_DELTA)
    real = table[table["model"] == REAL]  # from the per-category table the evaluate stage wrote
    kept = [row for row in REAL_CATEGORY_DELTA if row[1] >= MIN_N]
    assert _rows(real, ["variant", "metric", "category", "n"]) == [("caa", "llm_truthful", c, n) for c, n, _, _ in kept]
    assert list(real["mean"]) == pytest.approx([m for _, _, m, _ in kept], abs=1e-15)
    assert list(real["delta"]) == pytest.approx([d for _, _, _, d in kept], abs=1e-15)
    # Health: caa answers t1,t1,t0 against baseline's t0,t1,t0: per-question differences 1, 0, 0. Every paired
    # resample of three questions averages to 0, 1/3, 2/3 or 1, and the 95% interval spans [0, 2/3] or more
    assert real["delta_ci_low"].iloc[0] == pytest.approx(0.0) and real["delta_ci_high"].iloc[0] >= 2 / 3 - 1e-12
    # gemma's evaluation predates the intervals: no bars, said in the missing list; no val evaluation: both
    # steered variants that have rows, and the categories under MIN_N questions left out
    assert _rows(table[table["model"] == GEMMA], ["model", "variant", "metric", "category", "n", "mean", "delta"]) == [
        (GEMMA, "caa", "llm_truthful", "Health", 10, 0.4, 0.1),
        (GEMMA, "caa", "llm_truthful", "Law", 4, 0.75, -0.25),
        (GEMMA, "caa", "llm_truthful", "Misconceptions", 6, 0.5, 1 / 6),
        (GEMMA, "mlp_mc", "llm_truthful", "Law", 4, 0.5, -0.5),
    ]
    assert set(table["chosen_on"]) == {"every steered variant (no evaluation on val to choose one)"}
    missing = _rows(store.table(artifacts.ANALYSIS_MISSING), ["model", "what"])
    assert (REAL, f"caa: 2 of 3 categories have fewer than {MIN_N} questions and are not drawn (Law, Misc)") in missing
    assert any(m == GEMMA and w.startswith("per-category table without intervals") for m, w in missing)


def test_the_per_category_variant_is_chosen_on_val_and_drawn_on_test() -> None:
    def runs(evaluation: str, split: str, start: int, values: Mapping[str, float]) -> list[dict[str, Any]]:
        return [{"run_id": f"{evaluation}-{v}", "model": "m", "variant": v, "evaluation": evaluation, "split": split,
                 "layer": 1.0, "scale": 1.0, "start_time": start, "metrics.mc2": value, "metrics.mc2_ci_low": 0.0,
                 "metrics.mc2_ci_high": 1.0, "metrics.n_questions": 20.0} for v, value in values.items()]
    val = runs("v", "val", 1, {"baseline": 0.3, "caa": 0.4, "mlp_mc": 0.6})  # mlp_mc is best on val ...
    test = runs("t", "test", 2, {"baseline": 0.3, "caa": 0.7, "mlp_mc": 0.5})  # ... caa on test: not chosen
    variants = pd.DataFrame(val + test)
    evaluations = tables.latest_evaluations(variants)
    assert evaluations == {"m": "t"}  # the val evaluation chooses; the later test one is reported
    assert tables.latest_evaluations(variants, validation=True) == {"m": "v"}
    assert set(tables.reported(variants)["evaluation"]) == {"t"}  # the sweep and best settings read test only
    assert set(tables.reported(variants[variants["split"] == "val"])["evaluation"]) == {"v"}  # val alone: kept
    missing = Missing()
    assert categories.chosen_variants(variants, evaluations, "mc2", True, missing) == {
        "m": (["mlp_mc"], "chosen as best mc2 on val (evaluation v, n=20)")}
    assert not len(missing)
    only_test = variants[variants["split"] == "test"]
    assert categories.chosen_variants(only_test, evaluations, "mc2", True, missing) == {
        "m": (["caa", "mlp_mc"], "every steered variant (no evaluation on val to choose one)")}
    assert len(missing) == 1


def test_training_curves_take_the_latest_run_per_branch(store: Store) -> None:
    curves = store.table(artifacts.ANALYSIS_TRAINING_CURVES)
    ids = store.ids
    expected = [(GEMMA, branch, ids[f"gemma-train-{branch}"], name, step, value)
                for branch, losses in (("gen", GEN_LOSS), ("mc", MC_LOSS))
                for name in ("train_loss", "val_loss") for step, value in enumerate(losses[name])]
    expected += [(SMOL, "gen", ids["smol-train-gen"], "train_loss", 0, 3.0), (SMOL, "gen", ids["smol-train-gen"],
                                                                            "train_loss", 1, 2.0)]
    assert _rows(curves, ["model", "branch", "run_id", "metric", "step", "value"]) == expected


# ---------------------------------------------------------------- files, report, missing


def test_every_figure_is_written_as_png_pdf_and_csv_and_is_not_blank(store: Store) -> None:
    for spec in frames.FIGURES:
        for ext in (".png", ".pdf", ".csv"):
            assert (store.out / f"{spec.stem}{ext}").stat().st_size > 0, f"{spec.stem}{ext}"
        assert (store.out / f"{spec.stem}.pdf").read_bytes().startswith(b"%PDF")
        pixels = matplotlib.image.imread(store.out / f"{spec.stem}.png")
        assert pixels.std() > 0, f"{spec.stem}.png is blank"
        assert max(pixels.shape[:2]) > 900  # 300 dpi


def test_missing_pieces_are_listed_not_raised(store: Store) -> None:
    missing = _rows(store.table(artifacts.ANALYSIS_MISSING), ["model", "run_id", "what"])
    ids = store.ids
    for item in [
        (MYSTERY, "", "size unknown (no param model.n_params_b, no configs/models/mystery-model.yaml): ordered last"),
        (SMOL, ids["smol-main/caa"], "caa: no interval for semantic_acc"),
        (SMOL, ids["smol-main"], f"no metric llm_informative in any variant of evaluation {ids['smol-main']}"),
        (GEMMA, ids["gemma-trial-pruned"], "tune trial without metric mc1 (pruned or failed?): left out"),
        (SMOL, ids["smol-main"], f"no artifact {artifacts.GENERATIONS}: no judge agreement"),
        (SMOL, ids["smol-main"], f"no artifact {artifacts.PER_CATEGORY}: no per-category figure"),
        (GEMMA, "", "mlp_gen: 1 of 10 answers lack a verdict of llm_truthful or semantic_acc: left out of the "
                    "agreement"),
        (SMOL, ids["smol-train-gen"], "train run (gen) has no val_loss history"),
    ]:
        assert item in missing, item
    text = (store.out / artifacts.ANALYSIS_REPORT).read_text()
    assert "## Missing" in text and "caa: no interval for semantic_acc" in text


def test_report_embeds_figures_and_tables(store: Store) -> None:
    text = (store.out / artifacts.ANALYSIS_REPORT).read_text()
    for spec in frames.FIGURES:
        assert f"![{spec.title}]({spec.stem}.png)" in text
        assert f"[{spec.stem}.csv]({spec.stem}.csv)" in text
    assert "| caa | 0.550 [0.450, 0.650] | 0.500 [0.400, 0.600] | 0.850 [0.750, 0.930] |" in text
    assert "## Best layer and scale per model" in text


def test_the_html_report_embeds_every_figure_and_links_nowhere(store: Store) -> None:
    """MLflow's artifact viewer shows report.html with its images: each figure's PNG bytes are in the page,
    and no link points at a file the viewer cannot follow."""
    import base64
    import re

    page = (store.out / "report.html").read_text()
    embedded = [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert embedded == [(store.out / f"{spec.stem}.png").read_bytes() for spec in frames.FIGURES]
    assert re.findall(r'href="(?![a-z]+://)', page) == [] and 'src="' not in page.replace('src="data:', "")
    assert f"(<code>{frames.FIGURES[0].stem}.csv</code>)" in page
    assert re.search(r"<td>caa</td>\s*<td>0.550 \[0.450, 0.650\]</td>", page)  # the tables render as tables


def test_the_analyze_run_logs_every_file_and_is_never_analysed(at_store: Store) -> None:
    run = at_store.run
    assert run.info.status == "FINISHED"
    assert run.data.params == {"selection.experiment": EXPERIMENT, "selection.models": "", "selection.tags": "",
                               "selection.parent_run": "", "analysis.min_category_n": str(MIN_N)}
    assert run.data.metrics["n_figures"] == len(frames.FIGURES)
    logged = {Path(f.path).name for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, artifacts.ANALYSIS_DIR)}
    assert logged == {p.name for p in at_store.out.iterdir()}
    assert (at_store.out / artifacts.ANALYSIS_REPORT).read_text() == mlflow.artifacts.load_text(
        f"runs:/{run.info.run_id}/{artifacts.ANALYSIS_DIR}/{artifacts.ANALYSIS_REPORT}")
    assert run.info.run_id not in set(select_runs(Selection(EXPERIMENT))["run_id"])


def test_entry_point_dry_run_lists_runs_and_figures(at_store: Store, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from entrypoints import analyze

    monkeypatch.setattr(sys, "argv", ["analyze", "--models", SMOL, "--out-dir", str(tmp_path), "--dry-run"])
    analyze.main()
    out = capsys.readouterr().out
    assert at_store.ids["smol-trial-2"] in out and at_store.ids["gemma-main"] not in out
    assert f"{artifacts.ANALYSIS_LAYER_SCALE}: would draw from 3 cells" in out
    assert f"{artifacts.ANALYSIS_TRAINING_CURVES}: would draw from 1 train runs' loss histories" in out
    assert f"{artifacts.ANALYSIS_CATEGORY_DELTA}: would skip" in out
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- in memory, with a fake store


@dataclass
class FakeReader:
    histories: dict[tuple[str, str], list[tuple[int, float]]]
    texts: dict[tuple[str, str], str]

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return self.histories.get((run_id, key), [])

    def artifact_text(self, run_id: str, path: str) -> str | None:
        return self.texts.get((run_id, path))

    def run_tags(self, run_id: str) -> dict[str, str]:
        return {}

    def has_artifact(self, run_id: str, path: str) -> bool:
        return (run_id, path) in self.texts


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(records)


def test_analyze_in_memory_with_a_fake_reader(tmp_path: Path) -> None:
    t = pd.Timestamp("2025-01-01", tz="UTC")
    base = {"tags.truthsteer.model": "m", "params.model.n_params_b": "1.5"}
    runs = _frame([
        {**base, "run_id": "e", "start_time": t, "tags.truthsteer.stage": "evaluate"},
        {**base, "run_id": "b", "start_time": t, "tags.truthsteer.stage": "evaluate.variant", "tags.variant": "baseline",
         f"tags.{PARENT}": "e", "tags.layer": "None", "tags.scale": "None", "metrics.semantic_acc": 0.5,
         "metrics.semantic_acc_ci_low": 0.4, "metrics.semantic_acc_ci_high": 0.6},
        {**base, "run_id": "c", "start_time": t, "tags.truthsteer.stage": "evaluate.variant", "tags.variant": "caa",
         f"tags.{PARENT}": "e", "tags.layer": "3", "tags.scale": "2.0", "metrics.semantic_acc": 0.7,
         "metrics.semantic_acc_delta": 0.2, "metrics.semantic_acc_ci_low": 0.6, "metrics.semantic_acc_ci_high": 0.8},
        {**base, "run_id": "t", "start_time": t, "tags.truthsteer.stage": "train", "tags.truthsteer.branch": "mc",
         "metrics.train_loss": 0.5},
    ])
    generations = "".join(json.dumps({"variant": "caa", "llm_logprob_truthful": a, "semantic_acc": b}) + "\n"
                          for a, b in ((1, 1), (1, 0), (0, 0), (0, 0)))
    reader = FakeReader(histories={("t", "train_loss"): [(1, 0.5), (0, 1.0)], ("t", "val_loss"): [(0, 2.0)]},
                        texts={("e", artifacts.GENERATIONS): generations})
    result = report.analyze(runs, tmp_path, reader=reader, directions={"semantic_acc": True})
    assert result.metric == "semantic_acc"
    assert _rows(result.tables[artifacts.ANALYSIS_TRAINING_CURVES], ["branch", "metric", "step", "value"]) == [
        ("mc", "train_loss", 0, 1.0), ("mc", "train_loss", 1, 0.5), ("mc", "val_loss", 0, 2.0)]
    agreement = result.tables[artifacts.ANALYSIS_JUDGE_AGREEMENT]
    assert _rows(agreement, ["variant", "llm_metric", "n", "both_true", "llm_only", "semantic_only", "both_false",
                             "kappa"]) == [("caa", "llm_logprob_truthful", 4, 1, 1, 0, 2, 0.5)]
    assert artifacts.ANALYSIS_LAYER_SCALE not in result.drawn
    assert ("", "", f"figure {artifacts.ANALYSIS_LAYER_SCALE} not drawn: it needs tune studies with trials") in _rows(
        result.missing, ["model", "run_id", "what"])
    assert ("m", "e", f"no artifact {artifacts.PER_CATEGORY}: no per-category figure") in _rows(
        result.missing, ["model", "run_id", "what"])


def test_the_pareto_table_marks_the_trials_no_other_trial_beats_on_gain_and_cost(store: Store) -> None:
    table = store.table(f"{artifacts.ANALYSIS_PARETO}.csv")
    rows = sorted(zip(table["run_id"], table["value"], table["cost"], table["on_front"], strict=True))
    ids = store.ids
    # smol's study minimises its objective; kl_neutral 0.25, 0.5, 0.75 for trials 0, 1, 2
    values = {r: v for r, v, _, _ in rows}
    for run, value, cost, front in rows:
        beaten = any(v <= value and c <= cost and (v, c) != (value, cost) for _, v, c, _ in rows)
        assert front == (not beaten), (run, value, cost)
    assert set(table["run_id"]) == {ids[f"smol-trial-{i}"] for i in range(len(SMOL_TRIALS))}
    assert values[ids["smol-trial-0"]] == SMOL_TRIALS[0][2]
    assert set(table["bound"]) == {0.6}  # the study's constraint, drawn as a dashed line
    assert sweeps.on_front([1.0, 2.0, 2.0, 0.5], [1.0, 1.0, 3.0, 0.1], True) == [False, True, False, True]


def test_layer_scale_table_bins_continuous_scales() -> None:
    scales = [0.5 * i for i in range(20)]  # 20 distinct scales from 0 to 9.5
    trials = pd.DataFrame({"model": "m", "study": "s", "run_id": [f"r{i}" for i in range(20)], "variant": "caa",
                           "layer": 4.0, "scale": scales, "metric": "objective", "value": [float(i) for i in range(20)],
                           "ci_low": math.nan, "ci_high": math.nan, "higher_is_better": True, "start_time": None})
    heat = sweeps.layer_scale_table(trials)
    assert len(heat) == sweeps.SCALE_BINS
    assert list(heat["n_trials"]) == [2] * 10
    assert list(heat["value"]) == [0.5 + 2 * i for i in range(10)]  # the mean of each pair


def test_missing_collects_each_item_once() -> None:
    missing = Missing()
    missing.add("x", model="m")
    missing.add("x", model="m")
    missing.add("y", run_id="r")
    assert _rows(missing.frame(), ["model", "run_id", "what"]) == [("m", "", "x"), ("", "r", "y")]
    assert pd.read_csv(io.StringIO(missing.frame().to_csv(index=False))).shape == (2, 3)


def test_the_report_shows_the_latest_calibration_next_to_the_variant_metrics(tmp_path: Path) -> None:
    t = pd.Timestamp("2025-01-01", tz="UTC")
    runs = _frame([
        {"run_id": "old", "start_time": t, "tags.truthsteer.stage": "calibrate"},
        {"run_id": "new", "start_time": t + pd.Timedelta(hours=1), "tags.truthsteer.stage": "calibrate"},
    ])
    table = "| judge | label |\n| --- | --- |\n| judge | truth |\n"
    reader = FakeReader(histories={}, texts={("new", artifacts.CALIBRATION_MARKDOWN): table,
                                             ("old", artifacts.CALIBRATION_MARKDOWN): "stale"})
    result = report.analyze(runs, tmp_path, reader=reader, directions={})
    text = result.report.read_text()
    assert "## The judges' agreement with people" in text and "Calibrate run `new`" in text and table in text
    assert "stale" not in text
    assert text.index("## Variant metrics") < text.index("## The judges' agreement") < text.index("## Best layer")
    without = report.analyze(runs.iloc[:0], tmp_path / "none", reader=reader, directions={})
    assert "(no calibrate run selected)" in without.report.read_text()


def test_the_kappa_interval_against_resampled_answers_scored_by_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    tt, tf, ft, ff = 30, 8, 12, 50
    first = np.array([1] * (tt + tf) + [0] * (ft + ff))
    second = np.array([1] * tt + [0] * tf + [1] * ft + [0] * ff)
    rng = np.random.default_rng(11)
    draws = [rng.integers(0, first.size, first.size) for _ in range(2000)]
    oracle = np.quantile([metrics.cohen_kappa_score(first[i], second[i]) for i in draws], [0.025, 0.975])
    low, high = agreement.kappa_interval(tt, tf, ft, ff)
    assert (low, high) == pytest.approx(tuple(oracle), abs=0.03)
    assert low < agreement.cohen_kappa(tt, tf, ft, ff) < high
    assert all(math.isnan(v) for v in agreement.kappa_interval(0, 0, 0, 0))


SNAKE = re.compile(r"\b[a-z0-9]+(?:_[a-z0-9]+)+\b")  # a raw metric or column key, e.g. llm_truthful


def test_every_figure_has_a_title_worded_axes_n_and_intervals(at_store: Store, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: dict[str, Figure] = {}
    real_save = figures.save_figure

    def keep(fig: Figure, table: pd.DataFrame, out_dir: Path, stem: str) -> list[Path]:
        drawn[stem] = fig
        return real_save(fig, table, out_dir, stem)

    monkeypatch.setattr(figures, "save_figure", keep)
    report.analyze(select_runs(Selection.parse(EXPERIMENT)), tmp_path, min_category_n=MIN_N)
    assert set(drawn) == {spec.stem for spec in frames.FIGURES}
    for stem, fig in drawn.items():
        every = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
        twins = [ax for i, ax in enumerate(every) if any(ax.get_position().bounds == other.get_position().bounds
                                                       for other in every[:i])]  # a second y axis on a panel
        axes = [ax for ax in every if ax not in twins]
        texts = [fig.get_suptitle(), *(ax.get_title() for ax in axes)]
        assert all(ax.get_title() for ax in axes), f"{stem}: a panel without a title"
        for ax in axes:  # a y label on every panel, or on the first of its row where the row shares it
            row = [o for o in axes if o.get_position().y0 == ax.get_position().y0]
            assert ax.get_xlabel() and any(o.get_ylabel() for o in row), f"{stem}: a panel without axis labels"
        for ax in every:
            for label in (ax.get_xlabel(), ax.get_ylabel()):
                assert not SNAKE.findall(label), f"{stem}: axis label {label!r} is not in words"
        assert any(re.search(r"n=\d+|\d+ trials|run [0-9a-f]{8}", t) for t in texts), f"{stem}: no n in {texts}"
    # intervals: error bars or bands wherever an estimate is drawn
    for stem in (artifacts.ANALYSIS_CROSS_MODEL, artifacts.ANALYSIS_CATEGORY_DELTA):
        assert any(c.__class__.__name__ == "LineCollection" for ax in drawn[stem].axes for c in ax.collections), stem
    assert any(c.__class__.__name__ in ("PolyCollection", "FillBetweenPolyCollection")
               for ax in drawn[artifacts.ANALYSIS_SCALE_SWEEP].axes for c in ax.collections)
    assert all("[" in ax.get_title() for ax in drawn[artifacts.ANALYSIS_JUDGE_AGREEMENT].axes
               if ax.get_visible() and ax.get_label() != "<colorbar>")  # kappa with its interval
    # one metric per axis: a panel per model and metric of the scale sweep (gemma: its evaluations' llm_truthful
    # and its study's mc1; smollm2: its study's objective)
    sweep = pd.read_csv(tmp_path / f"{artifacts.ANALYSIS_SCALE_SWEEP}.csv")
    pairs = len(sweep[["model", "metric"]].drop_duplicates())
    assert pairs == 3 and sum(ax.get_title() != "" for ax in drawn[artifacts.ANALYSIS_SCALE_SWEEP].axes) == pairs
    # one axis per loss: gemma's two branches on two panels, each naming its loss
    curves = [ax.get_ylabel() for ax in drawn[artifacts.ANALYSIS_TRAINING_CURVES].axes if ax.get_visible()]
    assert "MC hinge loss" in curves and "generation NLL (nats/token)" in curves


def test_docs_figures_are_redrawn_from_the_named_runs_and_say_which(at_store: Store, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from analysis import docs_figures

    plan = tmp_path / "figures.yaml"
    plan.write_text(f"figures:\n  - file: curves.png\n    figure: {artifacts.ANALYSIS_TRAINING_CURVES}\n"
                    f"    runs: [{at_store.ids['gemma-full']}]\n    what: gemma's MLP training\n", encoding="utf-8")
    assert docs_figures.main(["--store", at_store.uri, "--plan", str(plan)]) == 0
    assert matplotlib.image.imread(tmp_path / "curves.png").std() > 0
    sources = (tmp_path / "SOURCES.md").read_text()
    # gemma-full and its descendants: the train run, its two branches and the evaluation with its four variants
    assert f"| [curves.png](curves.png) | `training_curves` | gemma's MLP training | `{at_store.ids['gemma-full']}` " \
           "(9 runs in all) | not recorded |" in sources
    # --only: one file redrawn, the other rows kept, what drew it noted below the table
    sources_path = tmp_path / "SOURCES.md"
    sources_path.write_text(sources.replace("(9 runs in all)", "(kept row)"))
    plan.write_text(plan.read_text() + f"  - file: again.png\n    figure: {artifacts.ANALYSIS_TRAINING_CURVES}\n"
                    f"    runs: [{at_store.ids['gemma-full']}]\n")
    assert docs_figures.main(["--store", at_store.uri, "--plan", str(plan), "--only", "again.png"]) == 0
    lines = sources_path.read_text().splitlines()
    assert any(line.startswith("| [curves.png](curves.png)") and "(kept row)" in line for line in lines)
    (row,) = [i for i, line in enumerate(lines) if line.startswith("| [again.png](again.png)")]
    assert "(9 runs in all)" in lines[row] and lines[row + 1] == "" and lines[row + 2].startswith(
        "`again.png` was redrawn alone (`--only`), at commit")
    assert docs_figures.main(["--store", at_store.uri, "--plan", str(plan), "--only", "nope.png"]) == 1
    assert "--only nope.png: not in" in capsys.readouterr().err
    plan.write_text("figures:\n  - {file: x.png, figure: cross_model, runs: [0123456789abcdef0123456789abcdef]}\n")
    assert docs_figures.main(["--store", at_store.uri, "--plan", str(plan)]) == 1
    assert "error: run 0123456789abcdef0123456789abcdef is not in the store" in capsys.readouterr().err
    plan.write_text("figures:\n  - {file: x.png, figure: no_such_figure, runs: [r]}\n")
    assert docs_figures.main(["--store", at_store.uri, "--plan", str(plan)]) == 1
