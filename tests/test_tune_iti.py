"""The tune stage with ``method=iti``: ITI's k and alpha axes, their checks, studies apart from CAA's.

Fast: the k and alpha specs (defaults, errors naming the value and the fix, the other method's flags
refused); the best params as the iti config fragment and tags; on a tiny random Llama, a study whose
trials steer the best k of the cached head ranking (k bounded by the model's heads), tagged variant
``iti`` with params k and alpha, read by the analysis' trials table, and never resumed by a CAA worker.
Slow: one grid worker on smollm2-135m (k 4 at alpha 0 and 30) whose alpha-0 trial scores the
baseline's MC2 exactly, its best written as ``{"iti": {"k", "alpha"}}`` that ``full --tuned`` applies.
"""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from analysis import sweeps
from analysis.runs import Missing
from core import artifacts
from core.config import ConfigError
from core.config_io import load_config
from core.data import splits_for
from core.models import load_from_config
from core.tracking import stage_run
from evaluation.judges import JudgeItem
from evaluation.linear import onednn_linears
from evaluation.mc import MCJudge
from stages import iti as iti_stage
from stages import pipeline, tune, tune_iti, tune_storage
from steering.iti import ItiDirections, attention_heads
from steering.methods.intervention import Steering
from tests.conftest import DATA_CSV
from tests.test_tune import children, load_study, run_tiny, tiny_cfg, tiny_loaded

optuna.logging.set_verbosity(optuna.logging.WARNING)
Settings = tune_storage.TuneSettings


def test_iti_axes_have_defaults_per_sampler() -> None:
    cfg = load_config("smollm2-135m")
    assert Settings(method="iti").search_space(cfg).describe() == "k 1:48 x alpha 0:30"
    grid = Settings(method="iti", sampler="grid").search_space(cfg)
    assert grid.grid() == {"k": [4, 8, 16, 32], "alpha": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]}
    assert grid.n_cells == 28 and grid.method == "iti"
    caa = Settings().search_space(cfg)
    assert list(caa.axes) == ["layer", "scale"] and caa.describe() == "layer 8:22 x scale 0:8"
    assert Settings(method="iti").study_name_for(cfg) == "truthsteer-smollm2-135m-iti-mc"
    assert Settings().study_name_for(cfg) == "truthsteer-smollm2-135m-mc"  # caa: unchanged
    assert Settings(method="iti", source_run="r1").source == "r1" and Settings(extract_run="e1").source == "e1"


