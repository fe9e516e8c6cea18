"""CAA extraction and steering vectors against exact oracles, on every tiny architecture.

Oracles: per-layer answer means == masked means of `output_hidden_states[layer + 1]` (the last layer
read with the final norm replaced by the identity, since transformers normalises `hidden_states[-1]`);
the answer mask decodes to exactly the answer text; batched == one pair at a time under left
padding; extra padding, another pad token id and garbage in padded positions change nothing; the
vector == the mean of the valid diffs; a NaN injected into one example's residual invalidates
that example at that layer (and the layers it flows into) and nowhere else.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from torch import nn

from core import artifacts
from core.config import ModelSpec
from core.config_io import load_config
from core.data import Question, load_questions, question_id
from core.models import LoadedModel
from core.tracking import stage_run
from stages.extract import load_extraction
from steering.extract import (
    Extraction,
    NonFiniteActivations,
    Pair,
    answer_means,
    contrastive_pairs,
    encode_pairs,
    extract_caa,
    length_sorted_batches,
)
from steering.hooks import active_hooks, masked_mean
from steering.layers import decoder_layers
from steering.prompts import answer_text
from steering.vectors import SteeringVectors
from tests.conftest import DATA_CSV
from tests.tiny_models import PAD_ID, TINY_ARCHS, make_tiny, make_tokenizer

MAX_LENGTH = 120  # the tiny models hold 128 positions; two prompts are cut from the left


@functools.cache
def questions() -> tuple[Question, ...]:
    return tuple(load_questions(DATA_CSV)[:6])


@functools.cache
def pairs() -> tuple[Pair, ...]:
    return tuple(contrastive_pairs(questions(), 1, seed=0))


def loaded_with(arch: str, tokenizer: Any = None) -> LoadedModel:
    model, default_tokenizer = tiny(arch)
    spec = ModelSpec(alias=f"tiny-{arch}", source="hub", hf_id=f"tiny/{arch}", architecture=arch,  # type: ignore[arg-type]
                     n_layers=3, d_model=32, n_params_b=1e-4, dtype="float32", prompt_format="qa")
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer or default_tokenizer, dtype=torch.float32,
                       device=torch.device("cpu"), prompt_format="qa")


@functools.cache
def tiny(arch: str) -> tuple[Any, Any]:
    return make_tiny(arch)


@functools.cache
def clean_extraction(arch: str) -> Extraction:
    return extract_caa(loaded_with(arch), pairs(), batch_size=len(pairs()), max_length=MAX_LENGTH)


def make_question(text: str, correct: tuple[str, ...], incorrect: tuple[str, ...], best: str = "") -> Question:
    best = best or correct[0]
    return Question(id=question_id(text), question=text, category="Test", type="Adversarial", best_answer=best,
                    correct_answers=correct, incorrect_answers=incorrect)


@contextmanager
def inject(model: nn.Module, layer: int, row: int, position: int | slice, value: float) -> Iterator[None]:
    """Write `value` into the output of decoder layer `layer` at (row, position), not in place."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        hidden = (output[0] if isinstance(output, tuple) else output).clone()  # (batch, seq, d_model)
        hidden[row, position] = value
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------- pairs


def test_contrastive_pairs_best_answer_first_seeded_and_capped(caplog: pytest.LogCaptureFixture) -> None:
    many = make_question("Many answers?", ("a1", "best", "a2", "a3"), ("b1", "b2", "b3", "b4", "b5"), best="best")
    few = make_question("Few answers?", ("c1", "c2"), ("d1",))
    with caplog.at_level(logging.WARNING, logger="steering.extract"):
        drawn = contrastive_pairs([many, few], 3, seed=0)
    assert [p.question.id for p in drawn] == [many.id] * 3 + [few.id]
    assert drawn[0].correct == "best" and drawn[3] == Pair(few, "c1", "d1")
    correct, incorrect = [p.correct for p in drawn[:3]], [p.incorrect for p in drawn[:3]]
    assert len(set(correct)) == 3 and set(correct) <= set(many.correct_answers)
    assert len(set(incorrect)) == 3 and set(incorrect) <= set(many.incorrect_answers)
    assert f"pairs_per_question=3 capped by the answers available for 1 of 2 questions: {few.id} (1)" in caplog.text
    assert contrastive_pairs([many, few], 3, seed=0) == drawn  # deterministic
    assert contrastive_pairs([few, many], 3, seed=0) == drawn[3:] + drawn[:3]  # a question's draw is its own
    draws = {tuple((p.correct, p.incorrect) for p in contrastive_pairs([many], 3, seed=s)) for s in range(8)}
    assert len(draws) > 1  # the seed matters
    assert [p.correct for p in contrastive_pairs(questions(), 1, seed=5)] == [q.best_answer for q in questions()]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pairs_per_question": 0, "seed": 0}, "pairs_per_question=0 must be an int >= 1"),
    ({"pairs_per_question": True, "seed": 0}, "pairs_per_question=True must be an int >= 1"),
    ({"pairs_per_question": 1, "seed": -1}, "seed=-1 must be a non-negative int"),
])
def test_contrastive_pairs_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        contrastive_pairs(questions(), **kwargs)


