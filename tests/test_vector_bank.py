"""The vector bank against exact oracles: numpy means of the same draws, cosines of known vectors,
and the ``bank`` stage end to end on a throw-away tracking store fed a synthetic extract run."""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from core import artifacts
from core.artifacts import BANK_META, BANK_TENSORS, CAA_META, CAA_TENSORS, save_tensors
from core.config import Config, ConfigError
from core.config_io import config_from_dict, load_config
from core.tracking import stage_run
from entrypoints import _cli
from entrypoints import bank as bank_entry
from stages import bank as bank_stage
from steering import vector_bank
from steering.vector_bank import VectorBank, build_bank, load_bank, stability


def _diffs(n_examples: int, n_layers: int, d_model: int, seed: int = 0) -> torch.Tensor:
    """Small integers, so that every sum is exact and means are bit-for-bit reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (n_examples, n_layers, d_model), generator=generator).to(torch.float32)


def _valid(n_examples: int, n_layers: int, invalid: dict[int, list[int]]) -> torch.Tensor:
    """uint8 mask, 0 at ``invalid[layer]`` rows, as the extract stage writes it."""
    valid = torch.ones(n_examples, n_layers, dtype=torch.uint8)  # (n_examples, n_layers)
    for layer, rows in invalid.items():
        valid[rows, layer] = 0
    return valid


def _poison(diffs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """NaN wherever ``valid`` is 0, as a non-finite extraction leaves it."""
    return torch.where(valid[..., None].bool(), diffs, torch.full_like(diffs, math.nan))


def _reference_draws(n_valid: int, n_bootstrap: int, size: int, replace: bool, seed: int) -> np.ndarray:
    """The documented draws: one generator; randint with replacement, else a randperm prefix per vector."""
    generator = torch.Generator().manual_seed(seed)
    if replace:
        return torch.randint(0, n_valid, (n_bootstrap, size), generator=generator).numpy()
    return np.stack([torch.randperm(n_valid, generator=generator)[:size].numpy() for _ in range(n_bootstrap)])


def _np_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- build_bank


def test_base_is_the_mean_of_the_valid_examples_only() -> None:
    valid = _valid(10, 3, {1: [0, 4, 7]})
    diffs = _poison(_diffs(10, 3, 16), valid)
    bank = build_bank(diffs, valid, 1, n_bootstrap=3, sample_size=None, replace=True, seed=0)
    rows = diffs[:, 1].numpy().astype(np.float64)[[1, 2, 3, 5, 6, 8, 9]]  # (7, d_model)
    assert torch.equal(bank.base, torch.from_numpy((rows.sum(0) / 7).astype(np.float32)))
    assert bank.vectors.shape == (4, 16) and bank.vectors.dtype == torch.float32
    assert torch.isfinite(bank.vectors).all()
    assert (bank.meta["n_examples"], bank.meta["n_valid"], bank.meta["invalid_examples"]) == (10, 7, [0, 4, 7])
    assert bank.layer == 1 and bank.n_bootstrap == 3 and torch.equal(bank.bootstrap, bank.vectors[1:])


@pytest.mark.parametrize(("replace", "sample_size"), [(True, None), (True, 5), (False, 5)])
def test_bootstrap_vectors_are_numpy_means_of_the_same_draws(replace: bool, sample_size: int | None) -> None:
    valid = _valid(12, 2, {0: [2, 9]})
    diffs = _poison(_diffs(12, 2, 8, seed=1), valid)
    bank = build_bank(diffs, valid, 0, n_bootstrap=4, sample_size=sample_size, replace=replace, seed=7)
    example_index = np.array([i for i in range(12) if i not in (2, 9)])  # row -> example
    rows = diffs[example_index, 0].numpy().astype(np.float64)  # (10, d_model)
    draws = _reference_draws(10, 4, sample_size or 10, replace, seed=7)  # (K, size)
    expected = (rows[draws].sum(axis=1) / draws.shape[1]).astype(np.float32)  # (K, d_model)
    assert torch.equal(bank.bootstrap, torch.from_numpy(expected))
    assert bank.meta["indices"] == example_index[draws].tolist()
    assert (bank.meta["sample_size"], bank.meta["replace"], bank.meta["seed"]) == (sample_size or 10, replace, 7)


def test_bootstrap_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    diffs, valid = _diffs(20, 2, 8), _valid(20, 2, {})
    first, again, other = (build_bank(diffs, valid, 1, n_bootstrap=5, sample_size=None, replace=True, seed=seed)
                           for seed in (3, 3, 4))
    assert torch.equal(first.vectors, again.vectors)
    assert torch.equal(first.base, other.base)
    assert not torch.equal(first.bootstrap, other.bootstrap)
    assert len({tuple(row) for row in first.meta["indices"]}) == 5  # the K draws differ from one another


def test_with_replacement_repeats_examples_and_without_never_does() -> None:
    diffs, valid = _diffs(20, 1, 4), _valid(20, 1, {0: [5]})
    with_replacement = build_bank(diffs, valid, 0, n_bootstrap=6, sample_size=None, replace=True, seed=0)
    assert all(len(set(row)) < 19 for row in with_replacement.meta["indices"])  # 19!/19^19: repeats are certain
    without = build_bank(diffs, valid, 0, n_bootstrap=6, sample_size=18, replace=False, seed=0)
    for row in without.meta["indices"]:
        assert len(row) == 18 and len(set(row)) == 18 and 5 not in row


def test_a_sample_size_above_the_valid_count_is_clamped_and_recorded() -> None:
    valid = _valid(12, 1, {0: [0, 1]})
    diffs = _poison(_diffs(12, 1, 4), valid)
    bank = build_bank(diffs, valid, 0, n_bootstrap=3, sample_size=50, replace=True, seed=0)
    assert (bank.meta["sample_size"], bank.meta["sample_size_requested"], bank.meta["clamped"]) == (10, 50, True)
    assert bank.meta["notes"] == ["bank.sample_size=50 is more than the 10 examples valid at layer 0; clamped to 10"]
    assert all(len(row) == 10 for row in bank.meta["indices"])
    unclamped = build_bank(diffs, valid, 0, n_bootstrap=3, sample_size=10, replace=True, seed=0)
    assert (unclamped.meta["clamped"], unclamped.meta["notes"]) == (False, [])
    assert torch.equal(unclamped.vectors, bank.vectors)  # the clamp draws exactly what sample_size=10 draws


@pytest.mark.parametrize("sample_size", [None, 10, 50])
def test_without_replacement_a_sample_of_every_example_is_refused(sample_size: int | None) -> None:
    valid = _valid(12, 1, {0: [0, 1]})
    diffs = _poison(_diffs(12, 1, 4), valid)
    with pytest.raises(ConfigError, match=r"draws all 10 examples valid at layer 0 without replacement, so every "
                                          r"bootstrap vector would equal the base; set bank.sample_size below 10 "
                                          r"\(e.g. 5\) or bank.replace=true"):
        build_bank(diffs, valid, 0, n_bootstrap=3, sample_size=sample_size, replace=False, seed=0)
    base_only = build_bank(diffs, valid, 0, n_bootstrap=0, sample_size=sample_size, replace=False, seed=0)
    assert base_only.vectors.shape == (1, 4) and base_only.meta["indices"] == []


def test_a_layer_without_valid_examples_names_it_and_the_nearest_usable_layer() -> None:
    valid = _valid(6, 5, {2: list(range(6)), 3: list(range(6))})
    diffs = _poison(_diffs(6, 5, 4), valid)
    with pytest.raises(ConfigError, match=r"no valid examples at layer 3: all 6 differences are non-finite there; "
                                          r"steering.layer=4 is the nearest layer with valid examples"):
        build_bank(diffs, valid, 3, n_bootstrap=2, sample_size=None, replace=True, seed=0)
    nothing = torch.zeros(6, 5, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="no layer has any: re-run extract with extract.dtype=float32"):
        build_bank(diffs, nothing, 0, n_bootstrap=2, sample_size=None, replace=True, seed=0)


@pytest.mark.parametrize("layer", [-1, 5])
def test_a_layer_out_of_range_names_the_value_and_the_range(layer: int) -> None:
    with pytest.raises(ValueError, match=rf"layer={layer} must be in \[0, 5\)"):
        build_bank(_diffs(4, 5, 3), _valid(4, 5, {}), layer, n_bootstrap=1, sample_size=None, replace=True, seed=0)
    with pytest.raises(ValueError, match=rf"layer={layer} must be in \[0, 5\)"):
        stability(_diffs(4, 5, 3), _valid(4, 5, {}), layer, 0)


def test_inconsistent_inputs_are_refused() -> None:
    diffs = _diffs(4, 2, 3)
    with pytest.raises(ValueError, match=r"valid has shape \(4, 3\); it must be \(n_examples, n_layers\) = \(4, 2\)"):
        build_bank(diffs, torch.ones(4, 3, dtype=torch.uint8), 0, n_bootstrap=1, sample_size=None, replace=True, seed=0)
    with pytest.raises(ValueError, match=r"examples \[1\] are marked valid at layer 0 but their diffs hold NaN"):
        build_bank(_poison(diffs, _valid(4, 2, {0: [1]})), _valid(4, 2, {}), 0, n_bootstrap=1, sample_size=None,
                   replace=True, seed=0)
    with pytest.raises(ConfigError, match=r"bank.n_bootstrap=-1 must be >= 0"):
        build_bank(diffs, _valid(4, 2, {}), 0, n_bootstrap=-1, sample_size=None, replace=True, seed=0)
    with pytest.raises(ConfigError, match=r"bank.sample_size=0 must be >= 1"):
        build_bank(diffs, _valid(4, 2, {}), 0, n_bootstrap=1, sample_size=0, replace=True, seed=0)


# ---------------------------------------------------------------- stability


def test_split_half_of_identical_examples_is_one_and_of_opposite_halves_minus_one() -> None:
    same = torch.tensor([1.0, -2.0, 3.0]).expand(9, 1, 3).contiguous()  # (9, 1, 3)
    assert stability(same, _valid(9, 1, {}), 0, seed=0)["split_half_cosine"] == pytest.approx(1.0, abs=1e-12)
    opposite = torch.tensor([[[1.0, -2.0, 3.0]], [[-1.0, 2.0, -3.0]]])  # (2, 1, 3)
    for seed in range(4):  # whichever example lands in which half
        assert stability(opposite, _valid(2, 1, {}), 0, seed=seed)["split_half_cosine"] == pytest.approx(-1.0, abs=1e-12)


def test_stability_figures_match_numpy_and_the_bank_itself() -> None:
    valid = _valid(15, 2, {1: [3, 11]})
    diffs = _poison(torch.randn(15, 2, 32, generator=torch.Generator().manual_seed(5)), valid)
    figures = stability(diffs, valid, 1, seed=2, n_bootstrap=5, sample_size=8, replace=False)
    rows = diffs[[i for i in range(15) if i not in (3, 11)], 1].numpy().astype(np.float64)  # (13, 32)
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(2)).numpy()
    split = _np_cosine(rows[perm[:6]].mean(0), rows[perm[6:]].mean(0))
    base = rows.mean(0)
    cosines = [_np_cosine(rows[draw].mean(0), base) for draw in _reference_draws(13, 5, 8, False, seed=2)]
    assert figures["split_half_cosine"] == pytest.approx(split, abs=1e-12)
    assert figures["bootstrap_cosine_mean"] == pytest.approx(np.mean(cosines), abs=1e-12)
    assert figures["bootstrap_cosine_min"] == pytest.approx(min(cosines), abs=1e-12)
    assert (figures["n_valid"], figures["sample_size"]) == (13, 8)
    bank = build_bank(diffs, valid, 1, n_bootstrap=5, sample_size=8, replace=False, seed=2)
    assert bank.meta["stability"] == {key: figures[key] for key in bank.meta["stability"]}
    defaults = stability(diffs, valid, 1, seed=2)  # BankConfig's defaults: 6 vectors of all, with replacement
    default_bank = build_bank(diffs, valid, 1, n_bootstrap=6, sample_size=None, replace=True, seed=2)
    assert default_bank.meta["stability"] == {key: defaults[key] for key in default_bank.meta["stability"]}


def test_undefined_stability_figures_are_nan() -> None:
    valid = _valid(4, 3, {0: [0, 1, 2, 3], 1: [0, 1, 2]})
    diffs = _poison(_diffs(4, 3, 5), valid)
    empty = stability(diffs, valid, 0, seed=0)
    assert empty["n_valid"] == 0 and all(math.isnan(empty[k]) for k in vector_bank.LAYER_METRICS[1:])
    single = stability(diffs, valid, 1, seed=0)
    assert math.isnan(single["split_half_cosine"]) and single["bootstrap_cosine_min"] == pytest.approx(1.0)
    no_bootstrap = stability(diffs, valid, 2, seed=0, n_bootstrap=0)
    assert math.isnan(no_bootstrap["bootstrap_cosine_mean"]) and not math.isnan(no_bootstrap["split_half_cosine"])
    bank = build_bank(diffs, valid, 1, n_bootstrap=2, sample_size=None, replace=True, seed=0)
    assert bank.meta["stability"]["split_half_cosine"] is None  # NaN is not JSON


# ---------------------------------------------------------------- the bank on disk


def test_save_and_load_round_trip_exactly(tmp_path: Path) -> None:
    valid = _valid(9, 2, {1: [4]})
    diffs = _poison(torch.randn(9, 2, 6, generator=torch.Generator().manual_seed(0)), valid)
    bank = build_bank(diffs, valid, 1, n_bootstrap=3, sample_size=20, replace=True, seed=1, model="smollm2-135m")
    tensors_path, meta_path = bank.save(tmp_path)
    assert (tensors_path, meta_path) == (tmp_path / BANK_TENSORS, tmp_path / BANK_META)
    for loaded in (VectorBank.load(tmp_path), load_bank(tmp_path), load_bank(str(tmp_path))):
        assert torch.equal(loaded.vectors, bank.vectors) and loaded.vectors.dtype == torch.float32
        assert (loaded.layer, loaded.model) == (1, "smollm2-135m")
        assert loaded.meta == {**bank.meta, "n_bootstrap": 3, "d_model": 6}
        assert loaded.meta["notes"] == bank.meta["notes"] != []


def test_a_bank_must_be_a_float32_matrix_with_the_base_first() -> None:
    with pytest.raises(ValueError, match=r"vectors has shape \(4,\); it must be \(1 \+ K, d_model\)"):
        VectorBank(vectors=torch.zeros(4), layer=0, model="m", meta={})
    with pytest.raises(ValueError, match=r"vectors has dtype torch.float64; store the bank as torch.float32"):
        VectorBank(vectors=torch.zeros(2, 4, dtype=torch.float64), layer=0, model="m", meta={})
    with pytest.raises(ValueError, match=r"layer=-2 must be >= 0"):
        VectorBank(vectors=torch.zeros(2, 4), layer=-2, model="m", meta={})


# ---------------------------------------------------------------- the stage


N_EXAMPLES = 24


def _cfg(overrides: str = "") -> Config:
    return load_config("smollm2-135m", overrides)  # 30 layers, d_model 576, steering layer 15


def _extract_run(cfg: Config, tmp_path: Path, valid: torch.Tensor, stage: str = "extract") -> tuple[str, torch.Tensor]:
    """A finished run holding the extract stage's artifacts, written as the extract stage writes them."""
    diffs = _poison(_diffs(N_EXAMPLES, cfg.model.n_layers, cfg.model.d_model, seed=3), valid)
    keep = valid.bool()[..., None]  # (n_examples, n_layers, 1)
    vectors = torch.where(keep, diffs, 0).sum(0) / keep.sum(0).clamp(min=1)  # (n_layers, d_model)
    meta = {"model": cfg.model.alias, "n_layers": cfg.model.n_layers, "d_model": cfg.model.d_model,
            "question_ids": list(range(N_EXAMPLES))}
    root = tmp_path / f"{stage}-artifacts"
    save_tensors(root / CAA_TENSORS, root / CAA_META, {"vectors": vectors, "diffs": diffs, "valid": valid}, meta)
    with stage_run(stage, cfg) as run:
        mlflow.log_artifacts(str(root))
    return run.info.run_id, diffs


