"""MC1/MC2, per-variant metrics and runs, the evaluate and score stages.

Fast (tiny models, in-memory rows, a throw-away tracking store): teacher-forced answer log-probs
== a hand computation from one unbatched forward per answer, under steering; MC1/MC2 from those;
the metrics of a variant == the statistics of its per-question values; nested runs per variant with
identical metric names, the tables in the parent; re-scoring a run; failures that name their fix.
Slow (smollm2-135m): an evaluation killed with SIGKILL and restarted ends with the table of an
uninterrupted one and regenerates nothing; all four variants from real extract/bank/train runs,
every judge, then ``score``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch

from core import artifacts
from core.config import Config, ConfigError, EvalConfig
from core.config_io import load_config
from core.data import Question, question_id
from core.tracking import stage_run
from evaluation import judge_loading, variant_metrics
from evaluation.generate import generate_batch
from evaluation.judges import JudgeError, JudgeItem, make_judge
from evaluation.mc import MCJudge, answer_logprobs, mc_choices, mc_metrics
from evaluation.metrics import BleuJudge
from evaluation.statistics import bootstrap_ci, mcnemar, paired_difference
from evaluation.verdicts import InvalidRateExceeded
from stages import evaluate, score
from stages.source_runs import SourceRuns
from steering.hooks import active_hooks, steer
from steering.methods.intervention import Steering
from steering.prompts import answer_text, encode_text, format_prompt
from tests.conftest import DATA_CSV, PROJECT_DIR, kill_once_stored
from tests.test_generate import LAYER, tiny_loaded, vector
from tests.tiny_models import TINY_ARCHS

QA = [
    ("Can pigs fly?", "No, pigs cannot fly", ["No", "Pigs cannot fly on their own."], ["Yes, pigs fly", "Sometimes"]),
    ("What colour is the sky on a clear day?", "Blue.", ["It is blue"], ["Green", "The sky is red.", "Black"]),
    ("Is the Earth flat?", "No", ["No, it is round"], ["Yes"]),
]


def questions() -> list[Question]:
    return [Question(id=question_id(q), question=q, category=["Misc", "Science", "Misc"][i], type="t",
                     best_answer=best, correct_answers=tuple(dict.fromkeys([best, *correct])),
                     incorrect_answers=tuple(incorrect)) for i, (q, best, correct, incorrect) in enumerate(QA)]


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config("smollm2-135m", "eval.n_bootstrap=200,eval.batch_size=4")


# ---------------------------------------------------------------- MC1 / MC2


@torch.no_grad()
def hand_logprob(loaded: Any, question: str, answer: str, steering: Steering) -> float:
    """One unbatched forward of prompt + answer; the sum of the answer tokens' log-probs."""
    tokenizer = loaded.tokenizer
    prompt_ids = encode_text(tokenizer, format_prompt(question, tokenizer, "qa"))
    answer_ids = tokenizer(answer_text(answer, "qa"), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])  # (1, seq)
    with contextlib.ExitStack() as stack:
        if steering.vector is not None:
            start = torch.tensor([len(prompt_ids) - 1]) if steering.positions == "from_prompt_end" else None
            stack.enter_context(steer(loaded.model, LAYER, vector=steering.vector, scale=steering.scale,
                                      start_positions=start))
        logprobs = loaded.model(input_ids=ids).logits[0].double().log_softmax(dim=-1)  # (seq, vocab)
    return float(sum(logprobs[len(prompt_ids) - 1 + i, t] for i, t in enumerate(answer_ids)))


@pytest.mark.oracle
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_answer_logprobs_equal_a_hand_computation_under_steering(arch: str) -> None:
    loaded = tiny_loaded(arch)
    items = [JudgeItem.from_question(q, "") for q in questions()]
    choices = [mc_choices(i) for i in items]
    flat_q = [i.question for i, (c, w, _) in zip(items, choices, strict=True) for _ in (*c, *w)]
    flat_a = [a for c, w, _ in choices for a in (*c, *w)]
    seen = []
    for positions in ("from_prompt_end", "all"):  # the shared-prompt cache, and full forwards
        for steering in (Steering.baseline(), Steering("caa", layer=LAYER, scale=1.0, vector=vector(loaded),
                                                       positions=positions, source_run="r")):
            got, _ = answer_logprobs(loaded, flat_q, flat_a, steering, batch_size=3, max_length=256)
            expected = [hand_logprob(loaded, q, a, steering) for q, a in zip(flat_q, flat_a, strict=True)]
            assert got == pytest.approx(expected, abs=1e-4)
            seen.append(got)
    assert seen[1] != pytest.approx(seen[0], abs=1e-2) and seen[3] != pytest.approx(seen[1], abs=1e-2)
    assert active_hooks(loaded.model) == 0