# ---------------------------------------------------------------- activations


def test_answer_mask_covers_exactly_the_answer_tokens() -> None:
    loaded = loaded_with("llama")
    batch = encode_pairs(loaded, pairs(), MAX_LENGTH)
    n = len(pairs())
    assert batch["input_ids"].shape[0] == 2 * n
    answers = [answer_text(p.correct, "qa") for p in pairs()] + [answer_text(p.incorrect, "qa") for p in pairs()]
    for row, answer in enumerate(answers):
        ids = batch["input_ids"][row][batch["answer_mask"][row].bool()]  # (n_answer,)
        assert loaded.tokenizer.decode(ids) == answer[:MAX_LENGTH - 1]
        assert (batch["answer_mask"][row] <= batch["attention_mask"][row]).all()
    assert not bool(batch["attention_mask"].all())  # rows differ in length: there is padding to mask


@pytest.mark.oracle
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_answer_means_equal_masked_output_hidden_states(arch: str) -> None:
    loaded = loaded_with(arch)
    model = loaded.model
    batch = encode_pairs(loaded, pairs()[:4], MAX_LENGTH)
    means = answer_means(model, batch)  # (rows, n_layers, d_model)
    assert means.shape == (8, 3, 32) and means.dtype == torch.float32
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (rows, seq)
    decoder = model.get_decoder()
    final_norm = decoder.norm
    decoder.norm = nn.Identity()  # so that hidden_states[-1] is the raw output of the last layer
    try:
        with torch.no_grad():
            hidden_states = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids,
                                  output_hidden_states=True).hidden_states
    finally:
        decoder.norm = final_norm
    for layer in range(3):
        assert torch.equal(means[:, layer], masked_mean(hidden_states[layer + 1], batch["answer_mask"])), layer
    assert active_hooks(model) == 0


@pytest.mark.oracle
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_equals_one_pair_at_a_time(arch: str) -> None:
    loaded = loaded_with(arch)
    batched = clean_extraction(arch)
    for batch_size in (1, 4):  # 4: a short last batch
        other = extract_caa(loaded, pairs(), batch_size=batch_size, max_length=MAX_LENGTH)
        assert torch.allclose(other.diffs, batched.diffs, atol=1e-5, rtol=0), batch_size
        assert torch.equal(other.valid, batched.valid)
    assert batched.diffs.shape == (6, 3, 32) and bool(batched.valid.all())
    assert batched.question_ids == tuple(q.id for q in questions()) and batched.model == f"tiny-{arch}"
    assert (batched.diffs.norm(dim=-1) > 0).all()  # correct and incorrect answers differ
    single = answer_means(loaded.model, encode_pairs(loaded, pairs()[2:3], MAX_LENGTH))  # (2, n_layers, d_model)
    assert torch.allclose(batched.diffs[2], single[0] - single[1], atol=1e-5, rtol=0)


def test_length_sorted_batches_partition_longest_first() -> None:
    loaded = loaded_with("llama")
    batches = length_sorted_batches(loaded, pairs(), 4, MAX_LENGTH)
    assert [len(b) for b in batches] == [4, 2] and sorted(i for b in batches for i in b) == list(range(6))
    widths = [encode_pairs(loaded, [pairs()[i]], MAX_LENGTH)["input_ids"].shape[1] for b in batches for i in b]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    assert length_sorted_batches(loaded, pairs(), 1, MAX_LENGTH) == [[i] for b in batches for i in b]


