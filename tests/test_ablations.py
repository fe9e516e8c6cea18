"""The sweep ablations of ``analyze``: the runs of a sweep by knob, the mean and spread over seeds, the four figures'
tables against hand-computed values, their files and report section, and what is recorded when a sweep (or any
sweep run) is not there.

A module-scoped sqlite store holds one sweep (``smoke``) of known values, logged as ``stages.sweep`` tags them:
each variant run carries only the knobs its result depends on (baseline none, CAA scale and layer, the MLP arms
all five, ITI the seed). The MLP ``mc`` arm and ITI ran two seeds at the reference point; one CAA cell ran twice
(the later run must count) and a third time, KILLED (never counted); one CAA run outside the sweep must not count.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.image
import mlflow
import pandas as pd
import pytest
from mlflow.entities import Metric, Param

from analysis import ablations, report
from analysis.frames import MlflowReader
from analysis.runs import Missing, Selection, select_runs
from core.artifacts import TAG_MODEL, TAG_PARENT, TAG_STAGE, TAG_SWEEP_NAME, TAG_VARIANT, sweep_tag

EXPERIMENT = "truthsteer"
MODEL, SWEEP = "gemma-2-2b", "smoke"
T0 = 1_700_000_000_000
REFERENCE = {"branch": None, "layer": 15, "mlp_expansion": 2, "scale": 4.0, "seed": 0}  # as stages.sweep writes it
KNOBS = ("scale", "layer", "mlp_expansion", "branch", "seed")
DEPENDS = {"baseline": (), "caa": ("scale", "layer"), "mlp_mc": KNOBS, "mlp_gen": KNOBS, "iti": ("seed",)}
# key, variant, (scale, layer, mlp_expansion, branch, seed) (None: the variant does not depend on it), mc1
RUNS: list[tuple[str, str, tuple[Any, ...], float]] = [
    ("base", "baseline", (None, None, None, None, None), 0.20),
    ("caa-4-15", "caa", (4, 15, None, None, None), 0.40),
    ("caa-2-15-old", "caa", (2, 15, None, None, None), 0.30),  # the same cell again below: this one is older
    ("caa-2-15", "caa", (2, 15, None, None, None), 0.35),
    ("caa-8-15", "caa", (8, 15, None, None, None), 0.45),
    ("caa-4-10", "caa", (4, 10, None, None, None), 0.25),
    ("mc-ref-s0", "mlp_mc", (4, 15, 2, "mc", 0), 0.50),
    ("mc-ref-s1", "mlp_mc", (4, 15, 2, "mc", 1), 0.60),
    ("mc-scale-2", "mlp_mc", (2, 15, 2, "mc", 0), 0.42),
    ("mc-scale-8", "mlp_mc", (8, 15, 2, "mc", 0), 0.58),
    ("mc-layer-10", "mlp_mc", (4, 10, 2, "mc", 0), 0.38),
    ("mc-x4", "mlp_mc", (4, 15, 4, "mc", 0), 0.54),
    ("gen-ref", "mlp_gen", (4, 15, 2, "gen", 0), 0.44),
    ("gen-x4", "mlp_gen", (4, 15, 4, "gen", 0), 0.48),
    ("iti-s0", "iti", (None, None, None, None, 0), 0.30),  # ITI logs no judge_truthful_informative here
    ("iti-s1", "iti", (None, None, None, None, 1), 0.36),
]
KILLED = ("caa-2-15-killed", "caa", (2, 15, None, None, None), 0.99)  # the latest of its cell, but KILLED
N_QUESTIONS = 20


def interval(value: float) -> tuple[float, float]:
    """Every run's interval around its value: asymmetric, so that a swapped bound shows."""
    return value - 0.1, value + 0.05


def jti(value: float) -> float:
    """Every run's judge_truthful_informative: half its mc1."""
    return value / 2