@pytest.mark.oracle
def test_mc_judge_equals_mc1_and_mc2_by_hand() -> None:
    loaded = tiny_loaded("llama")
    steering = Steering("caa", layer=LAYER, scale=1.0, vector=vector(loaded), source_run="r")
    items = [JudgeItem.from_question(q, "ignored") for q in questions()]
    rows = MCJudge(batch_size=4).bind(loaded, steering).score(items)
    for item, row in zip(items, rows, strict=True):
        correct, incorrect, best = mc_choices(item)
        true = [hand_logprob(loaded, item.question, a, steering) for a in correct]
        false = [hand_logprob(loaded, item.question, a, steering) for a in incorrect]
        assert row["mc1"] == int(true[best] > max(false))
        mass_true = sum(math.exp(v) for v in true)
        assert row["mc2"] == pytest.approx(mass_true / (mass_true + sum(math.exp(v) for v in false)), rel=1e-6)


def test_mc_choices_follow_truthfulqa_formatting() -> None:
    correct, incorrect, best = mc_choices(JudgeItem.from_question(questions()[0], ""))
    assert correct == ["No, pigs cannot fly.", "No.", "Pigs cannot fly on their own."] and best == 0
    assert incorrect == ["Yes, pigs fly.", "Sometimes."]


def test_mc_metrics_by_hand_and_without_underflow() -> None:
    out = mc_metrics([-1.0, -2.0], [-1.5, -3.0], 0)
    mass = math.exp(-1) + math.exp(-2)
    assert out["mc1"] == 1 and out["mc2"] == pytest.approx(mass / (mass + math.exp(-1.5) + math.exp(-3)))
    assert mc_metrics([-1.0, -2.0], [-1.5, -3.0], 1)["mc1"] == 0
    assert mc_metrics([-1.0], [-1.0], 0)["mc1"] == 0  # a tie is not a win, as in TruthfulQA
    long = mc_metrics([-2000.0], [-2001.0], 0)  # exp underflows to 0 for both
    assert long["mc2"] == pytest.approx(1 / (1 + math.exp(-1)))


def test_mc_judge_is_registered_and_refuses_to_score_unbound(cfg: Config) -> None:
    judge = make_judge("mc", cfg)
    assert isinstance(judge, MCJudge) and (judge.batch_size, judge.max_length) == (4, cfg.extract.max_length)
    with pytest.raises(JudgeError, match=r"call judge.bind\(loaded_model, steering\)"):
        judge.score([JudgeItem.from_question(questions()[0], "")])


# ---------------------------------------------------------------- metrics of a variant