@pytest.mark.parametrize(("settings", "message"), [
    ({"ks": "0:8"}, r"ks=0:8 must be >= 1 head; e.g. ks=1:48"),
    ({"ks": "2.5"}, r"k value '2.5' must be an integer number of heads, e.g. 1:48 or 4,8,16,32"),
    ({"ks": "8:4"}, r"k range 8:4 is empty; write low:high with low <= high"),
    ({"alphas": "a:b"}, r"alpha value 'a' is not a number; write e.g. 0:30"),
    ({"alphas": "0:30", "sampler": "grid"}, r"the grid needs finitely many alpha values.*0:30:1"),
    ({"layers": "8:20"}, r"layers and scales are caa's axes, but method=iti; pass --method caa"),
    ({"extract_run": "e1"}, r"extract_run holds CAA vectors.*--source-run"),
])
def test_bad_iti_settings_name_the_value_and_the_fix(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        axes = {flag: settings.pop(flag) for flag in ("layers", "ks", "alphas") if flag in settings}
        Settings(method="iti", axes=axes, **settings).search_space(load_config("smollm2-135m"))


def test_the_other_settings_errors() -> None:
    with pytest.raises(ConfigError, match="method='mlp' cannot be tuned; choose from caa, iti"):
        Settings(method="mlp")
    with pytest.raises(ConfigError, match="ks and alphas are iti's axes, but method=caa; pass --method iti"):
        Settings(axes={"ks": "1:8"})
    with pytest.raises(ConfigError, match="extract_run=a and source_run=b differ"):
        Settings(extract_run="a", source_run="b")
    space = Settings(method="iti", axes={"ks": "1:300"}).search_space(load_config("smollm2-135m"))
    with pytest.raises(ConfigError, match=r"ks=1:300 exceeds the 270 heads m ranked; give ks <= 270, e.g. ks=1:48"):
        space.check_source(ItiDirections(torch.arange(270) // 9, torch.arange(270) % 9,
                                         torch.zeros(270, 4), torch.ones(270), torch.ones(270)), "m")


def test_best_iti_params_become_the_iti_section_and_tags() -> None:
    assert tune.tuned_fragment({"k": 8, "alpha": 12.5}) == {"iti": {"k": 8, "alpha": 12.5}}
    assert tune.best_tags({"k": 8, "alpha": 12.5}) == {artifacts.TAG_BEST_K: "8", artifacts.TAG_BEST_ALPHA: "12.5"}
    assert tune.tuned_fragment({"layer": 3, "scale": 2}) == {"steering": {"layer": 3, "scale": 2.0,
                                                                           "scale_mode": "absolute"}}
    assert tune.best_tags({"layer": 3, "scale": 2.0}) == {artifacts.TAG_BEST_LAYER: "3", artifacts.TAG_BEST_SCALE: "2.0"}


def test_an_iti_study_on_the_tiny_model(tracking: str, outputs: Path) -> None:
    cfg = tiny_cfg()
    loaded = tiny_loaded(cfg)
    n_heads = cfg.model.n_layers * attention_heads(loaded.model)[0]
    with pytest.raises(ConfigError, match=rf"ks=1:999 exceeds the {n_heads} heads tiny-llama has \(computed\)"):
        run_tiny(cfg, Settings(method="iti", n_trials=1, heartbeat=0, axes={"ks": "1:999"}))
    cached = tune_iti.heads_cache_path(cfg)
    assert cached.exists() and cached.parent == outputs / "tune" / "iti"
    fresh, _, _ = iti_stage.rank_heads(cfg, splits_for(cfg)["pool"], loaded)
    assert torch.equal(tune_iti.shared_heads(cfg, [], loaded)[0].directions, fresh.directions)  # read, not recomputed
    assert tune_iti.heads_key(cfg) == tune_iti.heads_key(tiny_cfg("iti.k=3", "iti.alpha=2"))  # steering only
    settings = Settings(method="iti", n_trials=2, heartbeat=0, axes={"ks": f"1:{n_heads}", "alphas": "0:10"})
    outcome, parent_id = run_tiny(cfg, settings)
    assert outcome.study_name == "truthsteer-tiny-llama-iti-mc" and outcome.extraction_source == "cache"
    trials = load_study(settings, cfg).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(set(t.params) == {"k", "alpha"} and 1 <= t.params["k"] <= n_heads for t in trials)
    tags = mlflow.get_run(parent_id).data.tags
    assert outcome.best_params is not None and artifacts.TAG_BEST_LAYER not in tags
    assert (tags[artifacts.TAG_BEST_K], float(tags[artifacts.TAG_BEST_ALPHA])) == (
        str(outcome.best_params["k"]), outcome.best_params["alpha"])
    runs = children(parent_id)
    assert {r.data.tags["truthsteer.variant"] for r in runs} == {"iti"} and all(set(r.data.params) == {"k", "alpha"} for r in runs)
    frame = mlflow.search_runs(search_all_experiments=True, output_format="pandas")
    table = sweeps.tune_trials(frame, Missing(), {"mc2": True})
    assert list(table["variant"]) == ["iti", "iti"] and table["layer"].isna().all() and table["scale"].isna().all()
    assert sorted(table["k"]) == sorted(float(t.params["k"]) for t in trials)
    assert sweeps.layer_scale_table(table).empty
    best = sweeps.best_settings_table(frame.iloc[0:0], table, None, {}, {})
    assert list(best["variant"]) == ["iti"] and best["k"].iloc[0] == outcome.best_params["k"]
    with pytest.raises(ConfigError, match=r"different method.*pass another --study-name"):  # a CAA worker
        run_tiny(cfg, Settings(study_name=outcome.study_name, n_trials=1, heartbeat=0, axes={"layers": "0:2"}))


@pytest.mark.slow
def test_an_iti_grid_worker_on_smollm2_scores_alpha_0_as_the_baseline(tracking: str, outputs: Path) -> None:
    cfg = load_config("smollm2-135m", [f"data.source={DATA_CSV}", "data.pool=6", "data.val=2", "data.train=2",
                                       "data.test=2", "iti.pairs_per_question=2"])
    loaded = load_from_config(cfg)
    settings = Settings(method="iti", sampler="grid", n_trials=2, heartbeat=0, axes={"ks": "4", "alphas": "0,30"})
    with stage_run("tune", cfg) as parent:
        outcome = tune.run(cfg, settings, loaded=loaded)
    trials = sorted(load_study(settings, cfg).trials, key=lambda t: t.params["alpha"])
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert [t.params for t in trials] == [{"k": 4, "alpha": 0.0}, {"k": 4, "alpha": 30.0}]
    at_0, at_30 = (float(t.value) for t in trials)  # type: ignore[arg-type]  # COMPLETE: a value
    assert math.isfinite(at_0) and math.isfinite(at_30) and at_0 != at_30
    items = [JudgeItem.from_question(q, "") for q in splits_for(cfg)["val"]]
    with onednn_linears(loaded.model, loaded.device):  # the linear layers tune's MC runs on (as evaluate's)
        rows = MCJudge.from_config(cfg).bind(loaded, Steering.baseline()).score(items)
    assert at_0 == math.fsum(r["mc2"] for r in rows) / len(rows)  # alpha 0 shifts nothing
    fragment = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path=artifacts.TUNED)).read_text())
    assert outcome.best_params is not None
    assert fragment == {"iti": {"k": 4, "alpha": outcome.best_params["alpha"]}}
    tuned = load_config("smollm2-135m", pipeline.tuned_overrides(parent.info.run_id))
    assert (tuned.iti.k, tuned.iti.alpha) == (4, outcome.best_params["alpha"])