def _metric_history(run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, key)}


def test_the_bank_stage_logs_figures_for_every_layer_and_the_bank(tracking: str, tmp_path: Path) -> None:
    cfg = _cfg("bank.n_bootstrap=4,bank.sample_size=100,bank.seed=2")
    valid = _valid(N_EXAMPLES, 30, {15: [0, 5, 6], 3: list(range(N_EXAMPLES)), 20: [1]})
    extract_id, diffs = _extract_run(cfg, tmp_path, valid)
    with stage_run("bank", cfg, tags={artifacts.TAG_EXTRACT_RUN: extract_id}) as run:
        bank = bank_stage.run(cfg, extract_run=extract_id)
    finished = mlflow.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    expected = build_bank(diffs, valid, 15, n_bootstrap=4, sample_size=100, replace=True, seed=2)
    assert torch.equal(bank.vectors, expected.vectors) and bank.layer == 15 and bank.model == "smollm2-135m"
    figures = stability(diffs, valid, 15, 2, n_bootstrap=4, sample_size=100, replace=True)
    metrics = finished.data.metrics
    assert {k: metrics[k] for k in ("n_valid", "sample_size")} == {"n_valid": 21, "sample_size": 21}
    for key in ("split_half_cosine", "bootstrap_cosine_mean", "bootstrap_cosine_min"):
        assert metrics[key] == pytest.approx(figures[key], abs=1e-12)
    n_valid_by_layer = _metric_history(run.info.run_id, "n_valid_by_layer")
    assert n_valid_by_layer == {layer: {3: 0, 15: 21, 20: 23}.get(layer, N_EXAMPLES) for layer in range(30)}
    split_by_layer = _metric_history(run.info.run_id, "split_half_cosine_by_layer")
    assert sorted(split_by_layer) == [layer for layer in range(30) if layer != 3]  # undefined at layer 3
    for layer in (0, 20, 29):
        assert split_by_layer[layer] == pytest.approx(stability(diffs, valid, layer, 2)["split_half_cosine"], abs=1e-12)
    assert set(_metric_history(run.info.run_id, "bootstrap_cosine_min_by_layer")) == set(split_by_layer)
    assert finished.data.params["extract_run"] == extract_id
    assert finished.data.tags[artifacts.TAG_EXTRACT_RUN] == extract_id
    assert "clamped to 21" in finished.data.tags[artifacts.TAG_NOTES]
    logged = load_bank(run.info.run_id)
    assert torch.equal(logged.vectors, bank.vectors) and logged.layer == 15
    assert logged.meta["extract_run"] == extract_id and logged.meta["clamped"] is True
    assert logged.meta["extract_meta"]["question_ids"] == list(range(N_EXAMPLES))
    assert config_from_dict(logged.meta["config"]) == cfg