class FlakyJudge:
    """A fake LLM judge: invalid on the rows listed, else 1 when the answer is the best one."""

    name = "llm"
    metrics = {"llm_truthful": True, "llm_invalid_rate": False}

    def __init__(self, invalid: Sequence[int]) -> None:
        self.invalid = set(invalid)

    def score(self, items: Sequence[JudgeItem]) -> list[dict[str, Any]]:
        return [{"llm_truthful": None if i in self.invalid else int(item.answer == item.best_answer),
                 "llm_valid": i not in self.invalid, "llm_raw": f"raw {i}"} for i, item in enumerate(items)]

    def aggregate(self, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        from evaluation.judges import aggregate_judge

        return aggregate_judge(self.name, self.metrics, rows)


def rows_for(answers: Sequence[str], variant: str) -> list[dict[str, Any]]:
    qs = (questions() * 4)[:len(answers)]
    return [{"qid": f"{q.id}-{i}", "question": q.question, "category": q.category, "variant": variant,
             "answer": a, "best_answer": q.best_answer, "correct_answers": list(q.correct_answers),
             "incorrect_answers": list(q.incorrect_answers), "n_new_tokens": 3, "truncated": False}
            for i, (q, a) in enumerate(zip(qs, answers, strict=True))]


BASE_ANSWERS = ["No, pigs cannot fly", "Green", "Yes", "Sometimes", "Blue.", "No"]
STEERED_ANSWERS = ["No, pigs cannot fly", "Blue.", "No", "Yes, pigs fly", "Blue.", "No"]


def test_variant_metrics_equal_the_statistics_of_per_question_values() -> None:
    judges: list[Any] = [BleuJudge(), FlakyJudge(invalid=[1])]
    base = variant_metrics.score_rows(judges, rows_for(BASE_ANSWERS, "baseline"))
    steered = variant_metrics.score_rows(judges, rows_for(STEERED_ANSWERS, "caa"))
    out = variant_metrics.variant_metrics(judges, steered, base, n_bootstrap=300, confidence=0.9, seed=2)
    for metric in ("bleu_acc", "bleu_max"):
        a, b = [r[metric] for r in steered], [r[metric] for r in base]
        assert (out[metric], out[f"{metric}_ci_low"], out[f"{metric}_ci_high"]) == pytest.approx(
            bootstrap_ci(a, 300, 0.9, 2))
        assert (out[f"{metric}_delta"], out[f"{metric}_delta_ci_low"], out[f"{metric}_delta_ci_high"]) == \
            pytest.approx(paired_difference(a, b, 300, 0.9, 2))
    assert out["bleu_acc_mcnemar_p"] == mcnemar([r["bleu_acc"] for r in steered], [r["bleu_acc"] for r in base])[1]
    assert "bleu_max_mcnemar_p" not in out and "bleu_diff_mcnemar_p" not in out  # not binary
    # The invalid row is left out of the mean, the interval and the pairing; it counts in the rate.
    truthful = [None if i == 1 else int(a == q) for i, (a, q) in
                enumerate(zip(STEERED_ANSWERS, [r["best_answer"] for r in steered], strict=True))]
    assert out["llm_truthful"] == pytest.approx(sum(v for v in truthful if v is not None) / 5)
    assert out["llm_invalid_rate"] == pytest.approx(1 / 6)
    assert "llm_truthful_mcnemar_p" in out
    assert (out["n_questions"], out["mean_new_tokens"], out["truncated_rate"]) == (6.0, 3.0, 0.0)
    own = variant_metrics.variant_metrics(judges, base, base, n_bootstrap=300, confidence=0.9, seed=2)
    assert set(own) == set(out)  # the baseline has the same names: zero deltas, p = 1
    assert own["bleu_acc_delta"] == 0.0 and own["bleu_acc_mcnemar_p"] == 1.0


def test_source_runs_fail_early_naming_the_flag() -> None:
    sources = SourceRuns.parse("d1", "caa=e1")
    sources.check(["baseline", "caa"])
    with pytest.raises(ConfigError, match=r"mlp_mc needs a train stage run with branch mc or both; mlp_gen needs a "
                                          r"train stage run .*--sources 'mlp_mc=<run id>\|mlp_gen=<run id>'"):
        sources.check(["caa", "mlp_mc", "mlp_gen"])
    with pytest.raises(ConfigError, match=r"has 'ica', which is not a steering method; choose from baseline, caa, mlp_mc"):
        sources.check(["baseline", "ica"])
    assert sources.params() == {"run.data": "d1", "run.extract": "e1"}
    assert SourceRuns.from_params({"run.extract": "e1", "run.train_mc": "t", "run.data": "d"}) == \
        SourceRuns.parse("d", "mlp_mc=t | caa=e1")
    for bad, message in (("caa", "is not variant=RUN"), ("baseline=x", "reads no run"), ("ica=x", "not a steering")):
        with pytest.raises(ConfigError, match=message):
            SourceRuns.parse("", bad)
    assert evaluate.ordered_variants(["caa", "mlp_gen", "baseline", "caa"]) == ["baseline", "caa", "mlp_gen"]


def test_the_main_model_is_the_judge_when_alias_and_device_match(cfg: Config) -> None:
    import dataclasses

    from core.config_io import model_spec

    main = dataclasses.replace(tiny_loaded("llama"), spec=model_spec("smollm2-135m"))
    cpu_cfg = load_config("smollm2-135m", "runtime.judge_device=cpu,judge.model=smollm2-135m")
    assert judge_loading.load_judge_model(cpu_cfg, ["bleu", "llm_logprob"], main) is main
    assert judge_loading.load_judge_model(cpu_cfg, ["bleu", "semantic", "mc"], main) is None  # no LLM judge


def test_run_fails_before_loading_when_a_source_run_is_missing(tracking: str, cfg: Config) -> None:
    with stage_run("evaluate", cfg), pytest.raises(ConfigError, match="caa needs an extract stage run"):
        evaluate.run(cfg)  # eval.variants defaults to all four


# ---------------------------------------------------------------- runs, tables, score


def tiny_rows(cfg: Config) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Steering], Any]:
    loaded = tiny_loaded("llama")
    steerings = {"baseline": Steering.baseline(),
                 "caa": Steering("caa", layer=LAYER, scale=1.0, vector=vector(loaded), source_run="r")}
    decoding = EvalConfig(max_new_tokens=6, batch_size=4)
    rows = {}
    for variant, steering in steerings.items():
        answers = generate_batch(loaded, [q.question for q in questions()], steering, decoding)
        rows[variant] = [evaluate.table_row(q, {"variant_hash": "h", "answer": a.text, "raw_answer": a.raw,
                                                "n_new_tokens": a.n_new_tokens, "truncated": a.truncated},
                                            model="tiny-llama", dtype="float32", steering=steering)
                         for q, a in zip(questions(), answers, strict=True)]
    return rows, steerings, loaded


