"""The sweep: grids (files and inline), the cells and what each evaluates, the configs a cell runs with, the
dry run of the shipped grids, ``eval.mlp_scale``, and (slow) a sweep on smollm2-135m killed mid-way that
recomputes no finished cell when started again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from core import artifacts
from core.config import ConfigError
from core.config_io import load_config
from stages import sweep
from steering.mlp import MLPSteering, MLPSteeringConfig, mlp_hook_scale, save_mlp
from tests.conftest import DATA_CSV, PROJECT_DIR, kill_once_stored

SMALL = ("data.pool=4,data.train=4,data.val=2,data.test=2,mlp.steps=2,mlp.batch_size=2,eval.max_new_tokens=8,"
         "eval.judges=[semantic,bleu],eval.n_bootstrap=50,effects.n_passages=2")


# ------------------------------------------------------------------------------------------- grids


def test_inline_grid_and_file_grid_parse_to_knob_values() -> None:
    grid = sweep.parse_grid("scale=[0,0.5,2]; layer=[10,15] ;variants=[caa,mlp_mc];name=mine")
    assert grid == sweep.Grid("mine", {"scale": (0.0, 0.5, 2.0), "layer": (10, 15)}, ("caa", "mlp_mc"))
    smoke = sweep.parse_grid("configs/sweeps/smoke.yaml")
    assert smoke.name == "smoke" and smoke.design == "one_at_a_time"
    assert smoke.knobs["branch"] == ("mc", "gen", "joint") and "data.test=40" in smoke.overrides
    assert sweep.parse_grid("paper").crossed == ("seed",)  # a name under configs/sweeps/


@pytest.mark.parametrize(("text", "message"), [
    ("", "sweep needs a grid"),
    ("width=[1,2]", "width is not a sweep knob; choose from scale, layer, mlp_expansion, branch, seed"),
    ("layer=[1.5]", "layer value 1.5 is not a whole number; e.g. layer=[10,15]"),
    ("branch=[both]", "branch value 'both' is not one of mc, gen, joint"),
    ("scale=[1,1]", "repeats a value"),
    ("scale=[]", "has no values"),
    ("variants=[cca]", "'cca', which is not a steering method"),
    ("scale", "is not knob=[values]"),
    ("nothere.yaml", "grid file nothere.yaml does not exist; the shipped ones are paper.yaml, smoke.yaml"),
])
def test_bad_grids_fail_naming_the_value_and_the_fix(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        sweep.parse_grid(text)


# ------------------------------------------------------------------------------------------- cells


def _cfg(*overrides: str):
    return load_config("smollm2-135m", [f"data.source={DATA_CSV}", *overrides])


def test_product_cells_evaluate_each_variant_only_where_its_result_can_change() -> None:
    cfg = _cfg()  # steering.scale 4, layer 15, mlp.expansion 2, greedy
    grid = sweep.parse_grid("scale=[0,4];layer=[10,15];mlp_expansion=[1,2];branch=[mc,joint];variants=[baseline,caa]")
    cells = sweep.cells(cfg, grid)
    assert len(cells) == 8  # 2 x 2 x 2, layer outermost, scale innermost
    assert [(c.layer, c.mlp_expansion, c.scale) for c in cells[:3]] == [(10, 1, 0.0), (10, 1, 4.0), (10, 2, 0.0)]
    by_point = {(c.layer, c.mlp_expansion, c.scale): c.variants for c in cells}
    assert by_point[(15, 2, 4.0)] == ("baseline", "caa", "mlp_mc", "mlp_joint")  # the reference point
    assert by_point[(15, 1, 4.0)] == ("baseline", "mlp_mc", "mlp_joint")  # caa does not depend on the width
    assert by_point[(10, 2, 0.0)] == ("baseline", "caa", "mlp_mc", "mlp_joint")
    assert sum("caa" in v for v in by_point.values()) == 4  # per scale and layer
    # sampling makes every variant depend on the seed; greedy, a seed changes nothing of caa's
    sampled = sweep.cells(_cfg("eval.do_sample=true"), sweep.parse_grid("seed=[0,1];variants=[baseline,caa]"))
    assert [(c.seed, c.variants) for c in sampled] == [(0, ("baseline", "caa")), (1, ("baseline", "caa"))]
    assert [c.seed for c in sweep.cells(cfg, sweep.parse_grid("seed=[0,1];variants=[baseline,caa]"))] == [0]


def test_one_at_a_time_cells_vary_one_knob_around_the_reference_and_cross_the_seeds() -> None:
    cfg = _cfg()
    smoke = sweep.cells(cfg, sweep.parse_grid("smoke"))
    points = [(c.scale, c.layer, c.mlp_expansion, c.seed) for c in smoke]
    assert sorted(points) == sorted([(4.0, 10, 2, 0), (4.0, 15, 1, 0), (0.0, 15, 2, 0), (4.0, 15, 2, 0),
                                     (8.0, 15, 2, 0), (4.0, 15, 2, 1)])
    assert sweep.reference(cfg, sweep.parse_grid("smoke")) == {"scale": 4.0, "layer": 15, "mlp_expansion": 2,
                                                               "branch": "mc", "seed": 0}
    crossed = sweep.Grid("g", {"scale": (0.0, 4.0), "layer": (10, 15), "seed": (0, 1)}, ("caa", "mlp_gen"),
                         design="one_at_a_time", crossed=("seed",))
    assert len(sweep.points(cfg, crossed)) == 3 * 2  # (15, 4), (10, 4), (15, 0), each over both seeds
    assert all(c.variants == ("mlp_gen",) for c in sweep.cells(cfg, crossed) if c.seed == 1)  # no baseline there


def test_a_cell_trains_at_the_configs_scale_and_evaluates_at_its_own() -> None:
    cfg = _cfg("steering.depth=0.3")
    grid = sweep.parse_grid("scale=[0,8];layer=[12];seed=[3];branch=[gen]")
    cell = next(c for c in sweep.cells(cfg, grid) if c.scale == 8.0)
    train, evaluate = sweep.cell_configs(cfg, grid, cell)
    assert (train.layer, train.steering.scale, train.mlp.seed, train.bank.seed, train.iti.seed) == (12, 4.0, 3, 3, 3)
    assert train.eval == cfg.eval and train.eval.seed == 0  # greedy: eval.seed (the bootstrap) unchanged
    assert (evaluate.steering.scale, evaluate.eval.mlp_scale, evaluate.eval.variants) == (8.0, 8.0, cell.variants)
    assert train.mlp.expansion == cfg.mlp.expansion  # not in the grid: not overridden
    bad = sweep.parse_grid("layer=[30]")
    with pytest.raises(ConfigError, match=r"sweep cell \(scale 4, layer 30, mlp_expansion 2, seed 0\): "):
        sweep.cell_configs(cfg, bad, sweep.cells(cfg, bad)[0])


def test_mlp_scale_rescales_the_module_to_the_cells_scale(tmp_path: Path) -> None:
    module = MLPSteering(MLPSteeringConfig("smollm2-135m", 15, 8, 2, 2, 3.0), bank=__import__("torch").ones(2, 8))
    save_mlp(module, tmp_path, {"branch": "joint", "config": {"steering": {"scale": 4.0, "scale_mode": "absolute"}}})
    assert mlp_hook_scale(_cfg(), "mlp_joint", tmp_path) == 1.0  # unset: the module as trained
    assert mlp_hook_scale(_cfg("eval.mlp_scale=6"), "mlp_joint", tmp_path) == 1.5
    assert mlp_hook_scale(_cfg("eval.mlp_scale=0"), "mlp_joint", tmp_path) == 0.0
    with pytest.raises(ConfigError, match="needs a nonzero scale of the same steering.scale_mode"):
        mlp_hook_scale(_cfg("eval.mlp_scale=0.5", "steering.scale_mode=relative"), "mlp_joint", tmp_path)
    with pytest.raises(ConfigError, match="eval.mlp_scale=-1.0 must be >= 0"):
        _cfg("eval.mlp_scale=-1")


def _sweep_command(grid: str, overrides: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "entrypoints.sweep", "--data", str(DATA_CSV), "--grid", grid, "--overrides",
            overrides, *extra]


def test_dry_runs_of_the_shipped_grids_count_cells_and_estimate_the_work(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    smoke = subprocess.run(_sweep_command("configs/sweeps/smoke.yaml", "", "--dry-run"), cwd=PROJECT_DIR, env=env,
                           capture_output=True, text=True, timeout=300)
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    assert "sweep 'smoke' on smollm2-135m: 6 cells" in smoke.stdout and "work to do: 12 MLP trainings" in smoke.stdout
    assert smoke.stdout.count("train_joint runs") == 4  # the reference, layer 10, width 1 and seed 1
    paper = subprocess.run(_sweep_command("configs/sweeps/paper.yaml", "", "--model", "gemma-2-9b", "--dry-run"),
                           cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert paper.returncode == 0, paper.stderr[-3000:]
    assert "sweep 'paper' on gemma-2-9b: 45 cells" in paper.stdout and "FLOP" in paper.stdout
    assert mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()[0].name == "Default"  # nothing logged


# ------------------------------------------------------------------------------------- resumption


@pytest.mark.slow
def test_sweep_killed_mid_way_recomputes_no_finished_cell(tracking: str, tmp_path: Path) -> None:
    # cell 1: scale 0, cell 2: scale 4, each baseline, caa and mlp_joint on 2 questions, one per generate call
    grid = "scale=[0,4];branch=[joint];variants=[baseline,caa]"
    overrides = SMALL + ",eval.batch_size=1,mlp.mc_weight=0.5"
    outputs = tmp_path / "outputs"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "TRUTHSTEER_OUTPUTS": str(outputs)}
    # killed after cell 1's 6 answers and cell 2's first (its baseline's come from the store)
    kill_once_stored(_sweep_command(grid, overrides), env, outputs, answers=3 * 2 + 1)

    done = subprocess.run(_sweep_command(grid, overrides), cwd=PROJECT_DIR, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "evaluate: reusing finished run" in done.stdout.split("cell 2/2")[0]  # cell 1 is not recomputed
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["truthsteer"], output_format="list")
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    parent = next(r for r in runs if r.data.tags.get("truthsteer.stage") == "sweep" and r.info.status == "FINISHED")
    cells = json.loads(Path(client.download_artifacts(parent.info.run_id, artifacts.SWEEP_CELLS,
                                                      str(tmp_path))).read_text())
    assert [c["reused"] for c in cells["cells"]] == [True, False] and parent.data.tags["truthsteer.reused"] == "1 of 2 cells"
    assert [c["variants"] for c in cells["cells"]] == [["baseline", "caa", "mlp_joint"]] * 2
    trained = [r for r in runs if r.data.tags.get("truthsteer.pipeline_stage") == "train_joint"]
    assert len(trained) == 1 and trained[0].data.params["mlp.branch"] == "joint"  # trained once, for both cells
    assert trained[0].data.params["mlp.mc_weight"] == "0.5"

    # the variant runs of the finished cells: evaluate's metric names, the cell's knobs as tags
    finished = {c["run_id"] for c in cells["cells"]}
    variants = [r for r in runs if r.data.tags.get(artifacts.TAG_PARENT) in finished]
    assert sorted((r.data.tags["truthsteer.variant"], r.data.tags.get("sweep.scale")) for r in variants) == [
        ("baseline", None), ("baseline", None), ("caa", "0"), ("caa", "4"), ("mlp_joint", "0"), ("mlp_joint", "4")]
    assert len({frozenset(r.data.metrics) for r in variants}) == 1  # the same metric names in every cell
    for name in ("caa", "mlp_joint"):  # and the same params but what the swept knob sets
        low, high = (r.data.params for r in variants if r.data.tags["truthsteer.variant"] == name)
        assert {k for k in low.keys() | high.keys() if low.get(k) != high.get(k)} == {
            "steering.scale", "eval.mlp_scale", "variant.scale"}, name
    assert "mc2_delta" in variants[0].data.metrics or "semantic_acc_delta" in variants[0].data.metrics
    for run in variants:
        tags = run.data.tags
        assert tags["sweep.name"] == "inline" and json.loads(tags["sweep.reference"])["scale"] == 4.0
        steered = tags["truthsteer.variant"] != "baseline"
        assert run.data.metrics["steering_scale"] == (float(tags["sweep.scale"]) if steered else 0.0)
        if tags["truthsteer.variant"] == "mlp_joint":
            assert (tags["sweep.branch"], tags["sweep.layer"], tags["sweep.mlp_expansion"], tags["sweep.seed"]) == \
                ("joint", "15", "2", "0")
    # nothing generated twice: baseline once, the killed cell's stored answer reused
    (store,) = outputs.glob("evaluate/*/generations.jsonl")
    keys = [(r["variant_hash"], r["qid"]) for r in map(json.loads, store.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == 5 * 2
    second = [r for r in variants if r.data.tags[artifacts.TAG_PARENT] == cells["cells"][1]["run_id"]]
    assert sum(r.data.metrics["n_reused"] for r in second) == 2 + 1 and sum(r.data.metrics["n_generated"] for r in second) == 3
