"""Non-inferiority verdicts: the paired bootstrap over seeds and items, the four verdicts against a margin,
and failed runs kept as rows of the evidence."""
from __future__ import annotations

import random

import numpy as np
import pytest

from spielbench import aggregate as agg
from spielbench.aggregate.bootstrap import (INCONCLUSIVE, INFERIOR, NON_INFERIOR, SUPERIOR, BootstrapCI, combine,
                                            paired_bootstrap, verdict)
from spielbench.aggregate.loading import Score
from spielbench.aggregate.noninferiority import ni_comparison


def _heldout(nll: list[float], tokens: list[int]) -> Score:
    return Score(sum(nll) / sum(tokens), None, len(nll), "loss", items=list(nll), weights=[float(t) for t in tokens])


def _runs(base: np.ndarray, tokens: list[int], shifts: list[float], noise: float = 0.0, seed: int = 0) -> list[Score]:
    """One held-out score per seed: per-example NLL = base + shift·tokens (+ independent noise)."""
    rng = np.random.default_rng(seed)
    t = np.asarray(tokens, dtype=float)
    return [_heldout(list(base + s * t + noise * rng.standard_normal(len(t)) * t), tokens) for s in shifts]


def test_verdict_boundaries_and_combination():
    def ci(low, high):
        return BootstrapCI((low + high) / 2, low, high, 0.95, 10, 1, 1)

    assert verdict(ci(0.001, 0.05), 0.02) == SUPERIOR
    assert verdict(ci(-0.01, 0.05), 0.02) == NON_INFERIOR
    assert verdict(ci(-0.019, -0.001), 0.02) == NON_INFERIOR  # worse, but within the margin
    assert verdict(ci(-0.03, 0.01), 0.02) == INCONCLUSIVE     # contains -δ
    assert verdict(ci(-0.03, -0.021), 0.02) == INFERIOR
    with pytest.raises(ValueError, match="margin"):
        verdict(ci(0, 1), -0.1)
    assert combine([SUPERIOR, NON_INFERIOR]) == NON_INFERIOR
    assert combine([SUPERIOR, INCONCLUSIVE, NON_INFERIOR]) == INCONCLUSIVE
    assert combine([SUPERIOR, INFERIOR, INCONCLUSIVE]) == INFERIOR
    assert combine([SUPERIOR, SUPERIOR]) == SUPERIOR


def test_paired_bootstrap_removes_item_variance_and_is_deterministic():
    rng = np.random.default_rng(1)
    tokens = [int(x) for x in rng.integers(5, 40, size=400)]
    base = rng.gamma(2.0, 1.0, size=400) * np.asarray(tokens)  # large item-to-item spread
    a = _runs(base, tokens, [-0.05])  # A is 0.05 nats/token better on every example
    b = _runs(base, tokens, [0.0])
    ci = paired_bootstrap(a, b, lower_is_better=True)
    assert ci.diff == pytest.approx(0.05) and ci.low == pytest.approx(0.05) and ci.high == pytest.approx(0.05)
    assert (ci.n_items, ci.seeds_a, ci.seeds_b) == (400, 1, 1)
    # per-example noise: an interval around the shift, the same every time (fixed generator seed)
    a = _runs(base, tokens, [-0.05], noise=0.5, seed=2)
    b = _runs(base, tokens, [0.0], noise=0.5, seed=3)
    one, two = paired_bootstrap(a, b, lower_is_better=True), paired_bootstrap(a, b, lower_is_better=True)
    assert one == two and one.low < one.diff < one.high and one.low < 0.05 < one.high
    # accuracy orientation: higher is better, d = A − B
    acc_a = Score(0.75, None, 4, items=[1.0, 1.0, 1.0, 0.0], item_ids=[0, 1, 2, 3])
    acc_b = Score(0.25, None, 4, items=[1.0, 0.0, 0.0, 0.0], item_ids=[0, 1, 2, 3])
    assert paired_bootstrap([acc_a], [acc_b], lower_is_better=False).diff == pytest.approx(0.5)
    # different items cannot be paired
    other = Score(0.25, None, 4, items=[1.0, 0.0, 0.0, 0.0], item_ids=[4, 5, 6, 7])
    assert paired_bootstrap([acc_a], [other], lower_is_better=False) is None


def test_seed_spread_widens_the_interval():
    rng = np.random.default_rng(4)
    tokens = [int(x) for x in rng.integers(5, 40, size=300)]
    base = rng.gamma(2.0, 1.0, size=300) * np.asarray(tokens)
    b = _runs(base, tokens, [0.0, 0.0, 0.0], noise=0.02, seed=5)
    steady = _runs(base, tokens, [-0.01, -0.01, -0.01], noise=0.02, seed=6)
    spread = _runs(base, tokens, [-0.06, -0.01, 0.04], noise=0.02, seed=6)  # same mean, seed-to-seed spread
    w_steady = paired_bootstrap(steady, b, lower_is_better=True)
    w_spread = paired_bootstrap(spread, b, lower_is_better=True)
    assert w_spread.diff == pytest.approx(w_steady.diff, abs=1e-9)
    assert (w_spread.high - w_spread.low) > 3 * (w_steady.high - w_steady.low)
    assert w_spread.seeds_a == 3
    # with the margin 0.02: three steady seeds 0.01 better are superior; the spread ones are not decided
    assert verdict(w_steady, 0.02) == SUPERIOR and verdict(w_spread, 0.02) == INCONCLUSIVE


def _record(target: str, method: str, heldout: Score | None, seed: int = 1) -> agg.RunRecord:
    rec = agg.RunRecord(target=target, method=method, model_name="M", data_name="D", rank=16, seed=seed,
                        config={"method": method, "rank": 16, "seed": seed, "max_steps": 10})
    rec.heldout = heldout
    return rec


def test_a_diverged_run_stays_in_the_evidence():
    tokens = [random.Random(i).randint(5, 30) for i in range(50)]
    base = np.asarray([3.0 * t for t in tokens])
    good = _runs(base, tokens, [-0.1, -0.1], noise=0.1, seed=1)
    lora = _runs(base, tokens, [0.0], noise=0.1, seed=2)
    a = [_record("spiel-ag-r16-s1", "spiel-ag", good[0], 1), _record("spiel-ag-r16-s2", "spiel-ag", good[1], 2),
         _record("spiel-ag-r16-s3", "spiel-ag", Score(float("nan"), None, metric="loss"), 3)]
    b = [_record("lora-r16", "lora", lora[0])]
    c = ni_comparison("A vs B", a, b, agg.HELDOUT, 0.02, 0.95)
    assert "no value (failed or diverged): spiel-ag-r16-s3" in c.detail
    assert "2+1 seeds" in c.detail and c.outcome == SUPERIOR
    # every seed of one side failed: shown, not counted
    c = ni_comparison("A vs B", [a[2]], b, agg.HELDOUT, 0.02, 0.95)
    assert c.outcome == "not counted" and not c.counted and "spiel-ag-r16-s3" in c.detail
