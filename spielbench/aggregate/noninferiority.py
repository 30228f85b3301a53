"""The "A is at least as good as B" claims (SpIEL-AG vs LoRA, vs SpIEL-MA, vs static masks): one
primary metric (the held-out loss) judged against a declared non-inferiority margin from a bootstrap
interval over seeds and items (:mod:`spielbench.aggregate.bootstrap`); the task accuracies are
secondary evidence, judged the same way against their own margin but not deciding the claim.
"""
from __future__ import annotations

import math

from spielbench.aggregate.bootstrap import (
    BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED, INCONCLUSIVE, combine, paired_bootstrap, verdict,
)
from spielbench.aggregate.evidence import Claim, Comparison, budget_note, matched_pairs, setting_label
from spielbench.aggregate.loading import HELDOUT, RunRecord
from spielbench.aggregate.stats import FAMILY_ALPHA, pool_scores
from spielbench.methods import method_label

#: The primary metric of every non-inferiority claim.
PRIMARY = HELDOUT
#: Margins used when the caller gives none (the config schema's defaults, ``claims.margins``):
#: nats per token of held-out loss, and a fraction (1 point) of accuracy.
DEFAULT_MARGINS = {"heldout_loss": 0.02, "accuracy": 0.01}
NOT_MEASURED = "not measured in this configuration"


def _usable(runs: list[RunRecord], metric: str):
    """The scores of the runs that have a finite value of ``metric``, and the targets of those that do not."""
    ok, missing = [], []
    for r in runs:
        s = r.score(metric)
        if s is None or s.value is None or not math.isfinite(s.value):
            missing.append(r.target)
        else:
            ok.append(s)
    return ok, missing


def ni_comparison(label: str, a: list[RunRecord], b: list[RunRecord], metric: str, margin: float,
                  level: float) -> Comparison | None:
    """One comparison of setting A vs B on ``metric`` with its interval and verdict.

    The interval is :func:`~spielbench.aggregate.bootstrap.paired_bootstrap` when every run holds
    per-item values on the same items; otherwise the normal interval of the pooled standard errors
    (``pool_scores``, independent sides). A run without a finite value (a failed or diverged run)
    is named in the note and left out of its side; a side with no run left gives "not counted".
    None when neither side has the metric at all.
    """
    sa, miss_a = _usable(a, metric)
    sb, miss_b = _usable(b, metric)
    if not sa and not sb:
        return None
    lower = metric == HELDOUT
    notes = [f"no value (failed or diverged): {', '.join(miss)}" for miss in (miss_a, miss_b) if miss]
    c = Comparison(label=label, metric=metric, a=None, b=None, diff=None, kind="ni", detail="; ".join(notes))
    c.margin, c.level = margin, level
    if not sa or not sb:
        c.outcome, c.counted = "not counted", False
        return c
    pa, pb = pool_scores(sa), pool_scores(sb)
    c.a, c.b = pa.value, pb.value
    ci = paired_bootstrap(sa, sb, lower_is_better=lower, level=level)
    if ci is not None:
        c.diff, c.low, c.high = ci.diff, ci.low, ci.high
        how = f"bootstrap over {ci.seeds_a}+{ci.seeds_b} seeds and {ci.n_items} paired items"
    else:
        c.diff = (pb.value - pa.value) if lower else (pa.value - pb.value)
        if pa.stderr is None or pb.stderr is None:
            c.outcome, c.counted = "not counted", False
            c.detail = "; ".join(notes + ["no per-item values and no standard error"])
            return c
        from statistics import NormalDist

        half = NormalDist().inv_cdf(0.5 + level / 2) * math.hypot(pa.stderr, pb.stderr)
        c.low, c.high = c.diff - half, c.diff + half
        how = "normal interval of independent standard errors (no shared per-item values)"
    c.stderr = None
    c.outcome = verdict_of(c)
    c.detail = "; ".join([how] + notes)
    return c


def verdict_of(c: Comparison) -> str:
    """The verdict of a comparison with an interval (``bootstrap.verdict`` on its bounds)."""
    from spielbench.aggregate.bootstrap import BootstrapCI

    return verdict(BootstrapCI(c.diff, c.low, c.high, c.level, 0, 0, 0), c.margin)


