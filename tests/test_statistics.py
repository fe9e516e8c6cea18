"""Bootstrap intervals against scipy (same draws) and a plain loop; McNemar against statsmodels;
per-category tables by hand."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from evaluation.statistics import EXACT_BELOW, bootstrap_ci, mcnemar, paired_difference, per_category

VALUES = [0.3, 1.0, 0.0, 0.7, 0.25, 0.9, 0.1, 0.55, 0.4, 0.8, 1.0, 0.0]


def scipy_percentile(data: tuple[np.ndarray, ...], statistic, n: int, confidence: float, seed: int,
                     paired: bool = False) -> tuple[float, float]:
    result = stats.bootstrap(data, statistic, n_resamples=n, confidence_level=confidence, method="percentile",
                             vectorized=True, paired=paired, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@pytest.mark.parametrize("seed,confidence,n", [(0, 0.95, 1000), (7, 0.9, 500), (123, 0.99, 2000)])
def test_bootstrap_equals_scipy_percentile_with_the_same_draws(seed: int, confidence: float, n: int) -> None:
    mean, low, high = bootstrap_ci(VALUES, n_bootstrap=n, confidence=confidence, seed=seed)
    ref_low, ref_high = scipy_percentile((np.array(VALUES),), np.mean, n, confidence, seed)
    assert mean == pytest.approx(np.mean(VALUES), abs=1e-15)
    assert (low, high) == (pytest.approx(ref_low, abs=1e-12), pytest.approx(ref_high, abs=1e-12))
    assert low <= mean <= high


def test_bootstrap_equals_a_plain_loop() -> None:
    rng = np.random.default_rng(3)
    draws = rng.integers(0, len(VALUES), (200, len(VALUES)))
    means = sorted(sum(VALUES[j] for j in row) / len(VALUES) for row in draws)
    # linear interpolation between order statistics, as numpy's default quantile
    def quantile(q: float) -> float:
        pos = q * (len(means) - 1)
        lo = math.floor(pos)
        return means[lo] + (pos - lo) * (means[min(lo + 1, len(means) - 1)] - means[lo])

    _, low, high = bootstrap_ci(VALUES, n_bootstrap=200, confidence=0.8, seed=3)
    assert low == pytest.approx(quantile(0.1), abs=1e-12) and high == pytest.approx(quantile(0.9), abs=1e-12)


def test_bootstrap_skips_missing_values_and_is_deterministic() -> None:
    with_missing = [None, *VALUES[:5], math.nan, *VALUES[5:], None]
    assert bootstrap_ci(with_missing, 300, 0.95, 5) == bootstrap_ci(VALUES, 300, 0.95, 5)
    assert bootstrap_ci(VALUES, 300, 0.95, 5) != bootstrap_ci(VALUES, 300, 0.95, 6)
    assert bootstrap_ci([True, False, True, True], 100, 0.95, 0)[0] == 0.75
    assert all(math.isnan(v) for v in bootstrap_ci([None, math.nan], 100, 0.95, 0))
    assert bootstrap_ci([0.5], 100, 0.95, 0) == (0.5, 0.5, 0.5)


def test_bootstrap_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"n_bootstrap=0 must be >= 1"):
        bootstrap_ci(VALUES, 0)
    with pytest.raises(ValueError, match=r"confidence=95 must be in \(0, 1\), e.g. 0.95"):
        bootstrap_ci(VALUES, 10, 95)


def test_paired_difference_equals_scipy_paired_bootstrap() -> None:
    a = [1, 0, 1, 1, None, 1, 0, 1, 1, 0, 1, 1]
    b = [0, 0, 1, 0, 1, math.nan, 0, 1, 0, 0, 1, 0]
    both = [i for i in range(len(a)) if a[i] is not None and not math.isnan(float(b[i]))]
    x, y = np.array([a[i] for i in both], dtype=float), np.array([b[i] for i in both], dtype=float)
    diff, low, high = paired_difference(a, b, n_bootstrap=1000, confidence=0.95, seed=11)
    ref = scipy_percentile((x, y), lambda u, v, axis: np.mean(u - v, axis=axis), 1000, 0.95, 11, paired=True)
    assert diff == pytest.approx(np.mean(x - y))
    assert (low, high) == (pytest.approx(ref[0], abs=1e-12), pytest.approx(ref[1], abs=1e-12))
    with pytest.raises(ValueError, match="equal lengths, got 3 and 2"):
        paired_difference([1, 2, 3], [1, 2])


def outcomes(n11: int, n10: int, n01: int, n00: int) -> tuple[list[int], list[int]]:
    a = [1] * n11 + [1] * n10 + [0] * n01 + [0] * n00
    b = [1] * n11 + [0] * n10 + [1] * n01 + [0] * n00
    return a, b


TABLES = [(10, 5, 2, 10), (3, 0, 7, 1), (20, 30, 12, 5), (5, 13, 13, 4), (0, 40, 25, 0), (8, 1, 0, 9), (2, 12, 12, 2)]


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("exact", [True, False])
def test_mcnemar_equals_statsmodels(table: tuple[int, int, int, int], exact: bool) -> None:
    n11, n10, n01, n00 = table
    a, b = outcomes(*table)
    statistic, p_value = mcnemar(a, b, exact=exact)
    ref = sm_mcnemar(np.array([[n11, n10], [n01, n00]]), exact=exact, correction=True)
    assert statistic == pytest.approx(float(ref.statistic), abs=1e-12)
    assert p_value == pytest.approx(float(ref.pvalue), rel=1e-10, abs=1e-15)


@pytest.mark.parametrize("table", TABLES)
def test_mcnemar_chooses_exact_below_25_discordant(table: tuple[int, int, int, int]) -> None:
    n11, n10, n01, n00 = table
    ref = sm_mcnemar(np.array([[n11, n10], [n01, n00]]), exact=n10 + n01 < EXACT_BELOW, correction=True)
    assert mcnemar(*outcomes(*table)) == (pytest.approx(float(ref.statistic)), pytest.approx(float(ref.pvalue)))


def test_mcnemar_skips_missing_and_rejects_non_binary() -> None:
    a, b = outcomes(4, 3, 1, 2)
    assert mcnemar([*a, None, 1], [*b, 0, math.nan]) == mcnemar(a, b)
    assert mcnemar([1, 0, 1], [1, 0, 1]) == (0.0, 1.0)
    assert mcnemar([True, False], [False, False]) == mcnemar([1, 0], [0, 0])
    with pytest.raises(ValueError, match=r"binary outcomes \(0/1\), got \[0.5\]"):
        mcnemar([0.5, 1], [0, 1])


def test_per_category_counts_means_and_delta() -> None:
    rows: list[dict[str, Any]] = [
        {"category": "Health", "m": 1}, {"category": "Health", "m": 0}, {"category": "Health", "m": None},
        {"category": "Law", "m": 1}, {"category": "Law", "m": 1}, {"category": "Fiction", "m": math.nan},
    ]
    baseline: list[dict[str, Any]] = [{"category": "Health", "m": 0}, {"category": "Law", "m": 0.5}, {"category": "Law", "m": 0.5}]
    table = per_category(rows, "m", baseline=baseline)
    assert list(table.columns) == ["category", "n", "mean", "delta"]
    assert table["category"].tolist() == ["Health", "Law"]
    assert table["n"].tolist() == [2, 2] and table["mean"].tolist() == [0.5, 1.0]
    assert table["delta"].tolist() == [0.5, 0.5]
    assert list(per_category(rows, "m").columns) == ["category", "n", "mean"]
    with pytest.raises(ValueError, match="metric 'x' is in no row; row fields: category, m"):
        per_category(rows, "x")
    with pytest.raises(ValueError, match="rows \\[1\\] have no 'category' key"):
        per_category([{"category": "A", "m": 1}, {"m": 1.0}], "m")


def test_per_category_delta_intervals_are_paired_within_each_category() -> None:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2, 400).astype(float)
    steered = np.where(rng.random(400) < 0.3, 1.0, base)  # flips some 0 to 1: a gain, correlated with baseline
    category = np.where(np.arange(400) < 300, "Big", "Small")
    same = [{"category": c, "m": b} for c, b in zip(category, base, strict=True)]
    rows = [{"category": c, "m": s} for c, s in zip(category, steered, strict=True)]
    table = per_category(rows, "m", baseline=same, n_bootstrap=4000, seed=1).set_index("category")
    assert list(table.columns) == ["n", "mean", "delta", "delta_ci_low", "delta_ci_high"]
    for name, where in (("Big", category == "Big"), ("Small", category == "Small")):
        # the oracle: scipy's percentile bootstrap of the per-question differences of this category alone
        oracle = stats.bootstrap(((steered - base)[where],), np.mean, n_resamples=4000, method="percentile",
                                 random_state=7).confidence_interval
        assert table.loc[name, "delta_ci_low"] == pytest.approx(oracle.low, abs=0.01)
        assert table.loc[name, "delta_ci_high"] == pytest.approx(oracle.high, abs=0.01)
    # a variant that gains exactly one on every question is certain of it: a paired interval has no width
    shifted = [{"category": r["category"], "m": r["m"] + 1} for r in same]
    exact = per_category(shifted, "m", baseline=same, n_bootstrap=200)
    assert (exact["delta_ci_low"] == 1.0).all() and (exact["delta_ci_high"] == 1.0).all()
    with pytest.raises(ValueError, match="same questions: 400 rows against 3"):
        per_category(rows, "m", baseline=same[:3], n_bootstrap=10)
