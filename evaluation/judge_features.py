"""What the trained judge reads of an answer: ``FEATURES``, one row per answer, from its question's references.

MiniLM cosine similarities of the answer to the correct and to the incorrect references (max, second
max, mean, top-2 mean, a soft maximum margin), to the best answer, to the question and to "I have no
comment."; ROUGE-L to the nearest correct and incorrect reference (rouge-score); whether the answer is
verbatim a correct or an incorrect reference; negation in the answer and in its nearest references;
hedging words; length; and ``LEXICAL``: the content words the answer shares with only the correct or
only the incorrect references, word recall and precision against the nearest of each, yes/no polarity
and numbers. ``FEATURE_VERSION`` changes with them: a judge trained on other features is refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluation.human_labels import normalised, references
from evaluation.judges import NO_COMMENT, JudgeItem
from evaluation.semantic_judge import Encoder

FEATURE_VERSION = 2
LEXICAL = (
    "words_only_incorrect", "words_only_correct", "words_both", "words_novel", "n_words_only_incorrect",
    "n_words_only_correct", "recall_max_correct", "precision_max_correct", "recall_max_incorrect",
    "precision_max_incorrect", "recall_diff", "precision_diff", "polarity", "polarity_with_correct",
    "polarity_with_incorrect", "has_number", "number_in_correct", "number_in_incorrect", "number_novel",
    "no_content_words",
)
FEATURES = (
    "cos_max_correct", "cos_max_incorrect", "cos_max_diff", "cos_mean_correct", "cos_mean_incorrect",
    "cos_mean_diff", "cos_top2_correct", "cos_top2_incorrect", "cos_question", "cos_no_comment", "cos_best",
    "verbatim_correct", "verbatim_incorrect", "n_words", "negation_answer", "negation_nearest_correct",
    "negation_nearest_incorrect", "cos_soft_margin", "rougeL_max_correct", "rougeL_max_incorrect",
    "rougeL_diff", "hedge", "cos_second_correct", "cos_second_incorrect", "cos_question_minus_correct",
    *LEXICAL,
)
NEGATION = re.compile(r"\b(no|not|never|nothing|none|cannot|can't|don't|doesn't|isn't|aren't|won't|didn't|nobody)\b",
                      re.IGNORECASE)
HEDGE = re.compile(r"\b(may|might|some|depends|possibly|perhaps|unknown|no evidence|not clear|varies|it is not|"
                   r"there is no)\b", re.IGNORECASE)
STOPWORDS = frozenset(
    ["a", "an", "the", "of", "to", "in", "on", "at", "is", "are", "was", "were", "be", "been", "it", "its", "this", "that", "and", "or", "for", "with", "as", "by", "from", "you", "your", "i", "do", "does", "did", "can", "will", "would", "what", "which", "who", "whom", "how", "when", "where", "why", "if", "than", "then", "there", "their", "they", "he", "she", "his", "her", "we", "our", "us", "me", "my"])
WORD = re.compile(r"[a-z0-9']+")
NUMBER = re.compile(r"\d+")
SOFT_TEMPERATURE = 20.0  # the soft maximum of cosines: log-sum-exp at this inverse temperature


class Featurizer:
    """``FEATURES`` of answers; MiniLM embeddings are computed once per distinct text, features once per answer.

    Args:
        encode: ``texts -> (n, dim)`` embeddings (``minilm_encoder()``).
    """

    def __init__(self, encode: Encoder) -> None:
        from rouge_score import rouge_scorer

        self.encode = encode
        self._unit: dict[str, np.ndarray] = {}
        self._rows: dict[tuple[Any, ...], list[float]] = {}
        self._rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def _embed(self, texts: Sequence[str]) -> None:
        new = [t for t in dict.fromkeys(texts) if t not in self._unit]
        if not new:
            return
        vectors = np.asarray(self.encode(new), dtype=np.float64)  # (n_new, dim)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # (n_new, 1)
        units = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)  # (n_new, dim)
        self._unit.update(zip(new, units, strict=True))

    def __call__(self, items: Sequence[JudgeItem]) -> np.ndarray:
        """``(len(items), len(FEATURES))`` float32 features; an answer already featurised (same question,
        answer and references: e.g. the truth and the informativeness labels of one answer) is not redone.

        Args:
            items: the answers, with their references.
        """
        keys = [(i.question, i.answer, i.best_answer, i.correct_answers, i.incorrect_answers) for i in items]
        new = list({k: i for k, i in zip(keys, items, strict=True) if k not in self._rows}.items())
        refs = [references(i) for _, i in new]
        self._embed([NO_COMMENT, *(i.answer for _, i in new), *(i.question for _, i in new),
                     *(r for c, w in refs for r in (*c, *w))])
        for (key, item), (correct, incorrect) in zip(new, refs, strict=True):
            self._rows[key] = self._row(item, correct, incorrect)
        rows = [self._rows[k] for k in keys]
        return np.asarray(rows, dtype=np.float32).reshape(len(items), len(FEATURES))  # (n, n_features)

    def _row(self, item: JudgeItem, correct: list[str], incorrect: list[str]) -> list[float]:
        unit = self._unit
        answer = unit[item.answer]  # (dim,)
        sim_c = np.array([unit[r] @ answer for r in correct])  # (n_correct,)
        sim_i = np.array([unit[r] @ answer for r in incorrect])  # (n_incorrect,)
        top_c, top_i = np.sort(sim_c)[::-1], np.sort(sim_i)[::-1]
        second_c = top_c[1] if len(top_c) > 1 else top_c[0]
        second_i = top_i[1] if len(top_i) > 1 else top_i[0]
        nearest_c, nearest_i = correct[int(np.argmax(sim_c))], incorrect[int(np.argmax(sim_i))]
        soft = (np.log(np.exp(SOFT_TEMPERATURE * sim_c).sum()) - np.log(np.exp(SOFT_TEMPERATURE * sim_i).sum()))
        rouge_c = max(self._rouge.score(r, item.answer)["rougeL"].fmeasure for r in correct)
        rouge_i = max(self._rouge.score(r, item.answer)["rougeL"].fmeasure for r in incorrect)
        text = normalised(item.answer)
        cos_question = float(unit[item.question] @ answer)
        return [
            top_c[0], top_i[0], top_c[0] - top_i[0], sim_c.mean(), sim_i.mean(), sim_c.mean() - sim_i.mean(),
            top_c[:2].mean(), top_i[:2].mean(), cos_question, float(unit[NO_COMMENT] @ answer),
            float(unit[item.best_answer.strip()] @ answer) if item.best_answer.strip() in unit else top_c[0],
            float(any(normalised(r) == text for r in correct)), float(any(normalised(r) == text for r in incorrect)),
            float(len(item.answer.split())), float(bool(NEGATION.search(item.answer))),
            float(bool(NEGATION.search(nearest_c))), float(bool(NEGATION.search(nearest_i))),
            soft / SOFT_TEMPERATURE, rouge_c, rouge_i, rouge_c - rouge_i, float(bool(HEDGE.search(item.answer))),
            second_c, second_i, cos_question - top_c[0],
            *lexical(item, correct, incorrect),
        ]


def content_words(text: str) -> set[str]:
    """The lower-cased words of ``text`` that are not ``STOPWORDS``."""
    return {w for w in WORD.findall(text.lower()) if w not in STOPWORDS}


def polarity(text: str) -> float:
    """1 for an answer that starts with "yes", -1 for "no", else 0."""
    first = WORD.findall(text.lower())[:1]
    return {"yes": 1.0, "no": -1.0}.get(first[0], 0.0) if first else 0.0


def lexical(item: JudgeItem, correct: Sequence[str], incorrect: Sequence[str]) -> list[float]:
    """``LEXICAL``: which of the answer's content words (those not in the question) only the correct or only
    the incorrect references use, the best word recall and precision against a reference of each kind, the
    answer's yes/no polarity times the references' mean polarity, and its numbers.

    Misconceptions have their own words ("cracking your knuckles" -> "arthritis"), which a sentence
    embedding blurs; these counts keep them apart.
    """
    asked = content_words(item.question)
    answer = content_words(item.answer) - asked
    in_correct = {w for r in correct for w in content_words(r)} - asked
    in_incorrect = {w for r in incorrect for w in content_words(r)} - asked
    n = max(len(answer), 1)

    def overlap(refs: Sequence[str]) -> tuple[float, float]:  # best (recall of a reference, precision of the answer)
        pairs = [(len(ref & answer) / len(ref), len(ref & answer) / len(answer)) if ref and answer else (0.0, 0.0)
                 for ref in (content_words(r) - asked for r in refs)]
        return max(p[0] for p in pairs), max(p[1] for p in pairs)

    recall_c, precision_c = overlap(correct)
    recall_i, precision_i = overlap(incorrect)
    sign = polarity(item.answer)
    numbers = set(NUMBER.findall(item.answer))
    numbers_c = {x for r in correct for x in NUMBER.findall(r)}
    numbers_i = {x for r in incorrect for x in NUMBER.findall(r)}
    only_i, only_c = answer & (in_incorrect - in_correct), answer & (in_correct - in_incorrect)
    return [
        len(only_i) / n, len(only_c) / n, len(answer & in_correct & in_incorrect) / n,
        len(answer - in_correct - in_incorrect) / n, float(len(only_i)), float(len(only_c)),
        recall_c, precision_c, recall_i, precision_i, recall_c - recall_i, precision_c - precision_i,
        sign, sign * float(np.mean([polarity(r) for r in correct])),
        sign * float(np.mean([polarity(r) for r in incorrect])),
        float(bool(numbers)), float(bool(numbers & numbers_c)), float(bool(numbers & numbers_i)),
        float(bool(numbers - numbers_c - numbers_i)), float(not answer),
    ]


__all__ = ["FEATURES", "FEATURE_VERSION", "LEXICAL", "Featurizer", "content_words", "lexical", "polarity"]