def claim_at_least(key: str, statement: str, source: str, records: list[RunRecord], method_a: str,
                   methods_b: list[str], margins: dict[str, float] | None = None,
                   tasks: list[str] | None = None) -> Claim:
    """A "method A is at least as good as method B" claim, decided on the held-out loss.

    Every matched pair of settings (``evidence.matched_pairs``) gives one primary comparison; with m
    primary comparisons each interval has coverage 1 − 0.05/m (Bonferroni). The claim's verdict is
    the weakest primary verdict (inferior < inconclusive < non-inferior < superior); the task
    accuracies are compared at 95% against the accuracy margin and shown, not counted.
    """
    margins = {**DEFAULT_MARGINS, **(margins or {})}
    claim = Claim(key, statement, source,
                  how=(f"{method_label(method_a)} vs {', '.join(method_label(m) for m in methods_b)} at the same rank "
                       f"(equal trainable parameters), trained alike; primary metric the held-out loss "
                       f"(margin {margins['heldout_loss']:g} nats/token), task accuracies secondary "
                       f"(margin {100 * margins['accuracy']:g} point)."))
    pairs = [(a, b) for mb in methods_b for a, b in matched_pairs(records, method_a, mb)]
    level = 1.0 - FAMILY_ALPHA / max(1, len(pairs))
    for a, b in pairs:
        label = f"{setting_label(a)} vs {setting_label(b)}"
        c = ni_comparison(label, a, b, PRIMARY, margins["heldout_loss"], level)
        if c is not None:
            c.role = "primary"
            claim.comparisons.append(c)
        for task in _tasks_of(a + b, tasks):
            s = ni_comparison(label, a, b, task, margins["accuracy"], 0.95)
            if s is not None:
                s.role, s.counted = "secondary", False
                claim.comparisons.append(s)
        note = budget_note(a, b)
        if note:
            claim.notes.append(note)
    decide_claim(claim)
    return claim


def _tasks_of(runs: list[RunRecord], tasks: list[str] | None) -> list[str]:
    found = []
    for r in runs:
        for t, s in r.scores.items():
            if s.value is not None and t not in found:
                found.append(t)
    return [t for t in tasks if t in found] if tasks else found


def decide_claim(claim: Claim) -> None:
    """Set the claim's verdict and reason from its counted primary comparisons."""
    primary = [c for c in claim.comparisons if c.kind == "ni" and getattr(c, "role", "") == "primary"]
    counted = [c for c in primary if c.counted and c.outcome != "not counted"]
    if not counted:
        claim.verdict = NOT_MEASURED
        claim.reason = ("no matched pair of settings with a held-out loss on both sides" if not primary else
                        f"{len(primary)} primary comparison(s) shown, none with an interval")
        return
    claim.verdict = combine([c.outcome for c in counted])
    tally = {}
    for c in counted:
        tally[c.outcome] = tally.get(c.outcome, 0) + 1
    parts = ", ".join(f"{n} {o}" for o, n in tally.items())
    claim.reason = (f"held-out loss, {len(counted)} comparison{'s' if len(counted) != 1 else ''} at "
                    f"{100 * counted[0].level:.1f}% coverage: {parts}; the weakest decides")
    if claim.verdict == INCONCLUSIVE:
        claim.reason += " (an interval contains the margin)"


def rules_text(margins: dict[str, float] | None = None) -> str:
    """The non-inferiority rule printed in claims.md (rule 0), with the margins of this run."""
    m = {**DEFAULT_MARGINS, **(margins or {})}
    return (
        "0. **\"A is at least as good as B\" claims** (SpIEL-AG vs LoRA, vs SpIEL-MA, vs static masks): one "
        "primary metric, the held-out loss on the held-out split of the training distribution, with a "
        f"non-inferiority margin δ = {m['heldout_loss']:g} nats/token declared in the config before the run "
        f"(`claims.margins`; task accuracies: δ = {100 * m['accuracy']:g} point, secondary evidence, shown "
        "and not counted). The difference d is oriented so that d > 0 favours A (held-out loss: "
        "d = loss(B) − loss(A)). Its interval is a percentile bootstrap "
        f"({BOOTSTRAP_REPLICATES} replicates, generator seed {BOOTSTRAP_SEED}): each replicate resamples "
        "the seeds of A and of B, then the items (held-out examples or task items, the same draw for both "
        "sides), recomputes each run's metric on the drawn items and averages over the drawn seeds; so the "
        "interval holds both the item sampling and the seed-to-seed variance. Without shared per-item "
        "values, the normal interval of the two pooled standard errors. With m primary comparisons in a "
        f"claim each interval has coverage 1 − {FAMILY_ALPHA}/m. A comparison is **superior** when the "
        "whole interval is above 0, **non-inferior** when it is above −δ, **inferior** when it is below −δ, "
        "**inconclusive** when it contains −δ. The claim's verdict is the weakest of its primary comparisons "
        "(inferior < inconclusive < non-inferior < superior). A failed or diverged run stays a row: it is "
        "named in the note and leaves its side; a side without any run left is not counted.\n"
    )
