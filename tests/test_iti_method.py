"""The iti steering method: its stage on SmolLM2, its variant in evaluate, its place in the registry."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from core.config import ConfigError
from core.config_io import load_config
from core.tracking import stage_run
from stages import evaluate, iti, pipeline
from stages.source_runs import SourceRuns
from steering.iti import ItiDirections
from steering.methods import method
from steering.methods.iti import ItiSteering, top_heads

SMALL = "data.pool=6,data.train=2,data.val=2,data.test=2,iti.pairs_per_question=2,iti.k=4,iti.alpha=8"


def ranked(n: int = 5) -> ItiDirections:
    return ItiDirections(torch.arange(n) % 3, torch.arange(n), torch.eye(n, 4), torch.ones(n),
                         torch.linspace(1, 0.5, n))


def test_top_heads_takes_the_best_first_and_refuses_more_than_ranked() -> None:
    top = top_heads(ranked(), 2)
    assert top.heads.tolist() == [0, 1] and top.accuracies.tolist() == pytest.approx([1.0, 0.875])
    with pytest.raises(ConfigError, match=r"iti.k=6 but the iti run ranked only 5 heads; set iti.k <= 5"):
        top_heads(ranked(), 6)


def test_iti_needs_its_own_stage_only() -> None:
    cfg = load_config("smollm2-135m", "eval.variants=[baseline,iti],judge.trained=x")
    assert pipeline.stages_of(cfg) == ("data", "iti", "evaluate")
    assert method("iti").stage == "iti" and "iti" in pipeline.sections("evaluate", cfg)
    steering = ItiSteering("iti", layer=0, scale=2.0, directions=top_heads(ranked(), 3), source_run="r")
    assert steering.key_fields() == method("iti").key_fields(load_config("smollm2-135m", "iti.k=3,iti.alpha=2"), "r")
    with pytest.raises(ValueError, match="baseline takes no vector or module"):
        ItiSteering("iti", layer=0)


@pytest.mark.slow
def test_the_iti_stage_then_its_variant_in_evaluate(tracking: str, data_csv: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUTHSTEER_OUTPUTS", str(tmp_path))
    cfg = load_config("smollm2-135m", f"data.source={data_csv},{SMALL},eval.variants=[baseline,iti],"
                                      "eval.judges=[semantic,mc],eval.max_new_tokens=8,eval.n_bootstrap=50")
    with stage_run("iti", cfg) as run:
        heads = iti.run(cfg)
    n_heads = cfg.model.n_layers * 9  # SmolLM2-135M: 9 heads per layer
    assert heads.layers.shape == (n_heads,) and bool((heads.accuracies[:-1] >= heads.accuracies[1:]).all())
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert logged["n_examples"] == 2 * 2 * 6 and 0.5 <= logged["best_accuracy"] <= 1.0
    sources = SourceRuns.parse("", f"iti={run.info.run_id}")
    with stage_run("evaluate", cfg):
        result = evaluate.run(cfg, sources=sources, progress=False)
    assert list(result.run_ids) == ["baseline", "iti"]
    steered = result.metrics["iti"]
    assert steered["steered_tokens_per_answer"] == 8 and steered["mc_steered_tokens_per_answer"] > 0
    assert result.metrics["baseline"]["steered_tokens_per_answer"] == 0
    assert {r["variant_hash"] for r in result.rows if r["variant"] == "iti"} == {
        evaluate.variant_key(cfg, "iti", sources)}
    answers = {v: [r["answer"] for r in result.rows if r["variant"] == v] for v in ("baseline", "iti")}
    assert answers["iti"] != answers["baseline"]  # 4 heads at alpha 8 change SmolLM2's answers
