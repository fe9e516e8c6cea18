"""Knobs that transfer across model sizes: a relative steering scale and warm-started studies.

Oracles: the residual norm ``extract`` measures equals the per-token norms of ``output_hidden_states``
(final norm removed) over the answer tokens; a relative scale of r adds, at the steered layer's output,
a vector whose norm is r times that measured norm (the steered minus the unsteered hidden state, no
formula of the code); a warm-started study's first trials are the source study's best, read from the
source's Optuna storage and converted by hand from two extractions made here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from analysis import sweeps
from analysis.runs import Missing
from analysis.tables import VARIANT_COLUMNS
from core import artifacts
from core.config import Config, ConfigError
from core.config_io import load_config
from core.data import splits_for
from core.models import LoadedModel
from core.tracking import stage_run
from stages import pipeline, tune_storage
from stages.evaluate import scale_metrics
from stages.train import bank_scales
from stages.tune_scoring import ATTR_RELATIVE_SCALE, save_extraction
from stages.tune_space import Axis
from stages.tune_warm import nearest
from steering.extract import Extraction, contrastive_pairs, encode_pairs, extract_caa
from steering.hooks import masked_mean
from steering.methods import caa
from tests.test_tune import load_study, run_tiny, tiny_cfg, tiny_loaded
from tests.tiny_models import _TEXT, BOS_ID, EOS_ID, PAD_ID, make_tokenizer

optuna.logging.set_verbosity(optuna.logging.WARNING)


def extraction_of(cfg: Config, loaded: LoadedModel) -> Extraction:
    pairs = contrastive_pairs(splits_for(cfg)["pool"], cfg.extract.pairs_per_question, cfg.data.seed)
    return extract_caa(loaded, pairs, batch_size=cfg.extract.batch_size, max_length=cfg.extract.max_length)


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Every decoder layer's raw output (the final norm switched off), by a plain forward."""
    mask = batch["attention_mask"]
    decoder = model.get_decoder()
    final_norm, decoder.norm = decoder.norm, nn.Identity()
    try:
        with torch.no_grad():
            states = model(input_ids=batch["input_ids"], attention_mask=mask,
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True).hidden_states
    finally:
        decoder.norm = final_norm
    return tuple(states[1:])  # (rows, seq, d_model) per layer


def logged_extraction(extraction: Extraction) -> str:
    """An extract-like run holding ``extraction``'s artifacts; its id."""
    with stage_run("extract", tiny_cfg()) as run, tempfile.TemporaryDirectory() as tmp:
        save_extraction(extraction, Path(tmp) / "x")
        mlflow.log_artifacts(str(Path(tmp) / "x"))
    return str(run.info.run_id)


@pytest.mark.oracle
def test_the_residual_norm_is_the_mean_token_norm_of_the_hidden_states(tracking: str) -> None:
    cfg = tiny_cfg()
    loaded = tiny_loaded(cfg)
    extraction = extraction_of(cfg, loaded)
    assert extraction.resid_norm is not None and extraction.resid_norm.shape == (3,)
    pairs = contrastive_pairs(splits_for(cfg)["pool"], 1, cfg.data.seed)
    batch = encode_pairs(loaded, pairs, cfg.extract.max_length)
    states = hidden_states(loaded.model, batch)
    n = len(pairs)
    for layer, state in enumerate(states):
        per_row = masked_mean(state.norm(dim=-1, keepdim=True), batch["answer_mask"])[:, 0]  # (2n,)
        expected = float(((per_row[:n] + per_row[n:]) / 2).mean())
        assert math.isclose(float(extraction.resid_norm[layer]), expected, rel_tol=1e-5), layer


@pytest.mark.oracle
@pytest.mark.parametrize("relative", [0.25, -0.5])
def test_a_relative_scale_adds_that_fraction_of_the_residual_norm(tracking: str, relative: float) -> None:
    cfg = tiny_cfg("steering.layer=1", "steering.scale_mode=relative", f"steering.scale={relative}")
    loaded = tiny_loaded(cfg)
    extraction = extraction_of(cfg, loaded)
    run_id = logged_extraction(extraction)
    steering = caa.load(cfg, run_id)
    assert steering.relative_scale == pytest.approx(relative, rel=1e-6)
    assert caa.key_fields(cfg, run_id) == steering.key_fields()  # the no-load key resolves the same multiplier
    batch = encode_pairs(loaded, contrastive_pairs(splits_for(cfg)["val"], 1, 0)[:3], 120)
    plain = hidden_states(loaded.model, batch)[1]
    with steering.applied(loaded.model, batch["prompt_end"]):
        steered = hidden_states(loaded.model, batch)[1]
    added = (steered - plain).norm(dim=-1)  # (rows, seq)
    for row, end in enumerate(batch["prompt_end"].tolist()):
        assert float(added[row, :end].abs().max()) < 1e-5  # before the prompt's end nothing is added
        measured = abs(relative) * float(extraction.resid_norm[1])  # type: ignore[index]
        assert torch.allclose(added[row, end:], torch.full_like(added[row, end:], measured), rtol=1e-4)
    assert scale_metrics(steering) == {"steering_scale": steering.scale, "steering_scale_relative": steering.relative_scale}
    absolute = caa.load(dataclasses.replace(cfg, steering=dataclasses.replace(cfg.steering, scale_mode="absolute")), run_id)
    assert absolute.scale == relative and absolute.relative_scale == pytest.approx(
        relative * float(extraction.vectors[1].norm()) / float(extraction.resid_norm[1]), rel=1e-6)  # type: ignore[index]
    # an MLP module mixing a bank of this extraction resolves the same multiplier
    meta = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifacts.CAA_META)).read_text())
    assert bank_scales(cfg, {"extract_meta": meta}, "bank") == (steering.scale, steering.relative_scale)