def test_the_bank_stage_refuses_missing_or_wrong_extract_runs(tracking: str, tmp_path: Path) -> None:
    cfg = _cfg()
    with pytest.raises(ConfigError, match=r"pass --extract-run RUN_ID .* `mlflow runs list --experiment-id ID` or "
                                          r"the MLflow UI; or run the `full` entry point"), mlflow.start_run():
        bank_stage.run(cfg, extract_run="")
    with pytest.raises(ConfigError, match=r"no run 'nope' in the tracking store sqlite:///"), mlflow.start_run():
        bank_stage.run(cfg, extract_run="nope")
    data_id, _ = _extract_run(cfg, tmp_path, _valid(N_EXAMPLES, 30, {}), stage="data")
    with pytest.raises(ConfigError, match=rf"run {data_id} is a 'data' run, not an extract run"), mlflow.start_run():
        bank_stage.run(cfg, extract_run=data_id)
    extract_id, _ = _extract_run(cfg, tmp_path, _valid(N_EXAMPLES, 30, {}))
    other = load_config("gemma-2-2b")
    with pytest.raises(ConfigError, match=rf"extract run {extract_id} was made with model 'smollm2-135m', but this "
                                          r"bank is for 'gemma-2-2b'; pass --model smollm2-135m"), mlflow.start_run():
        bank_stage.run(other, extract_run=extract_id)