@pytest.mark.oracle
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_padding_is_masked(arch: str) -> None:
    loaded = loaded_with(arch)
    batch = encode_pairs(loaded, pairs(), MAX_LENGTH)
    means = answer_means(loaded.model, batch)  # (rows, n_layers, d_model)
    extra = 5  # more left padding
    padded = {
        "input_ids": nn.functional.pad(batch["input_ids"], (extra, 0), value=PAD_ID),
        "attention_mask": nn.functional.pad(batch["attention_mask"], (extra, 0), value=0),
        "answer_mask": nn.functional.pad(batch["answer_mask"], (extra, 0), value=0),
    }
    assert torch.allclose(answer_means(loaded.model, padded), means, atol=1e-5, rtol=0)

    eos_padding = make_tokenizer()
    eos_padding.pad_token = "<eos>"
    assert eos_padding.pad_token_id != PAD_ID
    other = extract_caa(loaded_with(arch, eos_padding), pairs(), batch_size=6, max_length=MAX_LENGTH)
    assert torch.allclose(other.diffs, clean_extraction(arch).diffs, atol=1e-5, rtol=0)

    (order,) = length_sorted_batches(loaded, pairs(), 6, MAX_LENGTH)  # the one batch extract_caa runs
    as_run = encode_pairs(loaded, [pairs()[i] for i in order], MAX_LENGTH)
    row = int(as_run["attention_mask"][:, 0].eq(0).nonzero()[0])  # a row padded at position 0
    with inject(loaded.model, 2, row, 0, math.inf):  # the last layer: nothing reads its padding
        garbage = extract_caa(loaded, pairs(), batch_size=6, max_length=MAX_LENGTH)
    assert torch.equal(garbage.diffs, clean_extraction(arch).diffs) and bool(garbage.valid.all())


# ---------------------------------------------------------------- vectors and NaN handling


def test_vector_is_mean_of_valid_diffs() -> None:
    diffs = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))  # (n_examples, n_layers, d_model)
    valid = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    extraction = Extraction(diffs, valid, tuple(f"q{i}" for i in range(5)), "m")
    for layer in range(3):
        expected = diffs[valid[:, layer], layer].mean(dim=0)  # (d_model,)
        assert torch.allclose(extraction.vectors[layer], expected, atol=1e-6, rtol=0)
    assert extraction.n_valid.tolist() == [4, 4, 2] and extraction.nan_count.tolist() == [1, 1, 3]
    assert torch.equal(extraction.nan_rate, torch.tensor([0.2, 0.2, 0.6]))
    assert extraction.nan_rate_overall == pytest.approx(5 / 15)
    vectors = extraction.steering_vectors({"run_id": "r"})
    assert vectors.layers == (0, 1, 2) and vectors.model == "m" and vectors.provenance == {"run_id": "r"}
    assert all(torch.equal(vectors.at(layer), extraction.vectors[layer]) for layer in range(3))
    with pytest.raises(ValueError, match=re.escape("valid has shape (5, 2)")):
        Extraction(diffs, valid[:, :2], extraction.question_ids, "m")
    with pytest.raises(ValueError, match="4 question ids for 5 examples"):
        Extraction(diffs, valid, extraction.question_ids[:4], "m")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_nan_in_one_example_is_dropped_only_where_it_is(arch: str) -> None:
    loaded = loaded_with(arch)
    clean = clean_extraction(arch)
    n, example = len(pairs()), 2
    (order,) = length_sorted_batches(loaded, pairs(), n, MAX_LENGTH)  # the one batch extract_caa runs
    pos_row, neg_row = order.index(example), n + order.index(example)
    with inject(loaded.model, 2, neg_row, -1, math.nan):  # the incorrect answer's last token
        extraction = extract_caa(loaded, pairs(), batch_size=n, max_length=MAX_LENGTH, nan_threshold=0.2)
    expected_valid = torch.ones(n, 3, dtype=torch.bool)
    expected_valid[example, 2] = False
    assert torch.equal(extraction.valid, expected_valid)
    assert extraction.nan_rate.tolist() == [0.0, 0.0, pytest.approx(1 / n)]
    assert extraction.nan_rate_overall == pytest.approx(1 / (3 * n))
    assert torch.equal(extraction.diffs[example, 2], torch.zeros(32))
    others = [i for i in range(n) if i != example]
    assert torch.equal(extraction.diffs[others], clean.diffs[others])
    assert torch.allclose(extraction.vectors[2], clean.diffs[others, 2].mean(dim=0), atol=1e-6, rtol=0)
    assert torch.allclose(extraction.vectors[:2], clean.vectors[:2], atol=1e-6, rtol=0)

    with inject(loaded.model, 1, pos_row, -1, math.inf):  # flows into the next layer too, not the one before
        upstream = extract_caa(loaded, pairs(), batch_size=n, max_length=MAX_LENGTH, nan_threshold=0.2)
    assert upstream.valid[example].tolist() == [True, False, False] and int(upstream.valid.sum()) == 3 * n - 2

    with (
        inject(loaded.model, 2, neg_row, -1, math.nan),
        pytest.raises(NonFiniteActivations) as raised,
    ):
        extract_caa(loaded, pairs(), batch_size=n, max_length=MAX_LENGTH, nan_threshold=0.1)
    message = str(raised.value)
    assert "nan_threshold=0.1 in 1 of 3 layers" in message and "layer 2: 16.7% (1/6)" in message
    assert "layer 0" not in message and "layer 1" not in message
    for fix in ("bfloat16", "gemma3-fp16-maxlen384", "max_length"):
        assert fix in message
    assert isinstance(raised.value, ValueError) and torch.equal(raised.value.extraction.valid, expected_valid)
    assert active_hooks(loaded.model) == 0


