"""Metric names in words for figures and reports: what each metric measures and which judge measured it."""

from __future__ import annotations

# metric -> what it measures, in words (the judge is added by ``axis_label``)
WORDS = {
    "judge_truthful_informative": "True×Info rate", "judge_truthful": "truthful rate",
    "judge_informative": "informative rate", "judge_p_true": "mean P(truthful)", "judge_p_info": "mean P(informative)",
    "llm_truthful": "truthful rate", "llm_informative": "informative rate", "llm_logprob_truthful": "truthful rate",
    "semantic_acc": "truthful rate", "semantic_max": "similarity to the nearest true reference",
    "semantic_diff": "similarity: nearest true minus nearest false reference",
    "mc1": "MC1 accuracy", "mc2": "MC2: probability on the true answers",
    "bleu_acc": "BLEU accuracy", "rouge1_acc": "ROUGE-1 accuracy", "rougeL_acc": "ROUGE-L accuracy",
    "kl_neutral": "KL from the unsteered model on neutral text (nats/token)",
    "ce_neutral": "cross-entropy on neutral text (nats/token)", "kl_answers": "KL on the answers (nats/token)",
    "objective": "tuning objective", "degenerate_answer_rate": "degenerate-answer rate",
}
# metric prefix -> (the judge's calibrate name, the judge in words); longest prefix first
JUDGES = (("llm_logprob_", "llm_logprob", "LLM log-prob judge"), ("judge_", "judge", "trained judge"),
          ("llm_", "llm", "LLM judge"), ("semantic_", "semantic", "MiniLM similarity judge"),
          ("bleu_", "bleu", "BLEU against the references"), ("rouge", "rouge", "ROUGE against the references"),
          ("mc", "", "multiple choice, no judge"))

def judge_of(name: str) -> tuple[str, str]:
    """The calibrate name ("" for none) and the words for the judge behind metric ``name``."""
    return next(((judge, words) for prefix, judge, words in JUDGES if name.startswith(prefix)), ("", ""))


def words(name: str) -> str:
    """Metric ``name`` in words, without its judge (a short axis label under a titled panel)."""
    return WORDS.get(name, name.replace("_", " "))


def axis_label(name: str) -> str:
    """Metric ``name`` in words with its judge, e.g. ``truthful rate (trained judge)``; unknown names with their
    underscores as spaces."""
    words = WORDS.get(name, name.replace("_", " "))
    judge = judge_of(name)[1]
    return f"{words} ({judge})" if judge and not name.startswith(("kl_", "ce_")) else words


__all__ = ["JUDGES", "WORDS", "axis_label", "judge_of", "words"]