def test_a_refused_steering_layer_fails_the_run_but_keeps_every_layers_figures(tracking: str, tmp_path: Path) -> None:
    cfg = _cfg("steering.layer=7")
    extract_id, _ = _extract_run(cfg, tmp_path, _valid(N_EXAMPLES, 30, {7: list(range(N_EXAMPLES))}))
    with pytest.raises(ConfigError, match="no valid examples at layer 7.*steering.layer=6 is the nearest"), \
            stage_run("bank", cfg) as run:
        bank_stage.run(cfg, extract_run=extract_id)
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"
    assert len(_metric_history(run.info.run_id, "split_half_cosine_by_layer")) == 29


def test_the_entry_point_plans_runs_and_refuses_without_an_extract_run(
    tracking: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    extract_id, _ = _extract_run(_cfg(), tmp_path, _valid(N_EXAMPLES, 30, {}))
    runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    monkeypatch.setattr(sys, "argv", ["bank", "--extract-run", extract_id, "--dry-run",
                                      "--overrides", "bank.replace=false,bank.sample_size=12"])
    bank_entry.main()
    out = capsys.readouterr().out
    assert f"extract run: {extract_id}" in out and "base + 6 vectors of 12 examples, without replacement" in out
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before
    monkeypatch.setattr(sys, "argv", ["bank", "--dry-run"])
    with pytest.raises(ConfigError, match="pass --extract-run"):
        bank_entry.main()
    monkeypatch.setattr(sys, "argv", ["bank", "--extract-run", extract_id])
    bank_entry.main()
    (run,) = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`truthsteer.stage` = 'bank'",
                                output_format="list")
    assert run.info.status == "FINISHED" and run.data.tags[artifacts.TAG_EXTRACT_RUN] == extract_id
    assert load_bank(run.info.run_id).n_bootstrap == 6


def test_the_command_line_exits_2_with_the_fix_when_the_extract_run_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["bank", "--dry-run"])
    previous = signal.getsignal(signal.SIGTERM)  # _cli.main installs its own SIGTERM handler
    try:
        with pytest.raises(SystemExit) as exited:
            _cli.main(bank_entry.main)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("error: the bank stage needs the extract run to resample: "
                                              "pass --extract-run RUN_ID")