def test_a_method_that_declares_a_tunable_is_tuned_without_an_edit_to_the_tune_stage(
        tracking: str, outputs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tune stage asks the registry: a new method module (here one that steers the last layer with
    the CAA extraction, searching only its ``gain``) is tuned, tagged and summarised like caa and iti."""
    import steering.methods as registry
    from steering.methods.tuning import Tunable, TuneAxis, per_sampler

    def steer(cfg: Any, vectors: Any, source: str, params: Mapping[str, float]) -> Steering:
        last = cfg.model.n_layers - 1
        return Steering("last", layer=last, scale=float(params["gain"]), vector=vectors[last], source_run=source)

    module = types.ModuleType("steering.methods.last")
    module.METHOD = registry.Method(  # type: ignore[attr-defined]
        "last", stage="extract", section="", needs="an extract run", load=lambda *a: None, key_fields=lambda *a: {},
        tune=Tunable(axes=(TuneAxis("gain", "gains", False, per_sampler("0:4", "0:4"), example="0:4", help="gain"),),
                     section="last", noun="vectors", steer=steer))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(registry, "METHOD_MODULES", (*registry.METHOD_MODULES, "last"))
    cfg = tiny_cfg()
    with pytest.raises(ConfigError, match="gains are last's axes, but method=caa; pass --method last"):
        Settings(axes={"gains": "1"})
    settings = Settings(method="last", sampler="grid", n_trials=0, heartbeat=0, axes={"gains": "0,3"})
    outcome, parent_id = run_tiny(cfg, settings)
    assert outcome.study_name == "truthsteer-tiny-llama-last-mc" and outcome.best_params is not None
    trials = sorted(load_study(settings, cfg).trials, key=lambda t: t.params["gain"])
    assert [t.params for t in trials] == [{"gain": 0.0}, {"gain": 3.0}] and trials[0].value != trials[1].value
    tags = mlflow.get_run(parent_id).data.tags
    assert float(tags[artifacts.best_tag("gain")]) == outcome.best_params["gain"]
    fragment = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        run_id=parent_id, artifact_path=artifacts.TUNED)).read_text())
    assert fragment == {"last": {"gain": outcome.best_params["gain"]}}
    assert {r.data.tags["truthsteer.variant"] for r in children(parent_id)} == {"last"}