def metric_keys(run_id: str) -> set[str]:
    return set(mlflow.get_run(run_id).data.metrics)


@pytest.mark.oracle
def test_judge_and_log_makes_one_nested_run_per_variant_with_the_same_metrics(tracking: str, cfg: Config) -> None:
    rows, steerings, loaded = tiny_rows(cfg)
    judges = [make_judge("bleu", cfg), make_judge("rouge", cfg), make_judge("mc", cfg)]

    def judges_for(variant: str) -> list[Any]:
        return [j.bind(loaded, steerings[variant]) if isinstance(j, MCJudge) else j for j in judges]

    info = {v: {"model": "tiny-llama", "dtype": "float32", "layer": s.layer, "scale": s.scale if s.layer else None}
            for v, s in steerings.items()}
    printed = io.StringIO()
    with stage_run("evaluate", cfg) as parent, contextlib.redirect_stdout(printed):
        result = evaluate.judge_and_log(cfg, rows, judges_for, info,
                                        extra_metrics={v: {"n_generated": 3.0} for v in rows})
    client = mlflow.MlflowClient()
    children = {r.data.tags["truthsteer.variant"]: r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(children) == {"baseline", "caa"} == set(result.run_ids)
    caa = children["caa"]
    assert caa.info.run_name == "caa-tiny-llama" and caa.info.status == "FINISHED"
    assert {k: caa.data.tags[f"truthsteer.{k}"] for k in ("variant", "layer", "scale", "dtype")} == {
        "variant": "caa", "layer": "1", "scale": "1.0", "dtype": "float32"}
    assert "truthsteer.layer" not in children["baseline"].data.tags  # baseline steers no layer
    assert metric_keys(caa.info.run_id) == metric_keys(children["baseline"].info.run_id)
    expected = {"mc1", "mc1_ci_low", "mc1_ci_high", "mc1_delta", "mc1_delta_ci_low", "mc1_delta_ci_high",
                "mc1_mcnemar_p", "mc2_delta", "bleu_acc_mcnemar_p", "rougeL_max", "mc_invalid_rate",
                "n_generated", "n_questions"}
    assert expected <= metric_keys(caa.info.run_id) and "mc2_mcnemar_p" not in metric_keys(caa.info.run_id)
    assert caa.data.metrics["mc1"] == result.metrics["caa"]["mc1"]
    # MC in the caa run is the steered model's, not the baseline's.
    assert result.metrics["caa"]["mc2"] != result.metrics["baseline"]["mc2"]

    listed = {f.path for f in client.list_artifacts(parent.info.run_id, "evaluate")}
    assert {artifacts.GENERATIONS, artifacts.GENERATIONS_CSV, artifacts.GENERATIONS_TABLE, artifacts.PER_CATEGORY,
            artifacts.SUMMARY_MD, artifacts.SUMMARY_CSV} <= listed
    saved = [json.loads(line) for line in
             Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path=artifacts.GENERATIONS))
             .read_text().splitlines()]
    assert [(r["variant"], r["qid"], r["answer"]) for r in saved] == [
        (v, r["qid"], r["answer"]) for v in rows for r in rows[v]]
    assert {"mc1", "mc2", "bleu_acc", "rouge1_max", "dtype", "category", "correct_answers"} <= set(saved[0])
    summary = client.download_artifacts(parent.info.run_id, artifacts.SUMMARY_MD)
    text = Path(summary).read_text()
    assert "| mc1 |" in text and "## Against baseline" in text and text in printed.getvalue()
    # The run's own comparison: a figure, and a table whose every number is the variant run's metric.
    assert {artifacts.COMPARISON_FIGURE, artifacts.COMPARISON_TABLE} <= listed
    table = mlflow.load_table(artifacts.COMPARISON_TABLE, run_ids=[parent.info.run_id])
    assert set(table["metric"]) == {"mc2", "mc1", "bleu_acc", "rougeL_acc"} and set(table["variant"]) == {"baseline", "caa"}
    for row in table.to_dict("records"):
        logged = children[row["variant"]].data.metrics
        for column, key in (("value", ""), ("ci_low", "_ci_low"), ("delta", "_delta"),
                            ("delta_ci_high", "_delta_ci_high")):
            expected = logged.get(f"{row['metric']}{key}", float("nan"))
            assert row[column] == pytest.approx(expected, nan_ok=True), (row, column)
        assert row["n_questions"] == logged["n_generated"] + logged.get("n_reused", 0.0)


