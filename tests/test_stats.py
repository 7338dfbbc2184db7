"""tf_codistill.stats against table values and hand-computed examples."""

import math

import pytest

from tf_codistill import stats


@pytest.mark.parametrize(
    "p, df, table",
    [  # Student t table (two-sided 95%, 90%, 99%)
        (0.975, 1, 12.706),
        (0.975, 2, 4.303),
        (0.975, 4, 2.776),
        (0.975, 10, 2.228),
        (0.975, 30, 2.042),
        (0.95, 5, 2.015),
        (0.995, 3, 5.841),
        (0.975, 1e6, 1.960),  # the normal limit
    ],
)
def test_t_quantile_matches_the_table(p, df, table):
    assert stats.t_quantile(p, df) == pytest.approx(table, abs=5e-4)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-table, abs=5e-4)
    assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)


def test_t_cdf_values():
    assert stats.t_cdf(0.0, 3) == 0.5
    assert stats.t_cdf(2.0, 10) == pytest.approx(0.963306, abs=1e-6)
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy: 1/2 + atan(1)/pi
    assert stats.t_cdf(-1.0, 2) == pytest.approx(0.5 - 0.5 / math.sqrt(3), abs=1e-12)  # closed form for df=2
    assert stats.betainc(2, 3, 0.4) == pytest.approx(
        0.5248, abs=1e-12
    )  # P(Binomial(4, 0.4) >= 2) = 1 - 0.6^4 - 4 * 0.4 * 0.6^3


def test_welch_by_hand():
    # a = 1..5 (mean 3, var 2.5), b = 2, 4, ..., 10 (mean 6, var 10):
    # se = sqrt(2.5/5 + 10/5) = sqrt(2.5); t = -3 / sqrt(2.5) = -1.8974;
    # df = 2.5^2 / (0.5^2/4 + 2^2/4) = 100/17 = 5.8824; R's t.test gives p = 0.1075
    # and the interval [-6.8877, 0.8877].
    result = stats.welch([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert result.diff == -3.0
    assert result.se == pytest.approx(math.sqrt(2.5))
    assert result.df == pytest.approx(100 / 17)
    assert result.p == pytest.approx(0.1075, abs=5e-5)
    assert (result.low, result.high) == pytest.approx((-6.8877, 0.8877), abs=5e-5)
    assert stats.verdict(result, "lower") == "cannot be told apart"


def test_contrast_of_gaps_and_verdicts():
    # (a - b) - (c - d) with four samples of 3 values each, variance 1 each:
    # estimate = (10 - 5) - (7 - 6) = 4; se = sqrt(4 * 1/3); df = (4/3)^2 / (4 * (1/3)^2 / 2) = 8.
    a, b, c, d = [9, 10, 11], [4, 5, 6], [6, 7, 8], [5, 6, 7]
    result = stats.contrast([a, b, c, d], [1, -1, -1, 1])
    assert result.diff == pytest.approx(4.0)
    assert result.se == pytest.approx(math.sqrt(4 / 3))
    assert result.df == pytest.approx(8.0)
    half = 2.306004 * math.sqrt(4 / 3)  # t(0.975, 8) = 2.306
    assert (result.low, result.high) == pytest.approx((4 - half, 4 + half), abs=1e-5)
    assert stats.verdict(result, "higher") == "held"
    assert stats.verdict(result, "lower") == "failed"
    assert stats.verdict(result, "same") == "failed"
    assert stats.verdict(result, None) == "differs"


def test_mean_se_and_edge_cases():
    assert stats.mean_se([2.0]) == (2.0, 0.0)
    mean, se = stats.mean_se([1, 2, 3, 4])
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3 / 4))
    same = stats.welch([1.0, 1.0], [1.0, 1.0])
    assert same.p == 1.0 and stats.verdict(same, "same") == "cannot be told apart"
    with pytest.raises(ValueError, match="at least 2 values"):
        stats.welch([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="expected"):
        stats.verdict(same, "bigger")


def test_agrees_with_scipy_where_installed():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1.5, 3, 7.3, 42):
        for t in (-3.1, -0.4, 0.9, 2.5):
            assert stats.t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), abs=1e-10)
    a, b = [0.971, 0.969, 0.974, 0.972, 0.970], [0.965, 0.968, 0.963, 0.966, 0.969]
    ours = stats.welch(a, b)
    theirs = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert ours.p == pytest.approx(theirs.pvalue, abs=1e-10)
    assert ours.low == pytest.approx(theirs.confidence_interval().low, abs=1e-10)
