"""The judge-agreement figure's table: per model and variant, the truthfulness verdict of the evaluation's first
judge (the trained judge, else the LLM judge) against the semantic judge's on the same answers, with Cohen's kappa
and its bootstrap interval."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.runs import Missing, as_float
from analysis.tables import variant_order
from evaluation.statistics import binary_agreement

# the first judge's 0/1 truthfulness field, preferred first: the trained judge (the default), then the LLM judges
LLM_VERDICTS = ("judge_truthful", "llm_truthful", "llm_logprob_truthful")
SEMANTIC_VERDICT = "semantic_acc"
AGREEMENT_COLUMNS = ["model", "variant", "llm_metric", "semantic_metric", "n", "both_true", "llm_only",
                     "semantic_only", "both_false", "agreement", "kappa", "kappa_ci_low", "kappa_ci_high"]
KAPPA_BOOTSTRAP = 2000  # resamples of the answers for kappa's 95% interval


def cohen_kappa(both_true: int, first_only: int, second_only: int, both_false: int) -> float:
    """Cohen's kappa of two binary raters from their 2x2 table: ``(p_o - p_e) / (1 - p_e)``.

    NaN when undefined: no items, or both raters constant and equal (``p_e = 1``).

    Args:
        both_true: items both rated 1.
        first_only: items only the first rated 1.
        second_only: items only the second rated 1.
        both_false: items both rated 0.
    """
    counts = np.array([both_true, second_only, first_only, both_false], dtype=float)  # tp, fp, fn, tn of the first
    return float(binary_agreement(counts)["kappa"])


def kappa_interval(both_true: int, first_only: int, second_only: int, both_false: int, *,
                   n_bootstrap: int = KAPPA_BOOTSTRAP, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """The percentile-bootstrap interval of Cohen's kappa, resampling the rated items (a multinomial draw of
    the 2x2 table); resamples where kappa is undefined are left out. NaN when no item.

    Args:
        both_true: items both rated 1.
        first_only: items only the first rated 1.
        second_only: items only the second rated 1.
        both_false: items both rated 0.
        n_bootstrap: resamples.
        confidence: the interval's coverage.
        seed: seed of ``numpy.random.default_rng``.
    """
    counts = np.array([both_true, second_only, first_only, both_false], dtype=float)  # tp, fp, fn, tn of the first
    n = int(counts.sum())
    if n == 0:
        return math.nan, math.nan
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=n_bootstrap).astype(float)  # (B, 4)
    kappas = binary_agreement(draws)["kappa"]
    kappas = kappas[np.isfinite(kappas)]
    if not kappas.size:
        return math.nan, math.nan
    alpha = (1 - confidence) / 2
    low, high = np.quantile(kappas, [alpha, 1 - alpha])
    return float(low), float(high)


def _verdict(value: Any) -> bool | None:
    number = as_float(value)
    return None if math.isnan(number) else number >= 0.5


def agreement_table(rows_by_model: Mapping[str, Sequence[Mapping[str, Any]]], missing: Missing,
                    model_order: Sequence[str] | None = None) -> pd.DataFrame:
    """Per model and variant: the 2x2 table of the LLM judge's truthfulness verdict against the
    semantic judge's ``semantic_acc``, the share of agreement and Cohen's kappa.

    Rows where either verdict is missing (an invalid judge output) are left out.

    Args:
        rows_by_model: model -> its generations rows (``evaluate/generations.jsonl``).
        missing: records models whose rows lack either verdict.
        model_order: the models' order; default by name.
    """
    records = []
    for model in model_order or sorted(rows_by_model):
        rows = rows_by_model.get(model)
        if rows is None:
            continue
        llm = next((f for f in LLM_VERDICTS if any(_verdict(r.get(f)) is not None for r in rows)), None)
        if llm is None or not any(_verdict(r.get(SEMANTIC_VERDICT)) is not None for r in rows):
            lacks = [f"{' or '.join(LLM_VERDICTS)}" if llm is None else "", SEMANTIC_VERDICT
                     if not any(_verdict(r.get(SEMANTIC_VERDICT)) is not None for r in rows) else ""]
            missing.add(f"generations without {' and '.join(x for x in lacks if x)}: no judge agreement", model=model)
            continue
        for variant in variant_order(str(r.get("variant", "")) for r in rows):
            pairs = [(_verdict(r.get(llm)), _verdict(r.get(SEMANTIC_VERDICT))) for r in rows
                     if str(r.get("variant", "")) == variant]
            valid = [(a, b) for a, b in pairs if a is not None and b is not None]
            counts = [sum(1 for a, b in valid if (a, b) == cell)
                      for cell in ((True, True), (True, False), (False, True), (False, False))]
            n = len(valid)
            records.append({"model": model, "variant": variant, "llm_metric": llm, "semantic_metric": SEMANTIC_VERDICT,
                            "n": n, "both_true": counts[0], "llm_only": counts[1], "semantic_only": counts[2],
                            "both_false": counts[3], "agreement": (counts[0] + counts[3]) / n if n else math.nan,
                            "kappa": cohen_kappa(*counts),
                            **dict(zip(("kappa_ci_low", "kappa_ci_high"), kappa_interval(*counts), strict=True))})
            if n < len(pairs):
                missing.add(f"{variant}: {len(pairs) - n} of {len(pairs)} answers lack a verdict of {llm} or "
                            f"{SEMANTIC_VERDICT}: left out of the agreement", model=model)
    return pd.DataFrame(records, columns=AGREEMENT_COLUMNS) if records else pd.DataFrame({c: pd.Series(dtype=object) for c in AGREEMENT_COLUMNS})


__all__ = ['AGREEMENT_COLUMNS', 'agreement_table', 'cohen_kappa', 'kappa_interval']
