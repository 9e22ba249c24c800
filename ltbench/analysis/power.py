"""How many seeds a test needs: power of the t-tests behind the verdicts (scipy's noncentral t).

Every test here looks at an estimate ``d`` (ours − paper for a paper cell, a gain for a claimed
gain) with standard error ``scale / √n`` and ``df_per · (n − 1)`` degrees of freedom, where ``n`` is
the number of seeds (per method for a gain):

- one-sample / paired t: ``scale`` = the standard deviation over seeds (of the per-seed differences
  for a paired test), ``df_per`` = 1;
- Welch's t with ``n`` seeds per method: ``scale`` = √(s₁² + s₂²) and ``df_per`` =
  (s₁² + s₂²)² / (s₁⁴ + s₂⁴) (the Welch–Satterthwaite degrees of freedom with equal n).

:func:`difference_power` is the power of the two-sided t-test at level α to show ``d ≠ 0`` when the
true value is ``d``: P(|T| > t₁₋α/₂), T ~ noncentral t(df, d·√n / scale). :func:`equivalence_power` is
the power of the two one-sided tests (TOST, each at α) to show |d| < margin: P(T₊ > t₁₋α) +
P(T₋ < −t₁₋α) − 1, T± ~ noncentral t(df, (d ± margin)·√n / scale), a lower bound on the exact power
(the two events overlap) that is tight once the power is near 80 %. :func:`seeds_needed` is the
smallest ``n`` reaching the target power (80 %), assuming the observed ``d`` and ``scale`` are true.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from scipy import stats

ALPHA = 0.05
TARGET_POWER = 0.80
MAX_SEEDS = 1000  # beyond this the answer is "more than MAX_SEEDS": no experiment will run that many


def _df(n: int, df_per: float) -> float:
    return df_per * (n - 1)


def difference_power(d: float, scale: float, n: int, df_per: float = 1.0, alpha: float = ALPHA) -> float:
    """Power of the two-sided t-test (level ``alpha``) with ``n`` seeds when the true value is ``d``."""
    df = _df(n, df_per)
    nc = d * math.sqrt(n) / scale
    tc = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(tc, df, nc) + stats.nct.cdf(-tc, df, nc))


def equivalence_power(
    d: float, scale: float, margin: float, n: int, df_per: float = 1.0, alpha: float = ALPHA
) -> float:
    """Power (lower bound) of the TOST for |true value| < ``margin`` when the true value is ``d``."""
    df = _df(n, df_per)
    se = scale / math.sqrt(n)
    tc = stats.t.ppf(1 - alpha, df)
    above_lower = stats.nct.sf(tc, df, (d + margin) / se)  # (d̂ + margin)/se > t: d̂ above −margin
    below_upper = stats.nct.cdf(-tc, df, (d - margin) / se)  # (d̂ − margin)/se < −t: d̂ below +margin
    return max(0.0, float(above_lower + below_upper - 1))


def seeds_needed(power_at: Callable[[int], float], target: float = TARGET_POWER, cap: int = MAX_SEEDS) -> int | None:
    """The smallest n in [2, cap] with ``power_at(n) >= target`` (None when ``cap`` seeds are not enough).

    Both powers above grow with n, so a doubling search then bisection finds it in ~2 log₂(cap) calls."""
    if power_at(cap) < target:
        return None
    lo, hi = 1, 2  # invariant: power_at(hi) >= target or hi == cap; power_at(lo) < target (lo = 1: no test)
    while hi < cap and power_at(hi) < target:
        lo, hi = hi, min(2 * hi, cap)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if power_at(mid) >= target else (mid, hi)
    return hi


def seeds_to_decide(
    d: float,
    scale: float,
    margin: float,
    df_per: float = 1.0,
    alpha: float = ALPHA,
    alpha_difference: float | None = None,
) -> tuple[int | None, str]:
    """Seeds that decide an undecided estimate at 80 % power, and which test decides it.

    When |d| < margin the question is equivalence: the TOST at ``margin`` (level ``alpha``); otherwise
    it is a difference: the two-sided t-test at ``alpha_difference`` (default ``alpha``; a claimed gain
    passes α/m, the strictest level of Holm's correction over m claims). Returns (None, test) when more
    than MAX_SEEDS are needed, ``(None, "")`` when nothing can be computed (no spread measured)."""
    if not (scale > 0) or math.isnan(d):
        return None, ""
    if abs(d) < margin:
        return seeds_needed(lambda n: equivalence_power(d, scale, margin, n, df_per, alpha)), "TOST"
    level = alpha if alpha_difference is None else alpha_difference
    return seeds_needed(lambda n: difference_power(d, scale, n, df_per, level)), "t-test"


def welch_scale(s1: float, s2: float) -> tuple[float, float]:
    """(scale, df_per) of Welch's test with equal n per method from the two methods' standard deviations."""
    v = s1**2 + s2**2
    w = s1**4 + s2**4
    return math.sqrt(v), (v * v / w if w > 0 else 1.0)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted in the family).

    Sorted p₍₁₎ ≤ … ≤ p₍ₘ₎: adjusted p₍ᵢ₎ = max_{j ≤ i} min(1, (m − j + 1) · p₍ⱼ₎)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    idx.sort(key=lambda i: pvalues[i])
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * pvalues[i]))
        out[i] = running
    return out
