"""Judges of generated answers and the statistics over their scores."""

from evaluation.judges import (
    JUDGE_NAMES,
    REGISTRY,
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
from evaluation.llm_judge import LLMJudge
from evaluation.logprob_judge import LogprobJudge
from evaluation.metrics import BleuJudge, RougeJudge
from evaluation.semantic_judge import SemanticJudge, minilm_encoder
from evaluation.statistics import bootstrap_ci, mcnemar, paired_difference, per_category
from evaluation.verdicts import InvalidRateExceeded, Verdict, check_invalid_ceiling, parse_verdict

__all__ = [
    "JUDGE_NAMES",
    "REGISTRY",
    "BaseJudge",
    "BleuJudge",
    "InvalidRateExceeded",
    "Judge",
    "JudgeError",
    "JudgeItem",
    "JudgeRegistry",
    "LLMJudge",
    "LogprobJudge",
    "RougeJudge",
    "SemanticJudge",
    "Verdict",
    "aggregate",
    "aggregate_judge",
    "bootstrap_ci",
    "check_invalid_ceiling",
    "make_judge",
    "mcnemar",
    "metric_directions",
    "minilm_encoder",
    "paired_difference",
    "parse_verdict",
    "per_category",
    "register",
    "registered_judges",
    "truthfulqa_references",
]
