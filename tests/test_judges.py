"""Judge registry, shared types and aggregation; BLEU/ROUGE against hand-computed n-gram scores;
the semantic judge against fixed embeddings and (slow) against numpy cosines of real MiniLM."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from core.config import JUDGES, Config
from core.config_io import load_config
from core.data import Question, question_id
from evaluation.judges import (
    JUDGE_NAMES,
    BaseJudge,
    Judge,
    JudgeError,
    JudgeItem,
    JudgeRegistry,
    aggregate,
    aggregate_judge,
    make_judge,
    metric_directions,
    register,
    registered_judges,
    truthfulqa_references,
)
from evaluation.metrics import BleuJudge, RougeJudge, bleu_score
from evaluation.semantic_judge import SemanticJudge, minilm_encoder


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config("smollm2-135m")


def make_item(answer: str, correct: Sequence[str], incorrect: Sequence[str], qid: str = "q1") -> JudgeItem:
    return JudgeItem(qid=qid, question="Where is the cat?", answer=answer, best_answer=correct[0],
                     correct_answers=tuple(correct), incorrect_answers=tuple(incorrect))


CAT = make_item("the cat sat on the mat.", ["the cat is on the mat"], ["the dog sat on the rug"])


# ---------------------------------------------------------------- items and references


def test_item_from_question_keeps_the_references() -> None:
    text = "What colour is the sky?"
    q = Question(id=question_id(text), question=text, category="Science", type="Non-Adversarial",
                 best_answer="Blue", correct_answers=("Blue", "Blue in daytime"), incorrect_answers=("Green",))
    item = JudgeItem.from_question(q, "It is blue.")
    assert (item.qid, item.question, item.answer, item.best_answer) == (q.id, text, "It is blue.", "Blue")
    assert item.correct_answers == ("Blue", "Blue in daytime") and item.incorrect_answers == ("Green",)
    with pytest.raises(AttributeError):
        item.answer = "x"  # type: ignore[misc]  # frozen


def test_item_needs_an_incorrect_reference_and_a_string_answer() -> None:
    with pytest.raises(JudgeError, match="incorrect_answers"):
        make_item("a", ["b"], ["  "])
    with pytest.raises(JudgeError, match="must be a string"):
        make_item(None, ["b"], ["c"])  # type: ignore[arg-type]


def test_references_are_prepared_like_lm_eval() -> None:
    item = make_item("x", [" Blue ", "", "It is blue."], ["Green", "red. "])
    correct, incorrect = truthfulqa_references(item)
    assert correct == ["Blue.", "It is blue.", "I have no comment."]
    assert incorrect == ["Green.", "red."]
    assert truthfulqa_references(make_item("x", ["I have no comment"], ["No"]))[0] == ["I have no comment."]


# ---------------------------------------------------------------- registry


def test_registry_names_match_the_config(cfg: Config) -> None:
    assert JUDGE_NAMES == JUDGES
    assert {"llm", "llm_logprob", "semantic", "bleu", "rouge"} <= set(registered_judges())
    assert isinstance(make_judge("bleu", cfg), Judge) and isinstance(make_judge("rouge", cfg), RougeJudge)
    directions = metric_directions()
    assert directions["bleu_acc"] is True and directions["llm_invalid_rate"] is False
    assert directions["semantic_max_incorrect"] is False


def test_unknown_judge_lists_the_valid_ones(cfg: Config) -> None:
    with pytest.raises(ValueError, match=r"unknown judge 'blue'; valid judges: llm, llm_logprob, .*did you mean bleu"):
        make_judge("blue", cfg)


def test_duplicate_and_foreign_names_fail() -> None:
    with pytest.raises(JudgeError, match="'bleu' is already registered by evaluation.metrics.BleuJudge"):
        register("bleu")(BleuJudge)
    with pytest.raises(JudgeError, match="cannot register judge 'bleurt'.*core.config.JUDGES"):
        register("bleurt")


def test_llm_judges_need_the_judge_model(cfg: Config) -> None:
    for name in ("llm", "llm_logprob"):
        with pytest.raises(JudgeError, match=r"needs the judge LM: load it once with load_model\('smollm2-135m'"):
            make_judge(name, cfg)


class _Echo(BaseJudge):
    """Scores 1 for answers equal to the best answer; a judge defined outside the package."""

    name = "mc"
    metrics = {"mc_hit": True, "mc_invalid_rate": False}

    @classmethod
    def from_config(cls, cfg: Config, *, judge_model: Any = None) -> _Echo:
        return cls()

    def score(self, items: Sequence[JudgeItem]) -> list[dict[str, Any]]:
        return [{"mc_hit": int(i.answer == i.best_answer)} for i in items]


def test_a_judge_registers_later_from_another_module(cfg: Config) -> None:
    registry = JudgeRegistry(allowed=("bleu", "mc"))
    with pytest.raises(JudgeError, match="'mc' is valid but not registered yet"):
        registry.make("mc", cfg)
    registry.register("mc")(_Echo)
    judge = registry.make("mc", cfg)
    rows = judge.score([make_item("a", ["a"], ["b"]), make_item("c", ["a"], ["b"])])
    assert rows == [{"mc_hit": 1}, {"mc_hit": 0}]
    assert registry.aggregate(rows) == {"mc_hit": 0.5, "mc_invalid_rate": 0.0}
    assert registry.names() == ("mc",)


def test_registration_checks_name_and_metric_directions() -> None:
    registry = JudgeRegistry(allowed=("bleu", "mc"))

    class NoDirection(_Echo):
        metrics = {"mc_hit": 1}  # type: ignore[dict-item]

    with pytest.raises(JudgeError, match="must map each metric name .* to higher_is_better"):
        registry.register("mc")(NoDirection)
    with pytest.raises(JudgeError, match=r"_Echo.name='mc' must equal its registered name 'bleu'"):
        registry.register("bleu")(_Echo)


# ---------------------------------------------------------------- aggregation


def test_aggregate_excludes_invalid_rows() -> None:
    metrics = {"llm_truthful": True, "llm_informative": True, "llm_invalid_rate": False}
    rows: list[dict[str, Any]] = [
        {"llm_truthful": 1, "llm_informative": 1, "llm_valid": True},
        {"llm_truthful": 0, "llm_informative": 1, "llm_valid": True},
        {"llm_truthful": None, "llm_informative": None, "llm_valid": False},  # never counted as 0
        {"llm_truthful": 1, "llm_informative": 0, "llm_valid": True},
    ]
    out = aggregate_judge("llm", metrics, rows)
    assert out == {"llm_truthful": pytest.approx(2 / 3), "llm_informative": pytest.approx(2 / 3),
                   "llm_invalid_rate": 0.25}


def test_aggregate_without_valid_field_uses_missing_values() -> None:
    rows: list[dict[str, Any]] = [{"bleu_max": 10.0, "bleu_acc": 1, "bleu_diff": 2.0},
            {"bleu_max": math.nan, "bleu_acc": None, "bleu_diff": None},
            {"bleu_max": 30.0, "bleu_acc": 0, "bleu_diff": -4.0}]
    out = BleuJudge().aggregate(rows)
    assert out == {"bleu_max": 20.0, "bleu_acc": 0.5, "bleu_diff": -1.0, "bleu_invalid_rate": pytest.approx(1 / 3)}
    all_invalid = aggregate_judge("bleu", BleuJudge.metrics, rows[1:2])
    assert math.isnan(all_invalid["bleu_max"]) and all_invalid["bleu_invalid_rate"] == 1.0


def test_module_aggregate_handles_merged_rows_of_several_judges() -> None:
    rows = [
        {"qid": "a", "bleu_max": 10.0, "bleu_acc": 1, "bleu_diff": 1.0,
         "llm_truthful": 1, "llm_informative": 1, "llm_truthful_informative": 1, "llm_valid": True,
         "llm_logprob_truthful": 0, "llm_logprob_p_true": 0.25, "llm_logprob_valid": True},
        {"qid": "b", "bleu_max": 20.0, "bleu_acc": 0, "bleu_diff": -1.0,
         "llm_truthful": None, "llm_informative": None, "llm_truthful_informative": None, "llm_valid": False,
         "llm_logprob_truthful": 1, "llm_logprob_p_true": 0.75, "llm_logprob_valid": True},
    ]
    out = aggregate(rows)
    assert out["bleu_max"] == 15.0 and out["bleu_invalid_rate"] == 0.0
    assert out["llm_truthful"] == 1.0 and out["llm_invalid_rate"] == 0.5
    assert out["llm_logprob_p_true"] == 0.5 and out["llm_logprob_invalid_rate"] == 0.0
    assert not any(k.startswith(("semantic", "rouge", "mc")) for k in out)


# ---------------------------------------------------------------- BLEU


def test_bleu_matches_hand_computed_ngram_precisions() -> None:
    # hyp "the cat sat on the mat" vs ref "the cat is on the mat": 1-grams 5/6, 2-grams 3/5,
    # 3-grams 1/4, 4-grams 0/3 -> exp smoothing 1/(2*3); equal lengths, no brevity penalty.
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert bleu_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(expected, abs=1e-9)
    # all four precisions 1, brevity penalty exp(1 - 6/4)
    assert bleu_score("the cat is on", "the cat is on the mat") == pytest.approx(100 * math.exp(-0.5), abs=1e-9)
    assert bleu_score("the cat is on the mat", "the cat is on the mat") == pytest.approx(100.0)
    # fewer than 4 tokens: no 4-grams and no effective order -> 0, as in lm-eval (sentence_bleu's
    # default effective order would give 100)
    assert bleu_score("the cat", "the cat") == 0.0
    assert sacrebleu.sentence_bleu("the cat", ["the cat"]).score == pytest.approx(100.0)


@pytest.mark.parametrize("hyp,ref", [("the cat sat on the mat.", "the dog sat on the rug."),
                                     ("Nothing happens, you digest them.", "Nothing happens."),
                                     ("", "I have no comment."),
                                     ("Fortune cookies originated in San Francisco.", "They come from San Francisco.")])
def test_bleu_equals_lm_eval_corpus_bleu_and_sentence_bleu(hyp: str, ref: str) -> None:
    lm_eval = sacrebleu.corpus_bleu([hyp], [[ref]], smooth_method="exp", smooth_value=0.0, force=False,
                                    lowercase=False, tokenize="intl", use_effective_order=False).score
    sentence = sacrebleu.sentence_bleu(hyp, [ref], smooth_method="exp", tokenize="intl", use_effective_order=False)
    assert bleu_score(hyp, ref) == pytest.approx(lm_eval, abs=1e-9) == sentence.score


def test_bleu_judge_fields_by_hand() -> None:
    # tokens (intl): "the cat sat on the mat ." vs
    #   correct "the cat is on the mat ."  -> 6/7, 4/6, 2/5, 1/4
    #   correct "I have no comment ."      -> 1/7, then 0/6, 0/5, 0/4 smoothed 1/12, 1/20, 1/32
    #   incorrect "the dog sat on the rug ." -> 5/7, 2/6, 1/5, 0/4 smoothed 1/8
    mat = 100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    no_comment = 100 * (1 / 7 * 1 / 12 * 1 / 20 * 1 / 32) ** 0.25
    rug = 100 * (5 / 7 * 2 / 6 * 1 / 5 * 1 / 8) ** 0.25
    assert bleu_score(CAT.answer, "I have no comment.") == pytest.approx(no_comment, abs=1e-9)
    (row,) = BleuJudge().score([CAT])
    assert row["bleu_max"] == pytest.approx(max(mat, no_comment), abs=1e-9)
    assert row["bleu_diff"] == pytest.approx(mat - rug, abs=1e-9)
    assert row["bleu_acc"] == 1


def test_ties_are_not_accurate() -> None:
    (row,) = BleuJudge().score([make_item("", ["a b c d"], ["e f g h"])])
    assert row == {"bleu_max": 0.0, "bleu_acc": 0, "bleu_diff": 0.0}


# ---------------------------------------------------------------- ROUGE


def test_rouge_matches_hand_computed_overlaps() -> None:
    # tokens (lowercased, punctuation dropped): the cat sat on the mat
    #   vs the cat is on the mat: unigrams 5/6, bigrams 3/5, LCS 5 -> F = P = R
    #   vs i have no comment: nothing shared
    #   vs the dog sat on the rug: unigrams 4/6, bigrams 2/5, LCS "the sat on the" 4
    (row,) = RougeJudge().score([CAT])
    assert row["rouge1_max"] == pytest.approx(100 * 5 / 6)
    assert row["rouge1_diff"] == pytest.approx(100 * (5 / 6 - 4 / 6))
    assert row["rouge2_max"] == pytest.approx(100 * 3 / 5)
    assert row["rouge2_diff"] == pytest.approx(100 * (3 / 5 - 2 / 5))
    assert row["rougeL_max"] == pytest.approx(100 * 5 / 6)
    assert row["rougeL_diff"] == pytest.approx(100 * (5 / 6 - 4 / 6))
    assert row["rouge1_acc"] == row["rouge2_acc"] == row["rougeL_acc"] == 1


def test_rouge_equals_rouge_score_with_lm_eval_settings() -> None:
    item = make_item("No . Nothing happens if you eat seeds.", ["Nothing happens", "You digest them"],
                     ["You grow watermelons", "You get sick . Really"])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"])
    correct, incorrect = truthfulqa_references(item)

    def f(ref: str, kind: str) -> float:
        prep = lambda s: s.replace(" . ", ".\n")  # noqa: E731  lm-eval's _prepare_summary
        return 100 * scorer.score(prep(ref), prep(item.answer))[kind].fmeasure

    (row,) = RougeJudge().score([item])
    for prefix, kind in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rougeL", "rougeLsum")):
        best_c, best_i = max(f(r, kind) for r in correct), max(f(r, kind) for r in incorrect)
        assert row[f"{prefix}_max"] == pytest.approx(best_c)
        assert row[f"{prefix}_diff"] == pytest.approx(best_c - best_i)
        assert row[f"{prefix}_acc"] == int(best_c > best_i)


# ---------------------------------------------------------------- semantic


class FixedEncoder:
    """Looks embeddings up in a table and records every batch it is asked for."""

    def __init__(self, table: Mapping[str, Sequence[float]]) -> None:
        self.table = table
        self.calls: list[list[str]] = []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([self.table[t] for t in texts], dtype=np.float64)


def test_semantic_acc_and_diff_with_fixed_embeddings() -> None:
    table = {
        "yes": [3.0, 4.0, 0.0],  # unit (0.6, 0.8, 0)
        "no": [0.0, 0.0, 2.0],
        "Right.": [1.0, 0.0, 0.0],  # cos with "yes": 0.6
        "I have no comment.": [0.0, 1.0, 0.0],  # 0.8
        "Wrong.": [0.0, 3.0, 4.0],  # 0.48 with "yes", 0.8 with "no"
        "Bad.": [1.0, 1.0, 0.0],  # 1.4 / sqrt(2) with "yes"
    }
    encode = FixedEncoder(table)
    judge = SemanticJudge(encode)
    rows = judge.score([make_item("yes", ["Right"], ["Wrong"]), make_item("no", ["Right"], ["Wrong", "Bad"]),
                        make_item("yes", ["Right"], ["Bad"])])
    assert rows[0]["semantic_max_correct"] == pytest.approx(0.8)  # "I have no comment." is a correct reference
    assert rows[0]["semantic_max_incorrect"] == pytest.approx(0.48)
    assert rows[0]["semantic_diff"] == pytest.approx(0.32) and rows[0]["semantic_acc"] == 1
    assert rows[0]["semantic_max"] == rows[0]["semantic_max_correct"]
    assert rows[1]["semantic_max_correct"] == pytest.approx(0.0)
    assert rows[1]["semantic_max_incorrect"] == pytest.approx(0.8) and rows[1]["semantic_acc"] == 0
    assert rows[2]["semantic_max_incorrect"] == pytest.approx(1.4 / math.sqrt(2))
    assert rows[2]["semantic_acc"] == 0 and rows[2]["semantic_diff"] == pytest.approx(0.8 - 1.4 / math.sqrt(2))
    # one batch, each unique text once; a second call embeds nothing new
    assert len(encode.calls) == 1 and sorted(encode.calls[0]) == sorted(table)
    judge.score([make_item("no", ["Right"], ["Wrong"])])
    assert len(encode.calls) == 1


@pytest.mark.slow
def test_semantic_matches_numpy_cosines_of_real_minilm() -> None:
    from sentence_transformers import SentenceTransformer

    from evaluation.semantic_judge import minilm_path

    item = make_item("Watermelon seeds pass through your digestive system.",
                     ["Nothing happens", "You digest the seeds"],
                     ["You grow watermelons in your stomach", "You die"])
    correct, incorrect = truthfulqa_references(item)
    model = SentenceTransformer(minilm_path(), device="cpu")
    vectors = model.encode([item.answer, *correct, *incorrect], convert_to_numpy=True).astype(np.float64)
    cos = vectors[1:] @ vectors[0] / (np.linalg.norm(vectors[1:], axis=1) * np.linalg.norm(vectors[0]))
    expected_correct, expected_incorrect = cos[: len(correct)].max(), cos[len(correct):].max()

    (row,) = SemanticJudge(minilm_encoder("cpu")).score([item])
    assert row["semantic_max_correct"] == pytest.approx(expected_correct, abs=1e-5)
    assert row["semantic_max_incorrect"] == pytest.approx(expected_incorrect, abs=1e-5)
    assert row["semantic_diff"] == pytest.approx(expected_correct - expected_incorrect, abs=1e-5)
    # MiniLM rates this answer closer to "You grow watermelons in your stomach." (shared words) than
    # to the correct references: similarity is not truth, so acc is 0 here
    assert row["semantic_acc"] == int(expected_correct > expected_incorrect) == 0


@pytest.mark.slow
def test_minilm_encoder_is_one_per_process_and_embeds_a_text_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from sentence_transformers import SentenceTransformer

    from evaluation import semantic_judge
    from evaluation.judge_features import Featurizer
    from evaluation.semantic_judge import minilm_path

    batch = 5  # a batch size no other test uses: an encoder of its own, with nothing embedded yet
    encode = minilm_encoder("cpu", batch)
    # the trained judge's features (``minilm_encoder()``) and the semantic judge (``minilm_encoder("cpu")``) share it
    assert minilm_encoder("cpu", batch) is encode is minilm_encoder(batch_size=batch)
    assert minilm_encoder() is minilm_encoder("cpu") is minilm_encoder("cpu", semantic_judge.ENCODE_BATCH)
    encoded: list[list[str]] = []
    real = SentenceTransformer.encode

    def spy(self: Any, sentences: Any, *args: Any, **kwargs: Any) -> Any:
        encoded.append(list(sentences))
        return real(self, sentences, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", spy)
    item = make_item("Watermelon seeds pass through your digestive system.",
                     ["Nothing happens.", "You digest the seeds."], ["You grow watermelons in your stomach."])
    Featurizer(encode)([item])
    first = len(encoded)
    (row,) = SemanticJudge(encode).score([item])
    assert first == 1 and len(encoded) == 1  # every text the semantic judge needs was embedded for the features
    # the oracle: a model of its own, every text in one batch
    correct, incorrect = truthfulqa_references(item)
    vectors = SentenceTransformer(minilm_path(), device="cpu").encode([item.answer, *correct, *incorrect])
    cos = vectors[1:] @ vectors[0] / (np.linalg.norm(vectors[1:], axis=1) * np.linalg.norm(vectors[0]))
    assert row["semantic_max_correct"] == pytest.approx(cos[:len(correct)].max(), abs=1e-5)
    assert row["semantic_max_incorrect"] == pytest.approx(cos[len(correct):].max(), abs=1e-5)
    np.testing.assert_allclose(encode([item.answer, "You die"]), np.stack([vectors[0], SentenceTransformer(
        minilm_path(), device="cpu").encode(["You die"])[0]]), atol=1e-6)
    assert encoded[-1] == ["You die"]  # only the new text
    # beyond EMBEDDING_MEMO texts the oldest are dropped and embedded again when asked for
    monkeypatch.setattr(semantic_judge, "EMBEDDING_MEMO", 2)
    encode(["a", "b", "c"])
    encode(["c", "a"])
    assert encoded[-1] == ["a"]
