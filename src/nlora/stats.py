"""The statistics of a method comparison: t-intervals, Welch differences, Holm's correction, a collapse rule.

Pure functions of lists of per-seed numbers (scipy for the t and normal quantiles), shared by ``nlora compare --tune``
and ``bench/convergence.py``. With the 2-5 seeds a CPU study affords, intervals are wide: the functions report them
rather than a p-value alone, and :func:`detectable_difference` says how large an effect the sample could have shown.
"""

from __future__ import annotations

import math
import statistics


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The mean and the half-width of its t-interval (NaN half-width for fewer than 2 values)."""
    from scipy import stats

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    quantile = stats.t.ppf((1 + level) / 2, len(values) - 1)
    return mean, float(quantile * statistics.stdev(values) / math.sqrt(len(values)))


def _welch_parts(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean difference a - b, its standard error, and the Welch-Satterthwaite degrees of freedom."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else math.inf
    return statistics.mean(a) - statistics.mean(b), se, df


def difference_ci(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """The mean difference a - b and its Welch confidence interval ``(difference, low, high)``; None below 2 each."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    diff, se, df = _welch_parts(a, b)
    half = float(stats.t.ppf((1 + level) / 2, df) * se) if se > 0 else 0.0
    return diff, diff - half, diff + half


def welch_p(a: list[float], b: list[float]) -> float | None:
    """The two-sided Welch t-test p-value of a against b; None below 2 values each, 1.0 for two constant samples."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    diff, se, df = _welch_parts(a, b)
    if se == 0:
        return 1.0 if diff == 0 else 0.0
    return float(2 * stats.t.sf(abs(diff / se), df))


def holm(pvalues: dict[str, float | None]) -> dict[str, float | None]:
    """Holm's step-down adjustment over one family of tests (None entries are left out of the family)."""
    tested = sorted(((p, name) for name, p in pvalues.items() if p is not None), key=lambda item: item[0])
    adjusted, running = {}, 0.0
    for rank, (p, name) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))  # adjusted values never decrease with rank
        adjusted[name] = running
    return {name: adjusted.get(name) for name in pvalues}


def detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference between two groups of ``n`` (common standard deviation ``sd``) that a two-sided
    test at ``alpha`` finds with probability ``power`` (normal approximation; optimistic for small n)."""
    from scipy import stats

    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * sd * math.sqrt(2 / n))


def collapsed(final_loss: float, threshold: float) -> bool:
    """A run collapsed when its final loss is not finite or not below ``threshold``, a bound fixed before running:
    chance level (ln of the class count, less 1%) for classification, the base model's loss for language modelling."""
    return not math.isfinite(final_loss) or final_loss >= threshold


def collapse_threshold(task: str, num_labels: int = 2, base_loss: float | None = None) -> float:
    """The fixed collapse bound of :func:`collapsed` for ``task``: 0.99 ln(num_labels) for classification, else the
    base model's held-out loss (infinite while it is unknown, so nothing counts as collapsed)."""
    if task == "classification" and num_labels > 1:
        return 0.99 * math.log(num_labels)
    return base_loss if base_loss is not None else math.inf


def read_difference(low: float, high: float, margin: float) -> str:
    """What a 95% CI ``[low, high]`` of a difference in loss (method − baseline; below 0 is better) says against an
    equivalence margin fixed in advance: the interval, not a p-value, decides (two one-sided tests at 0.025)."""
    if low > margin:
        return "worse, beyond the margin"
    if high < -margin:
        return "better, beyond the margin"
    if -margin < low and high < margin:
        side = " and worse" if low > 0 else " and better" if high < 0 else ""
        return f"equivalent within ±{margin:g}{side}"
    if low > 0:
        return "worse; whether beyond the margin is undecided"
    if high < 0:
        return "better; whether beyond the margin is undecided"
    return "inconclusive"
