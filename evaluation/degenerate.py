"""Answers that say nothing: empty, or a few words repeated (``particular particular particular ...``).

A steering scale that is too large for a model keeps generating tokens but no answer; judges that
compare texts may still score such output. Every variant counts them (``empty_answer_rate``,
``degenerate_answer_rate``), and a variant above ``eval.degenerate_ceiling`` fails its run after its
metrics are logged, as an invalid-verdict rate above ``judge.invalid_ceiling`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MIN_WORDS = 8  # shorter answers are never called repetitive ("No." is an answer)
MAX_DISTINCT_SHARE = 0.3  # at most this share of an answer's words distinct: a few words on repeat


class DegenerateAnswers(RuntimeError):
    """Too many of a variant's answers are empty or repetitive for its metrics to mean anything."""


def is_empty(answer: str) -> bool:
    return not answer.strip()


def is_degenerate(answer: str) -> bool:
    """Empty, or at least ``MIN_WORDS`` words of which at most ``MAX_DISTINCT_SHARE`` are distinct."""
    words = answer.split()
    return not words or (len(words) >= MIN_WORDS and len(set(words)) / len(words) <= MAX_DISTINCT_SHARE)


def answer_rates(answers: Sequence[str]) -> dict[str, float]:
    """``empty_answer_rate`` and ``degenerate_answer_rate`` (empty ones included) of one variant's answers."""
    n = len(answers)
    if n == 0:
        return {"empty_answer_rate": math.nan, "degenerate_answer_rate": math.nan}
    return {"empty_answer_rate": sum(map(is_empty, answers)) / n,
            "degenerate_answer_rate": sum(map(is_degenerate, answers)) / n}


def check_degenerate(rate: float, ceiling: float, variant: str) -> None:
    """Fail when a variant's ``degenerate_answer_rate`` exceeds ``ceiling`` (``eval.degenerate_ceiling``).

    Raises:
        DegenerateAnswers: the message names the rate, the ceiling and the fixes.
    """
    if rate > ceiling:
        raise DegenerateAnswers(
            f"{variant}: degenerate_answer_rate={rate:.3f} exceeds eval.degenerate_ceiling={ceiling:.3f}: most "
            "answers are empty or a few words repeated, so its metrics measure noise. Lower steering.scale (or "
            "use steering.scale_mode=relative with a smaller fraction), or raise eval.degenerate_ceiling to log "
            "such a variant anyway")


__all__ = ["DegenerateAnswers", "MAX_DISTINCT_SHARE", "MIN_WORDS", "answer_rates", "check_degenerate", "is_degenerate",
           "is_empty"]