@dataclass
class Writer:
    client: mlflow.MlflowClient
    experiment_id: str
    clock: int = T0
    ids: dict[str, str] = field(default_factory=dict)

    def run(self, key: str, tags: Mapping[str, str], metrics: Mapping[str, float] | None = None,
            status: str = "FINISHED") -> str:
        self.clock += 1000
        run_id = self.client.create_run(self.experiment_id, start_time=self.clock, tags=dict(tags),
                                        run_name=key).info.run_id
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), self.clock, 0) for k, v in (metrics or {}).items()],
                              params=[Param("eval.split", "test")])
        self.client.set_terminated(run_id, status, end_time=self.clock + 500)
        self.ids[key] = run_id
        return run_id


def _metrics(mc1: float, variant: str) -> dict[str, float]:
    low, high = interval(mc1)
    out = {"mc1": mc1, "mc1_ci_low": low, "mc1_ci_high": high, "n_questions": N_QUESTIONS}
    if variant != "iti":
        j_low, j_high = interval(jti(mc1))
        out |= {"judge_truthful_informative": jti(mc1), "judge_truthful_informative_ci_low": j_low,
                "judge_truthful_informative_ci_high": j_high}
    return out


def _knob_tags(variant: str, knobs: tuple[Any, ...]) -> dict[str, str]:
    values = dict(zip(KNOBS, knobs, strict=True))
    assert all((values[k] is not None) == (k in DEPENDS[variant]) for k in KNOBS), (variant, knobs)
    return {sweep_tag(k): str(values[k]) for k in DEPENDS[variant]}


def populate(client: mlflow.MlflowClient) -> dict[str, str]:
    w = Writer(client, client.create_experiment(EXPERIMENT))
    common = {TAG_MODEL: MODEL, TAG_SWEEP_NAME: SWEEP, sweep_tag("reference"): json.dumps(REFERENCE, sort_keys=True)}
    for key, variant, knobs, mc1 in [*RUNS, KILLED]:
        parent = w.run(f"{key}/evaluate", {TAG_STAGE: "evaluate", **common})
        w.run(key, {TAG_STAGE: "evaluate.variant", TAG_VARIANT: variant, TAG_PARENT: parent, **common,
                    **_knob_tags(variant, knobs)}, _metrics(mc1, variant),
              status="KILLED" if key == KILLED[0] else "FINISHED")
    parent = w.run("plain/evaluate", {TAG_STAGE: "evaluate", TAG_MODEL: MODEL})  # an evaluation outside the sweep
    w.run("plain", {TAG_STAGE: "evaluate.variant", TAG_VARIANT: "caa", TAG_PARENT: parent, TAG_MODEL: MODEL},
          _metrics(0.77, "caa"))
    return w.ids


@dataclass(frozen=True)
class Store:
    ids: dict[str, str]
    runs: pd.DataFrame
    out: Path
    result: report.Analysis
    plan: list[str]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("ablations")
    shutil.copyfile(_migrated_store, root / "mlflow.db")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        ids = populate(mlflow.MlflowClient(uri))
        runs = select_runs(Selection(EXPERIMENT))
        reader = MlflowReader()
        result = report.analyze(runs, root / "out", reader=reader, directions={})
        plan = report.plan(runs, Selection(EXPERIMENT), reader=reader, directions={})
        yield Store(ids, runs, root / "out", result, plan)


def _rows(frame: pd.DataFrame, columns: list[str]) -> list[tuple[Any, ...]]:
    """Rows as tuples, NaN as None and floats rounded to 12 places (sums of two floats are not exact)."""
    def cell(v: Any) -> Any:
        if isinstance(v, float):
            return None if math.isnan(v) else round(v, 12)
        return v

    return sorted((tuple(cell(v) for v in row) for row in frame[columns].itertuples(index=False)),
                  key=lambda r: tuple((x is None, str(x)) for x in r))