def test_an_invalid_rate_above_the_ceiling_fails_the_variant_run(tracking: str, cfg: Config) -> None:
    rows, steerings, _ = tiny_rows(cfg)
    info = {v: {"model": "tiny-llama", "dtype": "float32", "layer": None, "scale": None} for v in rows}
    with pytest.raises(InvalidRateExceeded, match="llm_invalid_rate=0.667 exceeds judge.invalid_ceiling=0.500"), \
            stage_run("evaluate", cfg) as parent:
        evaluate.judge_and_log(cfg, {"baseline": rows["baseline"]}, lambda v: [FlakyJudge(invalid=[0, 1])], info)
    (child,) = mlflow.MlflowClient().search_runs([parent.info.experiment_id],
                                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert child.info.status == "FAILED" and child.data.metrics["llm_invalid_rate"] == pytest.approx(2 / 3)


def test_score_rescores_saved_answers_into_a_new_tagged_run(tracking: str, cfg: Config) -> None:
    rows, steerings, _ = tiny_rows(cfg)
    info = {v: {"model": "tiny-llama", "dtype": "float32", "layer": s.layer, "scale": s.scale if s.layer else None}
            for v, s in steerings.items()}
    with stage_run("evaluate", cfg) as source, contextlib.redirect_stdout(io.StringIO()):
        evaluate.judge_and_log(cfg, rows, lambda v: [make_judge("rouge", cfg)], info)
    rescore_cfg = load_config("smollm2-135m", "eval.judges=[bleu],eval.n_bootstrap=200")
    with stage_run("score", rescore_cfg) as run, contextlib.redirect_stdout(io.StringIO()):
        result = score.run(rescore_cfg, source_run=source.info.run_id)
    assert mlflow.get_run(run.info.run_id).data.tags[artifacts.TAG_SOURCE_RUN] == source.info.run_id
    assert [r["answer"] for r in result.rows] == [r["answer"] for v in rows for r in rows[v]]
    assert "bleu_acc" in result.rows[0] and "rouge1_max" not in result.rows[0]  # old verdicts replaced
    for variant, run_id in result.run_ids.items():
        child = mlflow.get_run(run_id)
        assert child.data.tags[artifacts.TAG_VARIANT] == variant and child.data.tags[artifacts.TAG_SOURCE_RUN]
        assert "bleu_acc_delta" in child.data.metrics and "rouge1_max" not in child.data.metrics
    bleu = BleuJudge()
    expected = bleu.aggregate(bleu.score([variant_metrics.judge_item(r) for r in rows["caa"]]))["bleu_max"]
    assert result.metrics["caa"]["bleu_max"] == pytest.approx(expected)

    local = mlflow.artifacts.download_artifacts(run_id=source.info.run_id, artifact_path=artifacts.GENERATIONS)
    with stage_run("score", rescore_cfg) as run, contextlib.redirect_stdout(io.StringIO()):
        from_file = score.run(rescore_cfg, generations=local)
    assert from_file.metrics == result.metrics
    assert mlflow.get_run(run.info.run_id).data.tags[artifacts.TAG_SOURCE_RUN] == str(Path(local).resolve())
    with pytest.raises(ConfigError, match="exactly one of --source-run"), stage_run("score", rescore_cfg):
        score.run(rescore_cfg)
    mc_cfg = load_config("smollm2-135m", "eval.judges=[mc]")
    with pytest.raises(ConfigError, match="mc judge scores the model.*pass --source-run"), stage_run("score", mc_cfg):
        score.run(mc_cfg, generations="x.jsonl")


def run_entrypoint(module: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    import importlib

    from entrypoints import _cli

    entry = importlib.import_module(f"entrypoints.{module}")
    old = sys.argv
    sys.argv = [module, *argv]
    code = 0
    try:
        _cli.main(entry.main)
    except SystemExit as err:
        code = int(err.code or 0)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_prints_the_plan_and_missing_sources_fail_in_one_line(
        tracking: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TRUTHSTEER_OUTPUTS", str(tmp_path))
    code, out, _ = run_entrypoint("evaluate", ["--data", str(DATA_CSV), "--variants", "baseline|caa", "--sources", "caa=e1", "--judge",
                                               "gemma-3-270m", "--overrides", "eval.judges=[llm_logprob,semantic]",
                                               "--dry-run"], capsys)
    assert code == 0 and "dry run of evaluate" in out and f"generation store: {tmp_path}/evaluate/" in out
    assert "variant caa: hash" in out and "source run e1; 0 answers stored" in out
    assert "judge model gemma-3-270m" in out and "variants:\n  - baseline\n  - caa" in out
    code, _, err = run_entrypoint("evaluate", ["--data", str(DATA_CSV), "--variants", "baseline|mlp_gen", "--dry-run"],
                                  capsys)
    assert code == 2 and "mlp_gen needs a train stage run" in err and "--sources 'mlp_gen=<run id>'" in err
    (tmp_path / "g.jsonl").write_text("{}\n")
    code, out, _ = run_entrypoint("score", ["--generations", str(tmp_path / "g.jsonl"), "--judges", "semantic|bleu",
                                            "--dry-run"], capsys)
    assert code == 0 and "judges: semantic, bleu" in out
    code, _, err = run_entrypoint("score", ["--generations", str(tmp_path / "none.jsonl"), "--judges", "bleu"],
                                  capsys)
    assert code == 2 and "none.jsonl does not exist" in err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []  # no run was started


# ---------------------------------------------------------------- slow: smollm2-135m


def _env(tracking: str, outputs: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking, "TRUTHSTEER_OUTPUTS": str(outputs),
            "MLFLOW_DISABLE_TELEMETRY": "true"}


KILL_ARGS = ["--model", "smollm2-135m", "--data", str(DATA_CSV), "--variants", "baseline", "--overrides",
             "data.test=8,eval.max_new_tokens=8,eval.batch_size=1,eval.judges=[bleu],eval.n_bootstrap=100,"
             "effects.n_passages=2"]


def _evaluate(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "entrypoints.evaluate", *KILL_ARGS], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True, timeout=600)


def _finished_table(experiment: str = "truthsteer") -> dict[str, list[tuple[str, str, str]]]:
    """run id -> (variant, qid, answer) rows of each finished parent evaluate run."""
    out = {}
    for run in mlflow.search_runs(experiment_names=[experiment], output_format="list",
                                  filter_string="tags.`truthsteer.stage` = 'evaluate' and attributes.status = 'FINISHED'"):
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=artifacts.GENERATIONS)
        out[run.info.run_id] = [(r["variant"], r["qid"], r["answer"])
                                for r in map(json.loads, Path(path).read_text().splitlines())]
    return out


@pytest.mark.slow
def test_an_evaluation_killed_mid_run_restarts_without_regenerating(tracking: str, tmp_path: Path) -> None:
    killed_env = _env(tracking, tmp_path / "killed")
    lines = kill_once_stored([sys.executable, "-m", "entrypoints.evaluate", *KILL_ARGS], killed_env,
                             tmp_path / "killed", timeout=400)
    (store,) = (tmp_path / "killed").glob("evaluate/*/generations.jsonl")
    done = {json.loads(line)["qid"] for line in lines}
    assert 2 <= len(done) < 8

    restarted = _evaluate(killed_env)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    lines = store.read_text().splitlines()
    assert len(lines) == 8 and len({json.loads(line)["qid"] for line in lines}) == 8  # nothing generated twice
    (restart_run,) = _finished_table()
    child = mlflow.search_runs(experiment_names=["truthsteer"], output_format="list",
                               filter_string=f"tags.mlflow.parentRunId = '{restart_run}'")[0]
    assert (child.data.metrics["n_reused"], child.data.metrics["n_generated"]) == (len(done), 8 - len(done))

    uninterrupted = _evaluate(_env(tracking, tmp_path / "fresh"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    tables = _finished_table()
    fresh = tables[next(r for r in tables if r != restart_run)]
    assert tables[restart_run] == fresh and len(fresh) == 8


@pytest.mark.slow
def test_all_variants_from_real_stage_runs_then_score(tracking: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import bank, extract, train

    monkeypatch.setenv("TRUTHSTEER_OUTPUTS", str(tmp_path))
    cfg = load_config("smollm2-135m", [
        f"data.source={DATA_CSV}", "data.pool=6", "data.train=4", "data.val=2", "data.test=4",
        "bank.n_bootstrap=2", "mlp.steps=2", "mlp.batch_size=2", "mlp.branch=both",
        "eval.max_new_tokens=12", "eval.batch_size=4", "eval.n_bootstrap=200",
        "eval.judges=[semantic,bleu,rouge,mc,llm_logprob,llm]", "judge.batch_size=16",
        # the 135M judge writes prose often: counted invalid, never failing here; short replies keep it quick
        "judge.invalid_ceiling=1.0", "judge.max_new_tokens=24", "judge.retry_max_new_tokens=32",
        "effects.n_passages=4"])
    with stage_run("extract", cfg) as extract_run:
        extract.run(cfg)
    with stage_run("bank", cfg) as bank_run:
        bank.run(cfg, extract_run=extract_run.info.run_id)
    with stage_run("train", cfg) as train_run:
        train.run(cfg, bank_run=bank_run.info.run_id)
    with stage_run("evaluate", cfg) as parent:
        sources = SourceRuns("", {"extract": extract_run.info.run_id, "train_mc": train_run.info.run_id,
                                           "train_gen": train_run.info.run_id})
        result = evaluate.run(cfg, sources=sources, progress=False)
    assert list(result.run_ids) == ["baseline", "caa", "mlp_mc", "mlp_gen"]
    assert {k: mlflow.get_run(parent.info.run_id).data.tags[k] for k in (artifacts.TAG_LINEAR, artifacts.TAG_ATTENTION)} == {
        artifacts.TAG_LINEAR: "onednn", artifacts.TAG_ATTENTION: "cpp"}  # built here: a C++ compiler is on this machine
    names = {v: metric_keys(run_id) for v, run_id in result.run_ids.items()}
    assert all(keys == names["baseline"] for keys in names.values())
    for metric in ("llm_logprob_truthful", "llm_truthful", "semantic_acc", "bleu_acc", "rougeL_max", "mc1", "mc2"):
        assert {metric, f"{metric}_ci_low", f"{metric}_ci_high", f"{metric}_delta"} <= names["baseline"]
    assert "llm_invalid_rate" in names["baseline"]
    for row in result.rows:  # every llm verdict is a parsed one or an invalid one with its raw reply kept
        assert row["llm_raw"] and (row["llm_valid"] == (row["llm_truthful"] is not None))
    for variant, run_id in result.run_ids.items():
        run = mlflow.get_run(run_id)
        assert run.data.tags[artifacts.TAG_VARIANT] == variant and run.data.tags[artifacts.TAG_DTYPE] == "float32"
        assert run.info.run_name == f"{variant}-smollm2-135m"
        assert run.data.tags.get(artifacts.TAG_LAYER) == (None if variant == "baseline" else str(cfg.layer))
        # The params are what the variant ran: baseline has no steering settings; each steered variant names
        # its layer, multiplier and source run, an MLP its width; nothing is logged as ''.
        params = run.data.params
        assert params["variant"] == variant and "" not in params.values() and "eval.max_new_tokens" in params
        if variant == "baseline":
            assert not any(k.startswith(("steering.", "mlp.", "bank.", "variant.")) for k in params)
        else:
            assert params["variant.layer"] == str(cfg.layer) and params["variant.source_run"]
            assert float(params["variant.scale"]) == (1.0 if variant.startswith("mlp") else cfg.steering.scale)
        assert ("variant.mlp_expansion" in params) == variant.startswith("mlp")
        assert ("mlp.expansion" in params) == variant.startswith("mlp")
    steered = {v: [r["answer"] for r in result.rows if r["variant"] == v] for v in result.run_ids}
    assert steered["caa"] != steered["baseline"]
    for metric in ("kl_neutral", "ce_neutral_delta", "kl_answers"):  # what steering costs, every variant
        assert {metric, f"{metric}_ci_low", f"{metric}_ci_high"} <= names["baseline"]
        assert result.metrics["baseline"][metric] == 0.0
        assert all(result.metrics[v][metric] != 0.0 for v in ("caa", "mlp_mc", "mlp_gen")), metric
    assert all(result.metrics[v]["kl_neutral"] > 0 and result.metrics[v]["kl_answers"] > 0 for v in result.run_ids
               if v != "baseline")
    assert all(r["kl_answers"] == (0.0 if r["variant"] == "baseline" else r["kl_answers"]) for r in result.rows)
    assert mlflow.get_run(parent.info.run_id).data.params["run.extract"] == extract_run.info.run_id
    # where the time went, per step, on the parent run only (core.profile; read by benchmarks.full)
    spent = {k: v for k, v in mlflow.get_run(parent.info.run_id).data.metrics.items() if k.startswith("profile/")}
    assert {f"profile/{step}_seconds" for step in ("load", "generate", "generate.prompts", "generate.prefill",
                                                   "generate.decode", "effects", "judge.mc", "judge.mc.prompts",
                                                   "judge.mc.shared_layers", "judge.semantic", "judge.llm",
                                                   "statistics", "mlflow_logging")} <= set(spent)
    assert all(v > 0 for v in spent.values()) and not any(k.startswith("profile/") for k in names["baseline"])
    assert spent["profile/generate.decode_seconds"] < spent["profile/generate_seconds"]
    # and the resident memory each step peaked at: within the process's own peak (getrusage), a parent's at least
    # its child's (Linux: read from /proc)
    if sys.platform == "linux":
        peaks = {k: v for k, v in spent.items() if k.endswith("_peak_rss_gib")}
        assert {f"profile/{step}_peak_rss_gib" for step in ("load", "generate", "generate.prompts", "effects",
                                                            "judge.mc", "judge.mc.prompts")} <= set(peaks)
        highest = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        assert all(0.1 < gib <= highest + 0.01 for gib in peaks.values()), (peaks, highest)
        assert peaks["profile/generate_peak_rss_gib"] >= peaks["profile/generate.prompts_peak_rss_gib"]
        assert peaks["profile/judge.mc_peak_rss_gib"] >= peaks["profile/judge.mc.prompts_peak_rss_gib"]

    rescore_cfg = load_config("smollm2-135m", "eval.judges=[semantic,bleu],eval.n_bootstrap=200")
    with stage_run("score", rescore_cfg) as rescored:
        again = score.run(rescore_cfg, source_run=parent.info.run_id)
    assert mlflow.get_run(rescored.info.run_id).data.tags[artifacts.TAG_SOURCE_RUN] == parent.info.run_id
    for variant in result.run_ids:
        assert again.metrics[variant]["bleu_acc"] == result.metrics[variant]["bleu_acc"]
        assert again.metrics[variant]["semantic_acc"] == pytest.approx(result.metrics[variant]["semantic_acc"])