def test_extract_rejects_bad_arguments() -> None:
    loaded = loaded_with("llama")
    with pytest.raises(ValueError, match="no contrastive pairs.*set data.pool > 0"):
        extract_caa(loaded, [], batch_size=2, max_length=MAX_LENGTH)
    with pytest.raises(ValueError, match=re.escape("batch_size=0 must be an int >= 1")):
        extract_caa(loaded, pairs(), batch_size=0, max_length=MAX_LENGTH)
    with pytest.raises(ValueError, match=re.escape("max_length=1 must be an int >= 2")):
        extract_caa(loaded, pairs(), batch_size=2, max_length=1)


# ---------------------------------------------------------------- SteeringVectors


def vectors_of(model: str = "m", seed: int = 0, layers: tuple[int, ...] = (0, 1, 2)) -> SteeringVectors:
    gen = torch.Generator().manual_seed(seed)
    return SteeringVectors({layer: torch.randn(4, generator=gen) for layer in layers}, model,
                           {"run_id": f"run{seed}"})


def test_steering_vector_arithmetic_is_exact() -> None:
    a, b = vectors_of(seed=0), vectors_of(seed=1)
    for layer in a.layers:
        assert torch.equal((2.5 * a).at(layer), 2.5 * a.at(layer))
        assert torch.equal((a * -4).at(layer), -4 * a.at(layer))
        assert torch.equal((a / 2).at(layer), a.at(layer) * 0.5)
        assert torch.equal((a + b).at(layer), a.at(layer) + b.at(layer))
        assert torch.equal((a - b).at(layer), a.at(layer) - b.at(layer))
        assert torch.equal((-a).at(layer), -a.at(layer))
        assert torch.equal((a - a).at(layer), torch.zeros(4))
        assert torch.equal((0 * a).at(layer), torch.zeros(4))
    assert (2 * a).provenance == {"op": "scale", "scale": 2.0, "of": {"run_id": "run0"}}
    assert (a - b).provenance == {"op": "subtract", "left": {"run_id": "run0"}, "right": {"run_id": "run1"}}
    assert (a + b).model == "m" and (a + b).layers == (0, 1, 2) and a.d_model == 4
    assert a.norms() == {layer: float(a.at(layer).norm()) for layer in a.layers}


def test_steering_vectors_validate_and_fail_with_the_fix() -> None:
    a = vectors_of()
    with pytest.raises(ValueError, match=r"cannot add .*'m'.*'other'.*same model, layers and width"):
        a + vectors_of(model="other")
    with pytest.raises(ValueError, match=re.escape("layers [0, 1, 2], d_model 4) and 'm' (layers [0, 1]")):
        a - vectors_of(layers=(0, 1))
    with pytest.raises(ValueError, match="cannot add Tensor and SteeringVectors"):
        a + torch.zeros(4)
    with pytest.raises(ValueError, match=re.escape("scale=nan must be a finite real number")):
        a * math.nan
    with pytest.raises(ValueError, match="cannot scale steering vectors by a bool"):
        a * True
    with pytest.raises(ValueError, match="scale=0 cannot divide"):
        a / 0
    with pytest.raises(ValueError, match=re.escape("layer=7 has no vector; this m set has layers 0..2 (3 of them)")):
        a.at(7)
    with pytest.raises(ValueError, match=re.escape("vectors[1] has shape (2, 2)")):
        SteeringVectors({0: torch.zeros(4), 1: torch.zeros(2, 2)}, "m")
    with pytest.raises(ValueError, match=re.escape("different widths [3, 4]")):
        SteeringVectors({0: torch.zeros(4), 1: torch.zeros(3)}, "m")
    with pytest.raises(ValueError, match="provenance must hold only JSON values"):
        SteeringVectors({0: torch.zeros(4)}, "m", {"path": Path("x")})
    source = torch.ones(4)
    copy = SteeringVectors({3: source, 1: torch.ones(4, dtype=torch.float16)}, "m", {"tuple": (1, 2)})
    source += 1  # the vectors are copies
    assert torch.equal(copy.at(3), torch.ones(4)) and copy.at(1).dtype == torch.float32
    assert copy.layers == (1, 3) and copy.provenance == {"tuple": [1, 2]}


