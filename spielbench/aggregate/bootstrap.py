"""Non-inferiority verdicts from a paired bootstrap over seeds and items (rule 1 of
``evidence.VERDICT_RULES``).

A comparison of setting A (the side a claim favours) against setting B on one metric resamples, in
each bootstrap replicate, the seeds of A and of B (independently, with replacement), then the items
(held-out examples or task items, with replacement, the *same* item draw for both sides: the
evaluation is paired over items). Each resampled run's metric is recomputed on the drawn items (the
token-mean NLL ``Σ nll / Σ tokens`` for the held-out loss, the mean item score for a task), each side
is the mean over its drawn seeds, and the replicate's difference is oriented so that d > 0 favours A.
The interval is the percentile interval of the replicate differences. The generator is seeded
(:data:`BOOTSTRAP_SEED`), so the output is a pure function of the inputs.

Verdicts against a margin δ > 0 declared in the config before the run (``claims.margins``):
superior when the whole interval is above 0; non-inferior when it is above −δ (and not above 0);
inferior when the whole interval is below −δ; inconclusive when it contains −δ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from spielbench.aggregate.loading import Score

SUPERIOR = "superior"
NON_INFERIOR = "non-inferior"
INFERIOR = "inferior"
INCONCLUSIVE = "inconclusive"
#: Order used to combine several comparisons of one claim (the weakest decides).
VERDICT_ORDER = (INFERIOR, INCONCLUSIVE, NON_INFERIOR, SUPERIOR)

#: Seed of the bootstrap generator and the number of replicates.
BOOTSTRAP_SEED = 20240601
BOOTSTRAP_REPLICATES = 4000


@dataclass
class BootstrapCI:
    """A bootstrap interval of an oriented difference.

    Attributes:
        diff: the point estimate (mean over seeds of A minus B, oriented; on all items).
        low, high: the percentile interval at ``level``.
        level: two-sided coverage (e.g. 0.975 for a Bonferroni-adjusted pair of comparisons).
        n_items: items resampled; seeds_a, seeds_b: seeds of each side.
    """

    diff: float
    low: float
    high: float
    level: float
    n_items: int
    seeds_a: int
    seeds_b: int


def _matrix(scores: list[Score]) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-seed item values ``[k, n]`` and, for ratio means, the token weights ``[n]`` ... per seed ``[k, n]``."""
    items = np.asarray([s.items for s in scores], dtype=np.float64)
    weights = None
    if scores[0].weights is not None:
        weights = np.asarray([s.weights for s in scores], dtype=np.float64)
    return items, weights


def comparable(a: list[Score], b: list[Score]) -> bool:
    """Whether every run of both sides has per-item values on the same items (ids, or counts without ids)."""
    runs = [s for s in a + b if s is not None]
    if len(runs) != len(a) + len(b) or not a or not b:
        return False
    first = runs[0]
    if not first.items or len(first.items) < 2:
        return False
    ratio = first.weights is not None
    for s in runs:
        if not s.items or len(s.items) != len(first.items) or (s.weights is not None) != ratio:
            return False
        if (s.item_ids or first.item_ids) and s.item_ids != first.item_ids:
            return False
    return True


def paired_bootstrap(a: list[Score], b: list[Score], *, lower_is_better: bool, level: float = 0.95,
                     replicates: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED) -> BootstrapCI | None:
    """Interval of the oriented difference A − B (or B − A when lower is better), seeds then items resampled.

    Args:
        a, b: one :class:`Score` per seed of each side, with per-item values on the same items
            (``items``; ``weights`` for the held-out loss).
        lower_is_better: True for the held-out loss (d = loss(B) − loss(A)).
        level: two-sided coverage of the percentile interval, in (0, 1).
        replicates, seed: bootstrap replicates and generator seed.

    Returns:
        The :class:`BootstrapCI`, or None when the two sides are not measured on the same items
        (:func:`comparable`).
    """
    if not comparable(a, b):
        return None
    rng = np.random.default_rng(seed)
    xa, wa = _matrix(a)
    xb, wb = _matrix(b)
    n = xa.shape[1]
    sign = -1.0 if lower_is_better else 1.0

    def side(x, w, counts, seeds):
        # counts [R, n] item multiplicities; seeds [R, k'] drawn seed rows -> [R] side value
        num = counts @ x.T                     # [R, k]
        den = counts @ w.T if w is not None else counts.sum(axis=1, keepdims=True)
        per_seed = num / den                   # [R, k]
        return np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)

    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)
    seeds_a = rng.integers(0, xa.shape[0], size=(replicates, xa.shape[0]))
    seeds_b = rng.integers(0, xb.shape[0], size=(replicates, xb.shape[0]))
    d = sign * (side(xa, wa, counts, seeds_a) - side(xb, wb, counts, seeds_b))
    ones = np.ones((1, n))
    point = sign * (side(xa, wa, ones, np.arange(xa.shape[0])[None, :])[0]
                    - side(xb, wb, ones, np.arange(xb.shape[0])[None, :])[0])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(d, [tail, 1.0 - tail])
    return BootstrapCI(float(point), float(low), float(high), level, n, xa.shape[0], xb.shape[0])


def verdict(ci: BootstrapCI, margin: float) -> str:
    """Superior / non-inferior / inferior / inconclusive from the interval and the margin δ ≥ 0.

    Raises:
        ValueError: a negative margin.
    """
    if margin < 0:
        raise ValueError(f"margin: expected >= 0, got {margin}")
    if ci.low > 0:
        return SUPERIOR
    if ci.low > -margin:
        return NON_INFERIOR
    if ci.high < -margin:
        return INFERIOR
    return INCONCLUSIVE


def combine(verdicts: list[str]) -> str:
    """The verdict of a claim from its primary comparisons: the weakest of them (``VERDICT_ORDER``)."""
    if not verdicts:
        raise ValueError("combine: no verdict given")
    return min(verdicts, key=VERDICT_ORDER.index)
