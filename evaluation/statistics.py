"""Intervals and tests for judge metrics: bootstrap CIs, paired differences, McNemar, categories.

Every function skips missing values (``None`` or NaN: a verdict the judge could not give), is
deterministic for a seed, and draws all bootstrap resamples in one vectorised call:
``rng.integers(0, n, (n_bootstrap, n))`` from ``numpy.random.default_rng(seed)``, the same draws
``scipy.stats.bootstrap(..., method="percentile", vectorized=True, rng=default_rng(seed))``
makes, so the intervals match scipy's percentile intervals exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

Value = float | int | bool | None
EXACT_BELOW = 25  # McNemar: exact binomial test when fewer discordant pairs than this


def _as_float(values: Sequence[Value] | np.ndarray) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)  # (n,)


def _check(n_bootstrap: int, confidence: float) -> None:
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap={n_bootstrap} must be >= 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")


def _percentile_ci(x: np.ndarray, n_bootstrap: int, confidence: float, seed: int) -> tuple[float, float, float]:
    if x.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, (n_bootstrap, x.size))  # (n_bootstrap, n)
    means = x[idx].mean(axis=1)  # (n_bootstrap,)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(x.mean()), float(low), float(high)


def bootstrap_ci(
    values: Sequence[Value] | np.ndarray, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean.

    Args:
        values: per-item values; ``None`` and NaN are left out.
        n_bootstrap: number of resamples.
        confidence: interval coverage, e.g. 0.95.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``(mean, low, high)``; all NaN when no value is left.
    """
    _check(n_bootstrap, confidence)
    x = _as_float(values)
    return _percentile_ci(x[~np.isnan(x)], n_bootstrap, confidence, seed)