def _expected(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted((tuple(round(v, 12) if isinstance(v, float) else v for v in row) for row in rows),
                  key=lambda r: tuple((x is None, str(x)) for x in r))


def _sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# ---------------------------------------------------------------- the tables


def test_the_run_table_holds_the_latest_finished_run_of_each_cell_with_its_knobs(store: Store) -> None:
    table = store.result.tables[ablations.ANALYSIS_SWEEP_RUNS]
    counted = {k for k, _, _, _ in RUNS} - {"caa-2-15-old"}
    assert set(table["run_id"]) == {store.ids[k] for k in counted}  # not the older, the KILLED or the plain run
    mc1 = table[table["metric"] == "mc1"]
    expected = [(store.ids[k], v, *(float(x) if isinstance(x, int) else x for x in knobs), mc1, *interval(mc1))
                for k, v, knobs, mc1 in RUNS if k in counted]
    # an untagged knob is NaN (branch: "")
    expected = [(r, v, s, la, e, "" if b is None else b, sd, m, lo, hi) for r, v, s, la, e, b, sd, m, lo, hi in expected]
    assert _rows(mc1, ["run_id", "variant", *KNOBS, "value", "ci_low", "ci_high"]) == _expected(expected)
    assert set(mc1["model"]) == {MODEL} and set(mc1["sweep"]) == {SWEEP} and set(mc1["n_questions"]) == {N_QUESTIONS}
    informative = table[table["metric"] == "judge_truthful_informative"]
    assert _rows(informative, ["run_id", "value"]) == _expected(
        [(store.ids[k], jti(m)) for k, v, _, m in RUNS if k in counted and v != "iti"])
    missing = store.result.missing
    for key in ("iti-s0", "iti-s1"):
        what = f"sweep {SWEEP}: iti run without metric judge_truthful_informative: left out of the ablations"
        assert ((missing["run_id"] == store.ids[key]) & (missing["what"] == what)).any()


def test_the_points_average_over_seeds_with_the_spread_across_them(store: Store) -> None:
    points = store.result.tables[ablations.ANALYSIS_SWEEP_POINTS]
    mc1 = points[points["metric"] == "mc1"]
    # two seeds: hand-computed mean, sample SD (ddof 1) and the intervals' mean
    mlp = mc1[(mc1["variant"] == "mlp_mc") & (mc1["scale"] == 4) & (mc1["layer"] == 15) & (mc1["mlp_expansion"] == 2)]
    assert _rows(mlp, ["seed_mean", "seed_sd", "n_seeds", "seeds", "ci_low_seed_mean", "ci_high_seed_mean"]) == \
        _expected([(0.55, _sd([0.50, 0.60]), 2, "0|1", 0.45, 0.60)])
    assert math.isclose(_sd([0.50, 0.60]), math.sqrt(0.005), rel_tol=1e-12)
    iti = mc1[mc1["variant"] == "iti"]
    assert _rows(iti, ["seed_mean", "seed_sd", "n_seeds", "seeds", "ci_low_seed_mean", "ci_high_seed_mean"]) == \
        _expected([(0.33, 0.06 / math.sqrt(2), 2, "0|1", 0.23, 0.38)])
    # one seed, or none tagged: the run itself, no SD
    caa = mc1[(mc1["variant"] == "caa") & (mc1["scale"] == 2)]
    assert _rows(caa, ["seed_mean", "seed_sd", "n_seeds", "seeds", "ci_low_seed_mean"]) == \
        _expected([(0.35, None, 1, "", 0.25)])
    assert len(mc1) == len(RUNS) - 1 - 2  # the duplicate cell counts once, two pairs of seeds are one point each


def test_the_scale_figure_holds_the_other_knobs_at_the_reference(store: Store) -> None:
    table = store.result.tables[ablations.ANALYSIS_SWEEP_SCALE]
    mc1 = table[table["metric"] == "mc1"]
    assert _rows(mc1, ["role", "variant", "scale", "seed_mean", "n_seeds"]) == _expected([
        ("line", "caa", 2.0, 0.35, 1), ("line", "caa", 4.0, 0.40, 1), ("line", "caa", 8.0, 0.45, 1),
        ("line", "mlp_mc", 2.0, 0.42, 1), ("line", "mlp_mc", 4.0, 0.55, 2), ("line", "mlp_mc", 8.0, 0.58, 1),
        ("line", "mlp_gen", 4.0, 0.44, 1),
        ("reference", "baseline", None, 0.20, 1), ("reference", "iti", None, 0.33, 2)])
    assert set(mc1["layer"].dropna()) == {15} and set(mc1["mlp_expansion"].dropna()) == {2}
    assert set(table["metric"]) == {"mc1", "judge_truthful_informative"}


def test_the_layer_figure_holds_scale_and_width_at_the_reference(store: Store) -> None:
    table = store.result.tables[ablations.ANALYSIS_SWEEP_LAYER]
    assert _rows(table[table["metric"] == "mc1"], ["role", "variant", "layer", "seed_mean"]) == _expected([
        ("line", "caa", 10.0, 0.25), ("line", "caa", 15.0, 0.40), ("line", "mlp_mc", 10.0, 0.38),
        ("line", "mlp_mc", 15.0, 0.55), ("line", "mlp_gen", 15.0, 0.44),
        ("reference", "baseline", None, 0.20), ("reference", "iti", None, 0.33)])


def test_the_mlp_arms_figure_groups_width_by_branch_beside_baseline_and_caa(store: Store) -> None:
    table = store.result.tables[ablations.ANALYSIS_SWEEP_MLP_ARMS]
    informative = table[table["metric"] == "judge_truthful_informative"]
    assert _rows(informative, ["role", "variant", "branch", "mlp_expansion", "seed_mean", "ci_low_seed_mean"]) == \
        _expected([("bar", "mlp_mc", "mc", 2.0, jti(0.55), jti(0.55) - 0.1),
                   ("bar", "mlp_mc", "mc", 4.0, jti(0.54), jti(0.54) - 0.1),
                   ("bar", "mlp_gen", "gen", 2.0, jti(0.44), jti(0.44) - 0.1),
                   ("bar", "mlp_gen", "gen", 4.0, jti(0.48), jti(0.48) - 0.1),
                   ("reference", "baseline", "", None, jti(0.20), jti(0.20) - 0.1),
                   ("reference", "caa", "", None, jti(0.40), jti(0.40) - 0.1)])  # no ITI: it lacks the metric


def test_the_seed_figure_shows_each_seed_beside_its_point(store: Store) -> None:
    table = store.result.tables[ablations.ANALYSIS_SWEEP_SEEDS]
    assert _rows(table[table["metric"] == "mc1"], ["variant", "seed", "value", "seed_mean", "n_seeds"]) == _expected([
        ("baseline", None, 0.20, 0.20, 1), ("caa", None, 0.40, 0.40, 1), ("mlp_gen", 0.0, 0.44, 0.44, 1),
        ("mlp_mc", 0.0, 0.50, 0.55, 2), ("mlp_mc", 1.0, 0.60, 0.55, 2), ("iti", 0.0, 0.30, 0.33, 2),
        ("iti", 1.0, 0.36, 0.33, 2)])


# ---------------------------------------------------------------- files, report, dry run


def test_the_four_figures_are_written_with_the_tables_they_plot(store: Store) -> None:
    for spec in ablations.ABLATION_FIGURES:
        assert spec.stem in store.result.drawn
        for ext in (".png", ".pdf", ".csv"):
            assert (store.out / f"{spec.stem}{ext}").stat().st_size > 0, f"{spec.stem}{ext}"
        assert matplotlib.image.imread(store.out / f"{spec.stem}.png").std() > 0, f"{spec.stem}.png is blank"
        written = pd.read_csv(store.out / f"{spec.stem}.csv", keep_default_na=False, na_values=[""])
        table = store.result.tables[spec.stem]
        assert list(written.columns) == list(table.columns) and len(written) == len(table)
        assert written["seed_mean"].tolist() == pytest.approx(table["seed_mean"].tolist(), rel=1e-12)
    for name in (ablations.ANALYSIS_SWEEP_RUNS, ablations.ANALYSIS_SWEEP_POINTS):
        assert len(pd.read_csv(store.out / name)) == len(store.result.tables[name])
    text = (store.out / "report.md").read_text()
    assert text.index("## Sweep ablations") < text.index("## Missing")
    for spec in ablations.ABLATION_FIGURES:
        assert f"![{spec.title}]({spec.stem}.png)" in text
    assert f"- {MODEL}, sweep {SWEEP}: scale 4, layer 15, mlp_expansion 2, branch mc, seed 0" in text


def test_the_figures_have_one_titled_panel_per_metric(store: Store, tmp_path: Path) -> None:
    from analysis import ablation_figures

    draw = {ablations.ANALYSIS_SWEEP_SCALE: ablation_figures.sweep_scale_figure,
            ablations.ANALYSIS_SWEEP_LAYER: ablation_figures.sweep_layer_figure,
            ablations.ANALYSIS_SWEEP_MLP_ARMS: ablation_figures.mlp_arms_figure,
            ablations.ANALYSIS_SWEEP_SEEDS: ablation_figures.seed_spread_figure}
    for stem, figure in draw.items():
        axes = [ax for ax in figure(store.result.tables[stem]).axes if ax.get_visible() and ax.get_title()]
        assert len(axes) == 2, stem  # mc1 and judge_truthful_informative
        assert all(f"n={N_QUESTIONS} questions" in ax.get_title() and SWEEP in ax.get_title() for ax in axes), stem
        assert all(ax.get_xlabel() and ax.get_ylabel() for ax in axes), stem


def test_the_dry_run_lists_the_ablation_figures(store: Store) -> None:
    for spec in ablations.ABLATION_FIGURES:
        assert f"  {spec.stem}: would draw from {len(store.result.tables[spec.stem])} rows" in store.plan


# ---------------------------------------------------------------- without a sweep, and a sweep of one knob


@dataclass
class NoArtifacts:
    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return []

    def artifact_text(self, run_id: str, path: str) -> str | None:
        return None

    def run_tags(self, run_id: str) -> dict[str, str]:
        return {}

    def has_artifact(self, run_id: str, path: str) -> bool:
        return False


def _variant(run_id: str, variant: str, tags: Mapping[str, str], metrics: Mapping[str, float],
             minute: int) -> dict[str, Any]:
    return {"run_id": run_id, "start_time": pd.Timestamp("2025-01-01", tz="UTC") + pd.Timedelta(minutes=minute),
            "status": "FINISHED", f"tags.{TAG_STAGE}": "evaluate.variant", f"tags.{TAG_MODEL}": "m",
            f"tags.{TAG_VARIANT}": variant, f"tags.{TAG_PARENT}": "e", **{f"tags.{k}": v for k, v in tags.items()},
            **{f"metrics.{k}": v for k, v in metrics.items()}}


def test_without_sweep_runs_no_ablation_figure_is_drawn_and_the_report_says_why(tmp_path: Path) -> None:
    runs = pd.DataFrame([
        {"run_id": "e", "start_time": pd.Timestamp("2025-01-01", tz="UTC"), "status": "FINISHED",
         f"tags.{TAG_STAGE}": "evaluate", f"tags.{TAG_MODEL}": "m"},
        _variant("b", "baseline", {}, {"mc1": 0.3, "mc1_ci_low": 0.2, "mc1_ci_high": 0.4}, 1),
        _variant("c", "caa", {"truthsteer.layer": "3", "truthsteer.scale": "2"},
                 {"mc1": 0.5, "mc1_ci_low": 0.4, "mc1_ci_high": 0.6}, 2),
    ])
    result = report.analyze(runs, tmp_path, reader=NoArtifacts(), directions={})
    whats = set(result.missing["what"])
    for spec in ablations.ABLATION_FIGURES:
        assert spec.stem not in result.drawn
        assert not (tmp_path / f"{spec.stem}.png").exists()
        assert f"figure {spec.stem} not drawn: {ablations.NO_SWEEP}" in whats
    assert result.tables[ablations.ANALYSIS_SWEEP_RUNS].empty
    assert f"Not drawn: {ablations.NO_SWEEP}." in (tmp_path / "report.md").read_text()
    lines = report.plan(runs, Selection(), reader=NoArtifacts(), directions={})
    assert f"  {ablations.ANALYSIS_SWEEP_SEEDS}: would skip: {ablations.NO_SWEEP}" in lines


def test_a_sweep_of_scale_alone_draws_only_the_scale_figure_on_the_fallback_metric() -> None:
    """No mc1 or True*Info: judge_truthful (before semantic_acc); no reference tag: each knob at its most frequent
    value (ties: the smallest)."""
    def scored(value: float) -> dict[str, float]:
        return {"judge_truthful": value, "judge_truthful_ci_low": value - 0.1, "judge_truthful_ci_high": value + 0.1,
                "semantic_acc": value / 2}

    sweep = {TAG_SWEEP_NAME: "scales"}
    runs = pd.DataFrame([
        _variant("b", "baseline", sweep, scored(0.3), 1),
        _variant("c0", "caa", {**sweep, sweep_tag("scale"): "0", sweep_tag("layer"): "10"}, scored(0.3), 2),
        _variant("c2", "caa", {**sweep, sweep_tag("scale"): "2", sweep_tag("layer"): "10"}, scored(0.5), 3),
    ])
    missing = Missing()
    found = ablations.ablation_tables(runs, missing)
    assert set(found.runs["metric"]) == {"judge_truthful"}
    assert _same(found.references[("m", "scales")], {"scale": 0.0, "layer": 10.0, "mlp_expansion": math.nan,
                                                     "branch": "", "seed": math.nan})
    assert _rows(found.figures[ablations.ANALYSIS_SWEEP_SCALE], ["role", "variant", "scale", "seed_mean"]) == \
        _expected([("line", "caa", 0.0, 0.3), ("line", "caa", 2.0, 0.5), ("reference", "baseline", None, 0.3)])
    for stem in (ablations.ANALYSIS_SWEEP_LAYER, ablations.ANALYSIS_SWEEP_MLP_ARMS, ablations.ANALYSIS_SWEEP_SEEDS):
        assert found.figures[stem].empty and found.reasons[stem].startswith(
            next(s.needs for s in ablations.ABLATION_FIGURES if s.stem == stem)), stem
    whats = {i.what for i in missing.items}
    assert "sweep scales: layer not varied at its reference point (values: 10): no layer panel" in whats
    assert "sweep scales: one seed per variant at its reference point: no seed panel" in whats
    assert "sweep scales: no scale in its sweep.reference tag: held at its most frequent value 0.0" in whats


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    def norm(v: Any) -> Any:
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    return {k: norm(v) for k, v in a.items()} == {k: norm(v) for k, v in b.items()}


def test_headline_evaluation_is_not_a_sweep_cell_unless_only_cells_exist() -> None:
    from analysis.tables import latest_evaluations

    rows = [("m", "full", "baseline", 1, ""), ("m", "full", "caa", 1, ""),
            ("m", "ref", "baseline", 2, "smoke"), ("m", "ref", "caa", 2, "smoke"), ("m", "ref", "mlp_mc", 2, "smoke"),
            ("m", "seed1", "baseline", 3, "smoke"), ("m", "seed1", "mlp_mc", 3, "smoke"),
            ("n", "ref2", "baseline", 1, "s"), ("n", "ref2", "caa", 1, "s"), ("n", "last", "caa", 2, "s")]
    frame = pd.DataFrame(rows, columns=["model", "evaluation", "variant", "start_time", "sweep"]).assign(split="test")
    assert latest_evaluations(frame) == {"m": "full", "n": "ref2"}
    assert latest_evaluations(frame[frame["evaluation"] != "full"]) == {"m": "ref", "n": "ref2"}
    assert latest_evaluations(frame.assign(sweep="")) == {"m": "seed1", "n": "last"}  # no sweep: the latest
