"""Statistics for study reports: mean ± standard error over seeds, Welch's
t-test and confidence interval, and the Student t distribution they need.

Pure Python (no SciPy): the t CDF is the regularized incomplete beta
function, evaluated by its continued fraction (Numerical Recipes, 3rd ed.,
section 6.4); the quantile inverts the CDF by bisection. Accurate to about
1e-10, far below what a handful of seeds can resolve.

    >>> round(t_quantile(0.975, 4), 4)
    2.7764
    >>> d = welch([0.97, 0.98, 0.975], [0.96, 0.965, 0.962])
    >>> d.low < d.diff < d.high
    True
"""

from __future__ import annotations

import dataclasses
import math

__all__ = [
    "Contrast",
    "betainc",
    "contrast",
    "mean_se",
    "t_cdf",
    "t_quantile",
    "verdict",
    "welch",
]


def mean_se(values) -> tuple[float, float]:
    """(mean, standard error of the mean) of `values`; the error is 0 for one value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_se needs at least one value.")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and x in [0, 1]."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0; got a={a}, b={b}.")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs x in [0, 1]; got {x}.")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` > 0 degrees of freedom (df need not be whole)."""
    if df <= 0:
        raise ValueError(f"t_cdf needs df > 0; got {df}.")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, for p in (0, 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs p in (0, 1); got {p}.")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2.0
        if high > 1e12:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclasses.dataclass(frozen=True)
class Contrast:
    """An estimate from independent samples with its Welch interval.

    diff: the estimate (for `welch`, mean(a) - mean(b)); se: its standard
    error; df: Welch-Satterthwaite degrees of freedom (inf when se is 0);
    low/high: the `level` confidence interval; p: the two-sided p-value of
    "the true value is 0" (1.0 where se is 0 and diff is 0, 0.0 where se is
    0 and diff is not).
    """

    diff: float
    se: float
    df: float
    low: float
    high: float
    p: float
    level: float = 0.95

    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


def contrast(samples, coefficients, level: float = 0.95) -> Contrast:
    """sum_i c_i * mean(samples_i) with a Welch interval (independent samples,
    unequal variances). `welch(a, b)` is the contrast (+1, -1); a difference
    of two gaps, (a - b) - (c - d), is (+1, -1, -1, +1).

    Every sample needs at least 2 values (a variance)."""
    samples = [[float(v) for v in s] for s in samples]
    coefficients = [float(c) for c in coefficients]
    if len(samples) != len(coefficients) or not samples:
        raise ValueError("contrast needs one coefficient per sample.")
    if any(len(s) < 2 for s in samples):
        raise ValueError("contrast needs at least 2 values per sample (seeds) for a variance.")
    estimate = 0.0
    var = 0.0
    df_denominator = 0.0
    for s, c in zip(samples, coefficients):
        n = len(s)
        mean = math.fsum(s) / n
        s2 = math.fsum((v - mean) ** 2 for v in s) / (n - 1)
        term = c * c * s2 / n
        estimate += c * mean
        var += term
        df_denominator += term * term / (n - 1)
    se = math.sqrt(var)
    if se == 0.0:
        p = 1.0 if estimate == 0.0 else 0.0
        return Contrast(estimate, 0.0, math.inf, estimate, estimate, p, level)
    df = var * var / df_denominator
    q = t_quantile(0.5 + level / 2.0, df)
    p = 2.0 * t_cdf(-abs(estimate) / se, df)
    return Contrast(estimate, se, df, estimate - q * se, estimate + q * se, min(1.0, p), level)


def welch(a, b, level: float = 0.95) -> Contrast:
    """mean(a) - mean(b) with its Welch confidence interval and two-sided p-value."""
    return contrast([a, b], [1.0, -1.0], level)


EXPECTATIONS = ("higher", "lower", "same")


def verdict(result: Contrast, expected: str | None) -> str:
    """What the interval says about an expected direction of the difference.

    The interval excludes 0: "held" when its sign is the expected one
    ("higher": > 0, "lower": < 0), "failed" otherwise (for "same" too: a
    difference was found). It includes 0: "cannot be told apart" (for
    "same" this does not prove equality: the interval bounds the difference).
    Without an expectation: "differs" or "cannot be told apart".
    """
    if expected is not None and expected not in EXPECTATIONS:
        raise ValueError(f"expected must be one of {EXPECTATIONS} or None; got {expected!r}.")
    if not result.excludes_zero():
        return "cannot be told apart"
    if expected is None:
        return "differs"
    if expected == "same":
        return "failed"
    sign = "higher" if result.diff > 0 else "lower"
    return "held" if sign == expected else "failed"