def test_scale_mode_errors_name_the_value_and_the_fix(tracking: str) -> None:
    with pytest.raises(ConfigError, match="steering.scale_mode='fraction' is not one of absolute, relative"):
        tiny_cfg("steering.scale_mode=fraction")
    cfg = tiny_cfg("steering.layer=1", "steering.scale_mode=relative")
    old = dataclasses.replace(extraction_of(cfg, tiny_loaded(cfg)), resid_norms=None)  # saved before norms existed
    with pytest.raises(ConfigError, match="predates steering.scale_mode=relative; run extract again"):
        caa.load(cfg, logged_extraction(old))
    with pytest.raises(ConfigError, match="warm_start=abc converts caa's layer and scale.*--sampler tpe"):
        tune_storage.TuneSettings(sampler="grid", warm_start="abc")


def test_a_relative_study_records_relative_scales_and_full_reads_them_as_relative(tracking: str, outputs: Path) -> None:
    cfg = tiny_cfg("steering.scale_mode=relative")
    settings = tune_storage.TuneSettings(n_trials=3, heartbeat=0, axes={"layers": "0:2"})
    assert settings.search_space(cfg)["scale"].high == 1.0  # relative scales search 0:1 by default
    outcome, run_id = run_tiny(cfg, settings)
    trials = load_study(settings, cfg).trials
    assert all(t.user_attrs[ATTR_RELATIVE_SCALE] == pytest.approx(t.params["scale"]) for t in trials)
    # analysis draws the trials against the multiplier they steered with, never their relative param
    frame = mlflow.search_runs(search_all_experiments=True, output_format="pandas")
    table = sweeps.tune_trials(frame, Missing(), {"mc2": True})
    assert table["multiplier"].notna().all() and not np.allclose(table["multiplier"], table["scale"])
    sweep = sweeps.scale_sweep_table(pd.DataFrame(columns=VARIANT_COLUMNS), table, {}, None)
    at_best = table[table["layer"] == sweep["layer"].iloc[0]]
    assert sorted(sweep["scale"]) == pytest.approx(sorted(at_best["multiplier"]))
    old = table.drop(columns="multiplier").assign(multiplier=math.nan)  # trials logged before the metric
    assert sweeps.scale_sweep_table(pd.DataFrame(columns=VARIANT_COLUMNS), old, {}, None).empty  # left out: their unit is not a multiplier
    tuned = load_config("smollm2-135m", pipeline.tuned_overrides(run_id))
    assert (tuned.steering.scale_mode, tuned.steering.scale) == ("relative", outcome.best_params["scale"])
    with pytest.raises(ConfigError, match="different scale_mode"):  # a study's scales keep one unit
        run_tiny(tiny_cfg(), dataclasses.replace(settings, study_name=outcome.study_name))


def six_layer_loaded(cfg: Config) -> LoadedModel:
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**{**_TEXT, "num_hidden_layers": 6}, tie_word_embeddings=False))
    model.set_attn_implementation("eager")
    model.generation_config.pad_token_id, model.generation_config.bos_token_id = PAD_ID, BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return LoadedModel(spec=cfg.model, model=model.float().eval(), tokenizer=make_tokenizer(), dtype=torch.float32,
                       device=torch.device("cpu"), prompt_format="qa")


def test_a_warm_started_study_first_runs_the_source_best_converted(tracking: str, outputs: Path) -> None:
    source_cfg = tiny_cfg()
    source_settings = tune_storage.TuneSettings(n_trials=5, heartbeat=0, axes={"layers": "0:2", "scales": "0:6"})
    _, source_run = run_tiny(source_cfg, source_settings)
    ranked = sorted((t for t in load_study(source_settings, source_cfg).trials if t.state == TrialState.COMPLETE),
                    key=lambda t: -float(t.value))  # type: ignore[arg-type]
    source_x = extraction_of(source_cfg, tiny_loaded(source_cfg))
    cfg = tiny_cfg("model.alias=tiny-llama6", "model.n_layers=6")
    loaded = six_layer_loaded(cfg)
    target_x = extraction_of(cfg, loaded)
    expected: list[tuple[int, float]] = []
    for t in ranked:  # by hand: the same depth fraction, the same share of the residual norm
        layer = round(t.params["layer"] / 3 * 6)
        share = t.params["scale"] * float(source_x.vectors[t.params["layer"]].norm()) / float(source_x.resid_norm[t.params["layer"]])  # type: ignore[index]
        scale = min(8.0, share * float(target_x.resid_norm[layer]) / float(target_x.vectors[layer].norm()))  # type: ignore[index]
        if (layer, pytest.approx(scale, rel=1e-4)) not in expected and len(expected) < 3:
            expected.append((layer, pytest.approx(scale, rel=1e-4)))
    settings = tune_storage.TuneSettings(n_trials=len(expected) + 1, heartbeat=0, warm_start=source_run,
                                         axes={"layers": "0:5", "scales": "0:8"})
    with stage_run("tune", cfg):
        from stages import tune

        tune.run(cfg, settings, loaded=loaded)
    first = load_study(settings, cfg).trials[:len(expected)]
    assert [(t.params["layer"], t.params["scale"]) for t in first] == expected
    assert all(t.state == TrialState.COMPLETE for t in first)


def test_nearest_moves_a_value_into_the_search_space() -> None:
    assert nearest(Axis("layer", True, 2, 10, 2), 11.0) == 10 and nearest(Axis("layer", True, 2, 10, 2), 5.2) == 6
    assert nearest(Axis("scale", False, 0.0, 1.0), -3.0) == 0.0
    assert nearest(Axis("scale", False, choices=(1.0, 2.0, 4.0)), 3.1) == 4.0
