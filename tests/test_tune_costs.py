"""tune with a cost of steering: a constraint (the best *feasible* trial) and two directions (the Pareto
front), on the tiny model; each trial's kl_neutral checked against evaluate's own side-effect code, the
front against a brute-force dominance check, the chosen trial against the study's trials."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from optuna.trial import TrialState

from analysis import sweeps
from analysis.runs import Missing
from core import artifacts
from core.config import ConfigError
from core.corpus import load_passages
from evaluation.side_effects import neutral_effects
from stages import tune_storage
from stages.tune_space import Constraint, parse_directions
from steering.methods.intervention import Steering
from tests.test_tune import load_study, run_tiny, tiny_cfg, tiny_loaded

Settings = tune_storage.TuneSettings
GRID = {"layers": "1", "scales": "0,3,12"}
COSTED = ("effects.n_passages=4", "effects.max_tokens=24")


def test_constraint_and_directions_parse_and_name_the_fix() -> None:
    assert Constraint.parse("kl_neutral<=0.5") == Constraint("kl_neutral", "<=", 0.5)
    assert Constraint.parse(" ce_neutral_delta >= -1e-2 ").violation(0.0) == pytest.approx(-0.01)
    assert Constraint("kl_neutral", "<=", 0.5).violation(0.7) == pytest.approx(0.2)
    with pytest.raises(ConfigError, match=r"constraint='kl<0.5' must read metric<=bound"):
        Constraint.parse("kl<0.5")
    with pytest.raises(ConfigError, match="mc2 is not a cost a trial measures; use one of kl_neutral"):
        Constraint.parse("mc2<=0.5")
    objective, cost = parse_directions("truth_info:max,kl_neutral:min")
    assert (objective.metric, cost) == ("judge_truthful_informative", "kl_neutral")
    with pytest.raises(ConfigError, match="mc2 \\(mc2\\) is maximised; write mc2:max"):
        parse_directions("mc2:min,kl_neutral:min")
    with pytest.raises(ConfigError, match="the second must be a cost to minimise"):
        parse_directions("mc2:max,mc1:min")
    with pytest.raises(ConfigError, match="prunes single-objective studies only"):
        Settings(directions="mc2:max,kl_neutral:min", pruner="wilcoxon")
    with pytest.raises(ConfigError, match="name two objectives"):
        Settings(objective="judge", directions="mc2:max,kl_neutral:min")
    two = Settings(directions="truth_info:max,kl_neutral:min")
    assert (two.objective_spec.name, two.cost, two.resolved_pruner()) == ("truth_info", "kl_neutral", "none")
    assert two.label == "truth_info-pareto-kl_neutral"
    assert Settings(constraint="kl_neutral<=0.5").label == "mc-kl_neutral<=0.5"


def kl_by_hand(cfg: object, scale: float) -> float:
    """The trial's kl_neutral as evaluate computes it, from the same shared extraction the study used."""
    from stages.tune_scoring import shared_extraction

    loaded = tiny_loaded(cfg)  # type: ignore[arg-type]
    vectors = shared_extraction(cfg, [], loaded)[0].vectors  # type: ignore[arg-type]  # cached by the study
    texts = [p.text for p in load_passages(n=4)]
    rows = neutral_effects(loaded, {"t": Steering("caa", layer=1, scale=scale, vector=vectors[1])}, texts,
                           batch_size=8, max_tokens=24)["t"]
    return math.fsum(r["kl"] for r in rows) / len(rows)


