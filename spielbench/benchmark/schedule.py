"""Schedule maths of the benchmark: how the selector is driven in a short timed window and how each kind
of step is weighted so that the step time is that of the natural schedule (docs/BENCHMARK.md,
"Selection phases in their natural proportion"; the schedule is docs/METHOD.md §3)."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from spielbench.benchmark.options import BenchmarkOptions


@dataclass(frozen=True)
class DrivingSchedule:
    """How the selector is driven during a benchmark and how step kinds are weighted (docs/BENCHMARK.md).

    Attributes: ``algorithm`` ("ag"/"ma"/None), natural ``period`` S and ``accumulation`` γ, driving
    ``driving_period`` S_b and ``driving_accumulation`` γ_b, ``start_step`` c0 (selector's
    ``completed_steps`` at construction), ``total_steps`` T of the selector, ``weights`` {kind: weight}.
    """

    algorithm: Optional[str]
    period: int
    accumulation: int
    driving_period: int
    driving_accumulation: int
    start_step: int
    total_steps: int
    weights: dict


def natural_weights(algorithm: Optional[str], period: int, accumulation: int) -> dict[str, float]:
    """Fraction of steady-state steps of each kind under the natural schedule (S, γ) (docs/METHOD.md §3).

    SpIEL-AG, hooks on in the γ + 1 steps ``t ≡ 0 … γ (mod S)``: ``phase-start 1/S`` (the first hooked
    step: a dense ``dW`` and the top-k candidate choice), ``phase-first 1/S`` (the first step sampled at
    the candidates: it builds the layers' CSR pattern of η ∪ candidates), ``phase (γ−2)/S`` (sampled at
    the candidates, pattern cached), ``select 1/S`` (hooked, then drop/grow), ``after-select 1/S`` (the
    next step: the layers rebuild their cached index pattern), ``plain (S−γ−2)/S``. With γ = 0 the select
    step is also the first hooked one; with γ = 1 there is no phase-first step. SpIEL-MA: ``after-select 1/S``, ``plain (S−2)/S``, ``select 1/S``. Any other
    method: ``plain 1``. Kinds with weight 0 are left out.

    Raises ValueError if S is too short (AG: S >= γ + 2; MA: S >= 2).
    """
    if algorithm == "ag":
        if period < accumulation + 2:
            raise ValueError(f"reselection_steps: SpIEL-AG needs S >= γ + 2, got S={period}, γ={accumulation}")
        w = {"after-select": 1, "plain": period - accumulation - 2, "phase-start": 1 if accumulation >= 1 else 0,
             "phase-first": 1 if accumulation >= 2 else 0, "phase": max(accumulation - 2, 0), "select": 1}
    elif algorithm == "ma":
        if period < 2:
            raise ValueError(f"reselection_steps: SpIEL-MA needs S >= 2 for the benchmark, got {period}")
        w = {"after-select": 1, "plain": period - 2, "select": 1}
    else:
        return {"plain": 1.0}
    return {k: v / period for k, v in w.items() if v > 0}


def timed_steps(algorithm: Optional[str], steps: int, accumulation: int = 5) -> int:
    """Timed steps actually run: ``steps``, raised so that every step kind of the schedule is measured
    (SpIEL-AG: 6, or 5 when γ = 2, 4 when γ = 1, 3 when γ = 0; SpIEL-MA: 3)."""
    if algorithm == "ag":
        return max(steps, 3 + min(accumulation, 3))
    if algorithm == "ma":
        return max(steps, 3)
    return steps


def driving_schedule(algorithm: Optional[str], options: BenchmarkOptions) -> DrivingSchedule:
    """The compressed schedule that makes the timed window exactly one reselection period (docs/BENCHMARK.md,
    item 1 of the schedule-weighted estimate)."""
    S, gamma = options.reselection_steps, options.selection_accumulation_steps
    n = timed_steps(algorithm, options.steps, gamma)
    weights = natural_weights(algorithm, S, gamma)
    if algorithm is None:
        return DrivingSchedule(None, S, gamma, S, gamma, 0, options.warmup_steps + n, weights)
    if n % S == 0:
        period, acc = S, gamma
    else:
        period = n
        if algorithm == "ag":
            lo = min(gamma, 3)  # phase-start, phase-first and phase steps need γ_b >= 3
            acc = min(max(int(round(gamma * n / S)), lo), n - 3)
        else:
            acc = min(max(int(round(gamma * n / S)), 0), n - 1)
    # entry step t = c0 + 1 ≡ γ_b (mod S_b) reselects; the timed window t = c0 + 2 … c0 + 1 + n is one period.
    c0 = period + acc - 1
    return DrivingSchedule(algorithm, S, gamma, period, acc, c0, c0 + 1 + n + 1000, weights)


def weighted_step_stats(times: Sequence[float], kinds: Sequence[str], weights: dict[str, float]) -> dict[str, Any]:
    """Schedule-weighted mean and median of step times [s] (docs/BENCHMARK.md, item 2 of the
    schedule-weighted estimate).

    Returns ``{"mean": float, "p50": float, "kind_mean": {kind: mean}}``. Kinds with zero weight are
    ignored. Raises ValueError if a kind with positive weight has no sample, or a sample's kind has no
    weight.
    """
    by_kind: dict[str, list[float]] = {}
    for t, k in zip(times, kinds):
        if k not in weights:
            raise ValueError(f"step kind {k!r} has no weight (weights: {weights})")
        by_kind.setdefault(k, []).append(float(t))
    active = {k: w for k, w in weights.items() if w > 0}
    missing = [k for k in active if k not in by_kind]
    if missing:
        raise ValueError(f"no timed step of kind(s) {missing}; time more steps")
    kind_mean = {k: statistics.fmean(v) for k, v in by_kind.items()}
    mean = sum(w * kind_mean[k] for k, w in active.items())
    samples = sorted((t, active[k] / len(by_kind[k])) for k in active for t in by_kind[k])
    total = sum(w for _, w in samples)
    acc, p50 = 0.0, samples[-1][0]
    for i, (t, wt) in enumerate(samples):
        acc += wt
        if acc >= total / 2 - 1e-12:
            # exactly half: average with the next value, as the ordinary median does
            if abs(acc - total / 2) <= 1e-12 and i + 1 < len(samples):
                p50 = (t + samples[i + 1][0]) / 2
            else:
                p50 = t
            break
    return {"mean": mean, "p50": p50, "kind_mean": kind_mean}