def test_steering_vectors_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    a = 3.0 * vectors_of(layers=(2, 5, 9)) - vectors_of(seed=4, layers=(2, 5, 9))
    a.save(tmp_path / "v.safetensors", tmp_path / "v.json")
    back = SteeringVectors.load(tmp_path / "v.safetensors", tmp_path / "v.json")
    assert back == a and back.layers == (2, 5, 9)
    assert all(torch.equal(back.at(layer), a.at(layer)) for layer in a.layers)
    assert json.loads((tmp_path / "v.json").read_text())["layers"] == [2, 5, 9]
    assert back != vectors_of(layers=(2, 5, 9))
    with pytest.raises(FileNotFoundError, match="missing"):
        SteeringVectors.load(tmp_path / "none.safetensors", tmp_path / "v.json")


# ---------------------------------------------------------------- entry point and the stage


def test_entrypoint_dry_run_plans_without_weights(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from entrypoints import extract as entry

    monkeypatch.setattr(sys, "argv", ["extract", "--dry-run", "--data", str(DATA_CSV), "--model", "smollm2-135m",
                                      "--overrides", "data.pool=10,extract.batch_size=4"])
    entry.main()
    out = capsys.readouterr().out
    assert "no weights loaded, nothing logged" in out and "layers: 30 (all recorded), d_model 576" in out
    assert "pool: 10 questions -> 10 pairs" in out and "batches: 3 of up to 4 pairs (8 sequences" in out


@pytest.mark.slow
def test_run_logs_metrics_and_artifacts_on_smollm2(tracking: str, data_csv: Path, tmp_path: Path) -> None:
    cfg = load_config("smollm2-135m", [f"data.source={data_csv}", "data.pool=8", "runtime.device=cpu",
                                       "extract.batch_size=4", "extract.pairs_per_question=2"])
    with stage_run("extract", cfg) as run:
        from stages import extract as extract_stage

        vectors = extract_stage.run(cfg)
    run_id = run.info.run_id
    finished = mlflow.MlflowClient().get_run(run_id)
    assert finished.info.status == "FINISHED"
    metrics = finished.data.metrics
    assert metrics["nan_rate"] == 0.0 and metrics["n_questions"] == 8
    assert metrics["n_pairs"] == metrics["n_examples"] == 16  # every pool question has >= 2 of each answer
    for key in ("nan_rate_by_layer", "norm_by_layer"):
        history = mlflow.MlflowClient().get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(30))
    assert finished.data.params["extract.prompt_format"] == "chat"

    extraction = load_extraction(run_id)
    assert extraction.diffs.shape == (16, 30, 576) and extraction.n_layers == 30
    assert bool(extraction.valid.all()) and extraction.provenance["run_id"] == run_id
    norms = extraction.vectors.norm(dim=-1)  # (n_layers,)
    assert torch.isfinite(norms).all() and (norms > 0).all()
    assert vectors.layers == tuple(range(30)) and vectors.provenance == extraction.provenance
    assert all(torch.equal(vectors.at(layer), extraction.vectors[layer]) for layer in range(30))

    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path)))
    assert SteeringVectors.load(local / artifacts.CAA_TENSORS, local / artifacts.CAA_META) == vectors
    assert torch.equal(load_extraction(local).diffs, extraction.diffs)
    meta = json.loads((local / artifacts.CAA_META).read_text())
    assert meta["n_layers"] == 30 and meta["d_model"] == 576 and meta["dtype"] == "float32"
    assert meta["norms"] == norms.tolist() and meta["nan_count_by_layer"] == [0] * 30
    assert len(meta["question_ids"]) == 16 and meta["config"]["data"]["pool"] == 8


@pytest.mark.slow
def test_batched_equals_one_by_one_on_smollm2(data_csv: Path) -> None:
    from core.models import load_model

    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    real_pairs = contrastive_pairs(load_questions(data_csv)[:6], 1, seed=0)
    batched = extract_caa(loaded, real_pairs, batch_size=6, max_length=256)
    single = extract_caa(loaded, real_pairs, batch_size=1, max_length=256)
    # Residuals reach ~600 in late layers, so fp32 rounding is relative: within 1e-5 of each layer's scale.
    scale = batched.diffs.abs().amax(dim=(0, 2))  # (n_layers,)
    assert ((batched.diffs - single.diffs).abs().amax(dim=(0, 2)) <= 1e-5 * scale).all()
    assert bool(batched.valid.all()) and loaded.prompt_format == "chat"