def _paired(a: Sequence[Value] | np.ndarray, b: Sequence[Value] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_float(a), _as_float(b)
    if x.shape != y.shape:
        raise ValueError(f"paired values need equal lengths, got {x.size} and {y.size}; align them by question id")
    both = ~np.isnan(x) & ~np.isnan(y)  # (n,)
    return x[both], y[both]


def paired_difference(
    a: Sequence[Value] | np.ndarray,
    b: Sequence[Value] | np.ndarray,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over items valid in both, with a paired percentile-bootstrap interval.

    Items are resampled as pairs, so the interval reflects the per-question correlation of the
    two variants (e.g. steered vs baseline on the same questions).

    Args:
        a: per-item values of one variant.
        b: per-item values of the other, aligned with ``a``.
        n_bootstrap: number of resamples.
        confidence: interval coverage.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``(diff, low, high)``; all NaN when no item is valid in both.
    """
    _check(n_bootstrap, confidence)
    x, y = _paired(a, b)
    return _percentile_ci(x - y, n_bootstrap, confidence, seed)


def mcnemar(
    a: Sequence[Value] | np.ndarray, b: Sequence[Value] | np.ndarray, *, exact: bool | None = None
) -> tuple[float, float]:
    """McNemar's test that two variants' binary outcomes on the same items have equal rates.

    Only the discordant items count: ``n10`` (a=1, b=0) and ``n01`` (a=0, b=1). With fewer than
    ``EXACT_BELOW`` (25) of them (or ``exact=True``) it is the exact two-sided binomial test:
    statistic ``min(n10, n01)``, p = ``min(1, 2 * BinomCDF(min; n10 + n01, 1/2))``. Otherwise (or
    ``exact=False``) it is the chi-square test with continuity correction: statistic
    ``(|n10 - n01| - 1)^2 / (n10 + n01)``, p from chi-square with 1 degree of freedom. Both match
    ``statsmodels.stats.contingency_tables.mcnemar(table, exact=..., correction=True)``.

    Args:
        a: per-item outcomes (1/0, True/False; ``None``/NaN left out) of one variant.
        b: the other variant's, aligned with ``a``.
        exact: force the exact (True) or chi-square (False) test; ``None`` chooses by count.

    Returns:
        ``(statistic, p_value)``; with no discordant item ``(0.0, 1.0)``.
    """
    x, y = _paired(a, b)
    bad = sorted({float(v) for v in np.concatenate([x, y]) if v not in (0.0, 1.0)})
    if bad:
        raise ValueError(f"McNemar needs binary outcomes (0/1), got {bad[:5]}; threshold the metric first")
    n10 = int(np.sum((x == 1) & (y == 0)))
    n01 = int(np.sum((x == 0) & (y == 1)))
    discordant = n10 + n01
    if exact is None:
        exact = discordant < EXACT_BELOW
    if discordant == 0:
        return 0.0, 1.0
    if exact:
        statistic = min(n10, n01)
        return float(statistic), float(min(1.0, 2.0 * stats.binom.cdf(statistic, discordant, 0.5)))
    chi2 = (abs(n10 - n01) - 1) ** 2 / discordant
    return float(chi2), float(stats.chi2.sf(chi2, 1))


def confusion_counts(labels: Sequence[int] | np.ndarray, verdicts: Sequence[int] | np.ndarray) -> np.ndarray:
    """``(n, 4)``: each row's one-hot place in ``[tp, fp, fn, tn]`` of 0/1 labels (reference) and verdicts;
    ``.sum(axis=0)`` is the 2x2 table."""
    y, v = np.asarray(labels) == 1, np.asarray(verdicts) == 1
    return np.stack([y & v, ~y & v, y & ~v, ~y & ~v], axis=1).astype(float).reshape(len(y), 4)


def binary_agreement(counts: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy and Cohen's kappa from ``[..., 4]`` counts ``[tp, fp, fn, tn]``,
    vectorised over the leading axes (bootstrap resamples); NaN where undefined.

    Args:
        counts: confusion counts, e.g. ``confusion_counts(labels, verdicts).sum(axis=0)``.
    """
    tp, fp, fn, tn = (counts[..., i] for i in range(4))
    n = tp + fp + fn + tn
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = (tp + tn) / n
        balanced = 0.5 * (tp / (tp + fn) + tn / (tn + fp))
        chance = ((tp + fn) * (tp + fp) + (tn + fp) * (tn + fn)) / (n * n)
        kappa = (accuracy - chance) / (1 - chance)
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "kappa": kappa}


def _category_means(rows: Sequence[Mapping[str, Any]], metric: str) -> pd.DataFrame:
    missing = [i for i, r in enumerate(rows) if "category" not in r]
    if missing:
        raise ValueError(f"rows {missing[:5]} have no 'category' key; add the question's category to each row")
    frame = pd.DataFrame({
        "category": [str(r["category"]) for r in rows],
        "value": _as_float([r.get(metric) for r in rows]),
    }).dropna()
    grouped = frame.groupby("category")["value"]
    return pd.DataFrame({"n": grouped.size(), "mean": grouped.mean()})


def per_category(
    rows: Sequence[Mapping[str, Any]], metric: str, baseline: Sequence[Mapping[str, Any]] | None = None,
    *, n_bootstrap: int = 0, confidence: float = 0.95, seed: int = 0,
) -> pd.DataFrame:
    """Per TruthfulQA category: the number of valid rows and the metric's mean.

    Args:
        rows: per-item rows holding ``category`` and ``metric`` (``None``/NaN rows are left out).
        metric: the field to average, e.g. ``llm_logprob_truthful``.
        baseline: rows of the baseline variant; when given, ``delta`` = mean - the baseline's mean
            in the same category (NaN where the baseline has no valid row).
        n_bootstrap: with ``baseline`` (aligned with ``rows``: the same questions in the same order) and
            ``n_bootstrap > 0``, also ``delta_ci_low``/``delta_ci_high``: the paired bootstrap interval of the
            category's delta over its questions valid in both (``paired_difference``).
        confidence: the interval's coverage.
        seed: the resampling seed (the same for every category).

    Returns:
        Columns ``category``, ``n``, ``mean`` (and ``delta``, ``delta_ci_low``, ``delta_ci_high``), sorted by
        category.
    """
    if rows and not any(metric in r for r in rows):
        raise ValueError(f"metric {metric!r} is in no row; row fields: {', '.join(sorted(rows[0]))}")
    table = _category_means(rows, metric)
    if baseline is not None:
        base = _category_means(baseline, metric)["mean"]
        table["delta"] = table["mean"] - base.reindex(table.index)
        if n_bootstrap > 0:
            if len(baseline) != len(rows):
                raise ValueError(f"paired category intervals need the baseline's rows for the same questions: "
                                 f"{len(rows)} rows against {len(baseline)}")
            mine, theirs = _as_float([r.get(metric) for r in rows]), _as_float([r.get(metric) for r in baseline])
            where = np.array([str(r.get("category")) for r in rows])
            bounds = {c: paired_difference(mine[where == c], theirs[where == c], n_bootstrap, confidence, seed)[1:]
                      for c in table.index}
            table["delta_ci_low"] = [bounds[c][0] for c in table.index]
            table["delta_ci_high"] = [bounds[c][1] for c in table.index]
    table["n"] = table["n"].astype(int)
    return table.rename_axis("category").reset_index().sort_values("category", ignore_index=True)
