"""The SpIEL drop/grow schedule: when selection phases open and close and what fraction p(t) is replaced.

Schedule (docs/METHOD.md §3), with S = ``reselection_steps``, γ = ``selection_accumulation_steps``,
ζ = ``initial_reselection_rate`` and T = ``total_steps``; ``t`` counts completed optimizer updates and
:meth:`spiel.selection.SpielSelector.step` is called after each one::

    construction (t = 0): begin a selection phase (SpIEL-AG: install gradient hooks)
    step(): t += 1
            if t % S == γ:       end the phase; if t <= T, reselect with rate p(t)
            if (t + 1) % S == 0: begin a selection phase
    p(t) = 1 if t == γ else ζ·(1 − t/T)       ("linear": the first reselection replaces every index)
    p(t) = ζ·(1 + cos(π·t/T)) / 2             ("cosine")
    policy "none": never reselect (a static random mask, the spiel-static ablation)

So reselections happen at t = γ, γ+S, γ+2S, … ≤ T; SpIEL-AG's first gradient window covers γ updates
and later ones γ+1 (the reference's off-by-one, kept). Differences from the reference, all on purpose:

- §10.2.9: ending a phase always removes the hooks, also past T (the reference leaks them there); a
  phase whose reselection step would fall after T is not opened at all (its gradients would never be
  used, and collecting them costs a dense ``dW`` per layer per micro-batch). Likewise the phase opened
  at construction is skipped when γ = 0, because the reference's next opening (after step S−1)
  restarts it before it is used.
- Within one ``step()`` the phase is ended before the next one begins (the reference begins first).
  The two coincide only for γ = S−1, where the reference's order would discard the whole window;
  for every other γ the order makes no difference.
- §10.2.10: given only ``completed_steps`` (no selector state) a resumed selector opens a phase only if
  the schedule has one open at that step (:func:`phase_open_after`); it never starts an extra one.
"""
from __future__ import annotations

import math

__all__ = ["POLICIES", "reselection_rate", "reselection_steps", "next_phase_end", "phase_open_after"]

#: The reselection-rate policies (``SpielConfig.reselection_rate_policy``).
POLICIES = ("linear", "cosine", "none")


def reselection_rate(step: int, total_steps: int, initial_rate: float, policy: str,
                     accumulation_steps: int) -> float:
    """The fraction p(t) of each matrix's entries replaced at reselection step ``step`` (§3).

    ``"linear"``: 1.0 at ``step == accumulation_steps`` (γ), else ``ζ·(1 − t/T)``;
    ``"cosine"``: ``ζ·(1 + cos(π·t/T))/2`` (no p = 1 step); ``"none"``: 0.0.
    Raises ValueError for an unknown policy.
    """
    if policy == "linear":
        return 1.0 if step == accumulation_steps else initial_rate * (1.0 - step / total_steps)
    if policy == "cosine":
        return initial_rate * (1.0 + math.cos(math.pi * step / total_steps)) / 2.0
    if policy == "none":
        return 0.0
    raise ValueError(f"reselection_rate_policy: expected one of {POLICIES}, got {policy!r}")


def reselection_steps(total_steps: int, reselection_steps: int, accumulation_steps: int) -> list[int]:
    """The update steps t ≤ T at which a reselection happens: every t ≥ 1 with ``t % S == γ`` (§3)."""
    first = accumulation_steps if accumulation_steps >= 1 else reselection_steps
    return list(range(first, total_steps + 1, reselection_steps))


def next_phase_end(after_step: int, period: int, accumulation_steps: int) -> int:
    """The first step t > ``after_step`` with ``t % period == accumulation_steps``."""
    t = after_step + 1
    return t + (accumulation_steps - t) % period


def phase_open_after(step: int, total_steps: int, period: int, accumulation_steps: int) -> bool:
    """Whether the schedule has a selection phase open after ``step`` completed updates.

    Mirrors :meth:`SpielSelector.step`: a phase closes after every step with ``t % S == γ`` and opens
    after every step with ``(t+1) % S == 0`` (in that order), unless its closing step (the next
    ``t % S == γ``) would exceed T. The phase opened at construction (step 0) is skipped when another
    opening would restart it before it closes (γ = 0). O(step) integer arithmetic.
    """
    is_open = _opens_at_construction(total_steps, period, accumulation_steps)
    for t in range(1, step + 1):
        if t % period == accumulation_steps:
            is_open = False
        if (t + 1) % period == 0 and next_phase_end(t, period, accumulation_steps) <= total_steps:
            is_open = True
    return is_open


def _opens_at_construction(total_steps: int, period: int, accumulation_steps: int) -> bool:
    end = next_phase_end(0, period, accumulation_steps)
    first_restart = period - 1 if period >= 2 else 1
    return end <= total_steps and end <= first_restart

