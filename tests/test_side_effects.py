"""Side-effect metrics (``evaluation.side_effects``) against oracles that share none of its code: plain
full forwards of the unsteered model and of a model steered by a forward hook written here, and KL and
cross-entropy from ``torch.nn.functional``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from core.models import LoadedModel
from evaluation.side_effects import answer_kl, neutral_effects
from steering.layers import decoder_layers
from steering.methods.intervention import Steering
from steering.prompts import answer_text, encode_text, format_prompt
from tests.conftest import DATA_CSV
from tests.test_generate import LAYER, QUESTIONS, tiny_loaded, vector

pytestmark = pytest.mark.oracle
ANSWERS = ["They get arthritis.", "Yes", "", "The Pacific, because it is the largest.", "Because I said so."]
PASSAGES = ["The river flows north through the valley and into the lake.", "A short one.",
            "Bread is made of flour, water, salt and yeast, and it is baked in an oven for an hour or so."]


@contextlib.contextmanager
def added(loaded: LoadedModel, delta: Tensor, start: int, layer: int = LAYER) -> Iterator[None]:
    """The oracle's steering of a single row: ``delta`` added to layer ``layer``'s output from ``start`` on."""
    def hook(module: torch.nn.Module, args: object, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, start:] += delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_layers(loaded.model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def oracle_kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    return F.kl_div(q_logits.double().log_softmax(-1), p_logits.double().log_softmax(-1), log_target=True,
                    reduction="none").sum(-1)


def logits(loaded: LoadedModel, ids: list[int]) -> Tensor:
    return loaded.model(input_ids=torch.tensor([ids])).logits[0]  # (seq, vocab)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_answer_kl_from_cached_prompts_equals_one_full_forward_per_answer(arch: str) -> None:
    loaded = tiny_loaded(arch)
    v = vector(loaded)
    steerings = {"baseline": Steering.baseline(), "caa": Steering("caa", layer=LAYER, scale=1.5, vector=v),
                 "strong": Steering("caa", layer=LAYER, scale=4.0, vector=v),
                 "all": Steering("caa", layer=LAYER, scale=1.5, vector=v, positions="all")}
    answers = {"baseline": ANSWERS, "caa": ANSWERS, "strong": ANSWERS[::-1], "all": ANSWERS}
    got = answer_kl(loaded, steerings, QUESTIONS, answers, batch_size=2, max_length=128)
    cut = answer_kl(loaded, {"caa": steerings["caa"]}, QUESTIONS, {"caa": ANSWERS}, batch_size=3, max_length=128,
                    max_tokens=4)["caa"]
    for variant, scale, start_at_prompt_end in (("caa", 1.5, True), ("strong", 4.0, True), ("all", 1.5, False)):
        for q, a, value, first in zip(QUESTIONS, answers[variant], got[variant], cut, strict=True):
            if not a:
                assert value is None
                continue
            prompt = encode_text(loaded.tokenizer, format_prompt(q, loaded.tokenizer, "qa"))
            answer = loaded.tokenizer(answer_text(a, "qa"), add_special_tokens=False)["input_ids"]
            ids = prompt + answer
            with torch.no_grad():
                plain = logits(loaded, ids)[len(prompt) - 1:-1]  # the positions that predict the answer
                with added(loaded, scale * v, len(prompt) - 1 if start_at_prompt_end else 0):
                    steered = logits(loaded, ids)[len(prompt) - 1:-1]
            kl = oracle_kl(plain, steered)
            assert value == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-7) and value > 0, (variant, q)
            if variant == "caa":
                assert first == pytest.approx(float(kl[:4].mean()), rel=1e-4, abs=1e-7)
    assert got["baseline"] == [None if not a else 0.0 for a in ANSWERS]


def test_neutral_effects_equal_plain_forwards_and_baseline_is_exactly_zero() -> None:
    """Also with a variant on a lower layer, where the steered passes share less of the unsteered one."""
    loaded = tiny_loaded("llama")
    v = vector(loaded)
    steerings = {"baseline": Steering.baseline(), "caa": Steering("caa", layer=LAYER, scale=2.0, vector=v),
                 "low": Steering("caa", layer=0, scale=-1.0, vector=v)}
    got = neutral_effects(loaded, steerings, PASSAGES, batch_size=2, max_tokens=40)
    alone = neutral_effects(loaded, {"caa": steerings["caa"]}, PASSAGES, batch_size=2, max_tokens=40)
    assert alone["caa"] == [pytest.approx(row, rel=1e-6) for row in got["caa"]]
    for i, text in enumerate(PASSAGES):
        ids = encode_text(loaded.tokenizer, text)[:40]
        with torch.no_grad():
            plain = logits(loaded, ids)[:-1]
            with added(loaded, 2.0 * v, 0):
                steered = logits(loaded, ids)[:-1]
        targets = torch.tensor(ids[1:])
        ce_plain = float(F.cross_entropy(plain.double(), targets))
        base, caa = got["baseline"][i], got["caa"][i]
        assert base == {"kl": 0.0, "ce_unsteered": base["ce_unsteered"], "ce_steered": base["ce_unsteered"],
                        "n_tokens": float(len(ids) - 1)}
        assert base["ce_unsteered"] == pytest.approx(ce_plain, rel=1e-5)
        assert caa["ce_unsteered"] == base["ce_unsteered"]
        assert caa["ce_steered"] == pytest.approx(float(F.cross_entropy(steered.double(), targets)), rel=1e-5)
        assert caa["kl"] == pytest.approx(float(oracle_kl(plain, steered).mean()), rel=1e-4)
        with torch.no_grad(), added(loaded, -1.0 * v, 0, layer=0):
            low = logits(loaded, ids)[:-1]
        assert got["low"][i]["kl"] == pytest.approx(float(oracle_kl(plain, low).mean()), rel=1e-4)
        assert got["low"][i]["ce_steered"] == pytest.approx(float(F.cross_entropy(low.double(), targets)), rel=1e-5)


def test_neutral_kl_rises_with_the_scale_and_is_zero_at_zero() -> None:
    loaded = tiny_loaded("gemma2")
    v = vector(loaded, norm=1.0)
    scales = [0.0, 0.5, 2.0, 8.0, -8.0]
    steerings = {f"s{s}": Steering("caa", layer=LAYER, scale=s, vector=v) for s in scales}
    got = neutral_effects(loaded, steerings, PASSAGES, batch_size=3, max_tokens=64)
    mean = [math.fsum(r["kl"] for r in got[f"s{s}"]) / len(PASSAGES) for s in scales]
    assert mean[0] == 0.0 and mean[0] < mean[1] < mean[2] < mean[3] and mean[4] > mean[2]


@pytest.mark.slow
def test_on_smollm2_kl_neutral_rises_with_the_caa_scale() -> None:
    from core.config_io import load_config
    from core.corpus import load_passages
    from core.data import splits_for
    from core.models import load_from_config
    from steering.extract import contrastive_pairs, extract_caa

    cfg = load_config("smollm2-135m", [f"data.source={DATA_CSV}", "data.pool=8"])
    loaded = load_from_config(cfg)
    pairs = contrastive_pairs(splits_for(cfg)["pool"], 1, 0)
    v = extract_caa(loaded, pairs, batch_size=8, max_length=128).vectors[cfg.layer]  # (d_model,)
    scales = [0.0, 1.0, 4.0, 8.0, -8.0]
    steerings = {f"s{s}": Steering("caa", layer=cfg.layer, scale=s, vector=v) for s in scales}
    texts = [p.text for p in load_passages(n=8)]
    got = neutral_effects(loaded, steerings, texts, batch_size=8, max_tokens=48)
    kl = [math.fsum(r["kl"] for r in got[f"s{s}"]) / len(texts) for s in scales]
    ce = [math.fsum(r["ce_steered"] - r["ce_unsteered"] for r in got[f"s{s}"]) / len(texts) for s in scales]
    assert kl[0] == 0.0 and ce[0] == 0.0 and kl[0] < kl[1] < kl[2] < kl[3] and kl[4] > kl[1], kl
    assert ce[3] > 0 and ce[4] > 0, ce  # a large push makes the text less likely
