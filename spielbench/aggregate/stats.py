"""Statistics of the aggregation: standard errors of scores and of their differences, pooling over seeds,
and the significance rule of the claims (rule 1 of ``evidence.VERDICT_RULES``).

Every function works on :class:`~spielbench.aggregate.loading.Score` values: task scores are fractions in
[0, 1], the held-out loss is nats per token.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spielbench.aggregate.loading import Score

#: Two-sided 95% normal quantile (the plain intervals shown next to each difference).
Z95 = statistics.NormalDist().inv_cdf(0.975)
#: Family-wise error rate of one claim's statistical comparisons (Bonferroni over the claim).
FAMILY_ALPHA = 0.05


def ratio_stderr(items: list[float], weights: list[float]) -> float | None:
    """Standard error of the ratio mean ``Σ items / Σ weights`` over independent examples (delta method).

    Used for the token-mean held-out loss, where ``items`` are per-example summed losses [nats] and
    ``weights`` their token counts: ``sqrt(n/(n-1) · Σ (y_i − L·t_i)²) / Σ t_i``. None for fewer than 2
    examples or no tokens.
    """
    n, total = len(items), float(sum(weights))
    if n < 2 or total <= 0:
        return None
    mean = sum(items) / total
    ss = sum((y - mean * t) ** 2 for y, t in zip(items, weights))
    return math.sqrt(n / (n - 1) * ss) / total


def paired_stderr(a: Score, b: Score) -> float | None:
    """Standard error of ``a.value − b.value`` when both were measured on the same items, else None.

    Same items: equal ``item_ids`` (or equal counts when neither has ids) and, for ratio means, equal
    ``weights``. Plain means: ``sd(a_i − b_i) / sqrt(n)``; ratio means (held-out loss):
    :func:`ratio_stderr` of the per-example differences.
    """
    if not a.items or not b.items or len(a.items) != len(b.items) or len(a.items) < 2:
        return None
    if (a.item_ids or b.item_ids) and a.item_ids != b.item_ids:
        return None
    diffs = [x - y for x, y in zip(a.items, b.items)]
    if a.weights is not None or b.weights is not None:
        if a.weights != b.weights:
            return None
        return ratio_stderr(diffs, a.weights)
    return statistics.stdev(diffs) / math.sqrt(len(diffs))


def proportion_stderr_floor(value: float, n: int) -> float:
    """Standard error of a proportion measured as exactly 0 or 1 on ``n`` items (binomial, p clipped).

    lm-eval reports ``sqrt(p(1-p)/n) = 0`` when every item is right (or wrong), which would make any
    difference look certain; here p is clipped to ``[0.5/n, 1 − 0.5/n]`` first.
    """
    p = min(max(value, 0.5 / n), 1.0 - 0.5 / n)
    return math.sqrt(p * (1.0 - p) / n)


@dataclass
class SettingScore:
    """A metric of one setting pooled over its seeds: mean, standard error, seeds (values)."""

    value: float
    stderr: float | None
    values: list[float]


def pool_scores(scores: list[Score]) -> SettingScore | None:
    """Pool one metric over the seeds of a setting (rule 1 of :data:`VERDICT_RULES`).

    value = mean of the values; stderr = sqrt(mean(se_i²) + sd(values)²/k) for k ≥ 2 seeds, se_1 for one
    seed, None when any seed lacks a stderr. Scores without a value are ignored; None when none is left.
    """
    vals = [s for s in scores if s is not None and s.value is not None]
    if not vals:
        return None
    v = [s.value for s in vals]
    mean = sum(v) / len(v)
    if any(s.stderr is None for s in vals):
        se = None
    else:
        item_var = sum(s.stderr ** 2 for s in vals) / len(vals)
        seed_var = statistics.variance(v) / len(v) if len(v) >= 2 else 0.0
        se = math.sqrt(item_var + seed_var)
    return SettingScore(mean, se, v)


def z_critical(m: int, alpha: float = FAMILY_ALPHA) -> float:
    """Two-sided Bonferroni critical z for ``m`` comparisons at family-wise level ``alpha`` (m ≥ 1)."""
    return statistics.NormalDist().inv_cdf(1 - alpha / (2 * max(1, m)))


def stat_outcome(diff: float, stderr: float | None, z: float) -> str:
    """"supports" if diff > z·stderr, "contradicts" if diff < −z·stderr, else "undecided".

    "not counted" when ``stderr`` is None. A zero stderr decides by the sign of ``diff`` (0: undecided).
    """
    if stderr is None:
        return "not counted"
    if diff > z * stderr:
        return "supports"
    if diff < -z * stderr:
        return "contradicts"
    return "undecided"