def test_a_constrained_study_reports_its_best_feasible_trial(tracking: str, outputs: Path) -> None:
    cfg = tiny_cfg(*COSTED)
    settings = Settings(sampler="grid", n_trials=0, heartbeat=0, axes=GRID, constraint="kl_neutral<=0.0")
    outcome, parent_id = run_tiny(cfg, settings)
    trials = {t.params["scale"]: t for t in load_study(settings, cfg).trials}
    assert all(t.state == TrialState.COMPLETE for t in trials.values()) and sorted(trials) == [0.0, 3.0, 12.0]
    assert trials[0.0].user_attrs["kl_neutral"] == 0.0 and trials[0.0].user_attrs["constraints"] == [0.0]
    assert trials[12.0].user_attrs["kl_neutral"] == pytest.approx(kl_by_hand(cfg, 12.0), rel=1e-5)
    assert all(trials[s].user_attrs["constraints"][0] > 0 for s in (3.0, 12.0))
    assert outcome.best_params == {"layer": 1, "scale": 0.0}  # the only feasible one, whatever its mc2
    parent = mlflow.get_run(parent_id)
    assert parent.data.metrics["best_kl_neutral"] == 0.0 and parent.data.params["tune.constraint"] == "kl_neutral<=0.0"
    assert outcome.study_name == "truthsteer-tiny-llama-mc-kl_neutral<=0"
    assert parent.data.tags[artifacts.TAG_COST] == "kl_neutral"
    on_ce = Settings(sampler="grid", n_trials=0, heartbeat=0, axes=GRID, constraint="ce_neutral_delta<=100")
    _, ce_parent = run_tiny(cfg, on_ce)  # every trial measures both costs: the front is of the constrained one
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=ce_parent, artifact_path=artifacts.TUNE_PARETO))
    assert set(table["cost_metric"]) == {"ce_neutral_delta"}
    assert list(table["cost"]) == [t.user_attrs["ce_neutral_delta"] for t in load_study(on_ce, cfg).trials]
    impossible = Settings(sampler="grid", n_trials=0, heartbeat=0, axes=GRID, constraint="kl_neutral>=1e9")
    with pytest.raises(ConfigError, match=r"no completed trial .* is feasible under kl_neutral>=1e\+09 \(the lowest "
                                          r"kl_neutral is 0, trial \d+\); loosen the constraint"):
        run_tiny(cfg, impossible)


def test_a_two_objective_study_logs_its_pareto_front(tracking: str, outputs: Path) -> None:
    cfg = tiny_cfg(*COSTED)
    settings = Settings(sampler="grid", n_trials=0, heartbeat=0, axes={"layers": "0:2", "scales": "0,3,12"},
                        directions="mc2:max,kl_neutral:min")
    outcome, parent_id = run_tiny(cfg, settings)
    study = load_study(settings, cfg)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 9 and all(t.values[1] == t.user_attrs["kl_neutral"] for t in complete)
    dominated = {t.number for t in complete for o in complete
                 if o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values}
    front = {t.number for t in complete} - dominated
    assert {t.number for t in study.best_trials} == front
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path=artifacts.TUNE_PARETO))
    assert set(table[table["on_front"]]["trial"]) == front and table["chosen"].sum() == 1
    chosen = table[table["chosen"]].iloc[0]
    assert chosen["trial"] in front and chosen["value"] == max(t.values[0] for t in complete)
    assert outcome.best_params == {"layer": int(chosen["layer"]), "scale": float(chosen["scale"])}
    names = {f.path for f in mlflow.MlflowClient().list_artifacts(parent_id, "tune")}
    assert artifacts.TUNE_PARETO_FIGURE in names
    frame = mlflow.search_runs(search_all_experiments=True, output_format="pandas")
    drawn = sweeps.pareto_table(sweeps.tune_trials(frame, Missing(), {"mc2": True}))
    assert len(drawn) == 9 and set(drawn["cost_metric"]) == {"kl_neutral"}
    assert drawn["on_front"].sum() == len(front) and drawn[drawn["chosen"]]["value"].iloc[0] == chosen["value"]


def test_a_warm_start_reads_feasibility_from_optunas_constraints_attr_only(tmp_path: Path) -> None:
    import csv

    import optuna

    from stages.tune_space import ATTR_CONSTRAINTS
    from stages.tune_warm import _feasible

    study = optuna.create_study(direction="maximize")
    for violation in (0.0, 0.4, -1.0):
        trial = study.ask()
        trial.set_user_attr(ATTR_CONSTRAINTS, [violation])
        trial.set_user_attr("constraint_note", "kl_neutral<=0.5")  # words, not a violation
        study.tell(trial, 1.0)
    plain = study.ask()
    study.tell(plain, 1.0)  # a study without a constraint records none
    path = tmp_path / "trials.csv"  # as tune/trials.csv is written and read back
    study.trials_dataframe().to_csv(path, index=False)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [_feasible(r) for r in rows] == [True, False, True, True]
