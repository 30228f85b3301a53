"""Evidence for the claims: the verdict rules (:data:`VERDICT_RULES`, printed in claims.md), the
comparison and claim records, how runs are grouped into settings and matched into pairs trained alike,
and the statistical comparisons of two settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from spielbench.aggregate.loading import HELDOUT, RunRecord
from spielbench.aggregate.stats import FAMILY_ALPHA, paired_stderr, pool_scores, stat_outcome, z_critical
from spielbench.methods import method_label

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive at this scale (difference within noise)"
MIXED = "inconclusive at this scale (mixed: significant differences in both directions)"
NOT_MEASURED = "not measured in this configuration"

#: Step-time ratio (SpIEL / LoRA) up to which run time counts as comparable, and above which it does not.
RUNTIME_COMPARABLE_MAX = 1.25
RUNTIME_NOT_COMPARABLE_MIN = 1.5
#: Relative difference of measured peak memory below which two methods count as equal.
MEMORY_TIE_FRACTION = 0.01
#: Largest spread (max/min) of state bytes per trainable parameter across budgets that still counts
#: as "proportional to the number of tuned parameters".
STATE_PER_PARAM_SPREAD_MAX = 1.05

# Printed in claims.md (after rule 0, noninferiority.rules_text, which carries the configured margins); the
# thresholds are the constants above and stats.FAMILY_ALPHA.
VERDICT_RULES = f"""\
1. **Accuracy and held-out loss comparisons of the other claims** (A vs B on one metric). Each side is a *setting* (a run config
   without its seed); with several seeds, its value is the mean over seeds. The difference d is oriented
   so that d > 0 favours A (for the held-out loss, d = loss(B) − loss(A)). Its standard error s is
   *paired* when both sides are single runs whose eval.json holds per-item results on the same items
   (task `item_scores` with `doc_ids`; held-out `example_nll` with `example_tokens`): the standard error of
   the per-item differences (for the token-mean held-out loss, the ratio-estimator standard error).
   Otherwise s = sqrt(s_A² + s_B²), each side's s being the evaluation standard error (lm-eval's stderr
   over items; over held-out examples), combined as sqrt(mean(se²) + seed_sd²/n_seeds) for several seeds;
   this treats the two evaluations as independent, which is conservative. (lm-eval's stderr of a score of
   exactly 0 or 1 is 0; it is replaced by the binomial standard error at p = 0.5/n or 1 − 0.5/n.)
   With m such comparisons in one claim, a comparison is **significant** when |d| > z·s with
   z = Φ⁻¹(1 − {FAMILY_ALPHA}/(2m)) (Bonferroni: family-wise error {FAMILY_ALPHA:.0%} per claim). The tables
   show d with its plain 95% interval d ± 1.96·s as well. A comparison whose metric has no standard error
   is shown but does not count.
2. **Step-time comparisons** (SpIEL / LoRA, same rank): ratio ≤ {RUNTIME_COMPARABLE_MAX} supports
   "comparable run time"; ratio > {RUNTIME_NOT_COMPARABLE_MIN} contradicts it; in between is undecided.
   (Step times of one configuration vary by about 20% from run to run on a shared 2-core CPU.)
3. **Memory comparisons**: exact byte counts of trainable parameters, gradients and optimizer state decide
   by their sign; measured peak memory differing by less than {MEMORY_TIE_FRACTION:.0%} counts as equal.
   "Scales with tuned parameters": state bytes per trainable parameter must stay within a factor
   {STATE_PER_PARAM_SPREAD_MAX} across budgets; across model sizes (benchmark), the growth of the peak-memory
   overhead over the floor must be closer (in log ratio) to the growth of the trainable parameters than
   to the growth of the model's parameters.
4. **Verdict of a claim** from its counted comparisons: **{REPRODUCED}** when at least one supports it and
   none contradicts it; **{NOT_REPRODUCED}** when at least one contradicts it and none supports it;
   **{MIXED}** when both occur; **{INCONCLUSIVE}** when none is decided either way; **{NOT_MEASURED}** when
   the configuration has no run that tests it.
"""


@dataclass
class Comparison:
    """One piece of evidence for a claim.

    Attributes:
        label: what is compared (e.g. ``SpIEL-AG r=16 vs LoRA r=16``).
        metric: the metric (task name, ``heldout_loss``, ``step time`` ...).
        a, b: the two values (A is the side the claim favours), or None.
        diff: the oriented difference (> 0 favours the claim) or a ratio (``kind == "ratio"``).
        stderr: standard error of ``diff`` (statistical comparisons only).
        outcome: "supports", "contradicts", "undecided" or "not counted".
        kind: "stat" (difference with a standard error), "ni" (difference with an interval judged
            against a margin, :mod:`spielbench.aggregate.noninferiority`), "ratio", "bytes" or "info".
        detail: free text shown in the evidence table (units, seeds, notes).
        low, high, level: the interval of ``diff`` and its two-sided coverage ("ni" only).
        margin: the non-inferiority margin δ ("ni" only; nats/token or a fraction of accuracy).
        role: "primary" (decides the claim) or "secondary" (shown) for "ni" comparisons.
    """

    label: str
    metric: str
    a: float | None
    b: float | None
    diff: float | None
    stderr: float | None = None
    outcome: str = "not counted"
    kind: str = "stat"
    detail: str = ""
    counted: bool = True
    z_crit: float | None = None
    low: float | None = None
    high: float | None = None
    level: float | None = None
    margin: float | None = None
    role: str = ""


@dataclass
class Claim:
    """A qualitative claim of the paper, its evidence and its verdict."""

    key: str
    statement: str
    source: str
    how: str
    comparisons: list[Comparison] = field(default_factory=list)
    verdict: str = NOT_MEASURED
    reason: str = ""
    notes: list[str] = field(default_factory=list)


def decide(comparisons: list[Comparison]) -> tuple[str, str]:
    """The verdict of a claim from its counted comparisons (rule 4 of :data:`VERDICT_RULES`).

    Returns ``(verdict, reason)``, the reason counting supporting / contradicting / undecided comparisons.
    """
    counted = [c for c in comparisons if c.counted and c.outcome != "not counted"]
    if not counted:
        if comparisons:
            n = len(comparisons)
            return NOT_MEASURED, (f"{n} comparison{'s' if n != 1 else ''} shown, none counted: no noise estimate, "
                                  "or evidence that decides nothing on its own (see the notes)")
        return NOT_MEASURED, "no configured run pair tests this claim"
    sup = sum(c.outcome == "supports" for c in counted)
    con = sum(c.outcome == "contradicts" for c in counted)
    und = len(counted) - sup - con
    reason = (f"{sup} supporting, {con} contradicting, {und} undecided of {len(counted)} counted "
              f"comparison{'s' if len(counted) != 1 else ''}")
    if sup and not con:
        return REPRODUCED, reason
    if con and not sup:
        return NOT_REPRODUCED, reason
    if sup and con:
        return MIXED, reason
    return INCONCLUSIVE, reason


def settings_of(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Records grouped by :attr:`RunRecord.setting` (the seeds of one setting), in first-seen order."""
    out: dict[str, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.setting, []).append(r)
    return out


def pick_setting(groups: list[list[RunRecord]]) -> list[RunRecord] | None:
    """Among settings of one method at one budget (e.g. a learning-rate grid), the lowest held-out loss."""
    if not groups:
        return None

    def key(g):
        p = pool_scores([r.heldout for r in g])
        return math.inf if p is None else p.value

    return min(groups, key=key)


def pair_key(r: RunRecord):
    """What two runs must share to be compared as "trained alike" (see :func:`matched_pairs`)."""
    c = r.config
    return (r.model_name, r.data_name, r.rank, r.density, c.get("max_steps"), c.get("per_device_train_batch_size"),
            c.get("gradient_accumulation_steps"), c.get("max_seq_length"), r.gradient_checkpointing)


def matched_pairs(records: list[RunRecord], method_a: str, method_b: str,
                  same_budget: bool = True) -> list[tuple[list[RunRecord], list[RunRecord]]]:
    """Pairs of settings (lists of seed runs) of ``method_a`` and ``method_b`` trained alike.

    "Alike": same model, data, rank/density, steps, batch, sequence length and gradient checkpointing
    (learning rate, weight decay and method hyper-parameters may differ: each method keeps its own).
    With ``same_budget=False`` the rank/density is not matched (e.g. vs (IA)3 or the base model).
    When one method has several settings per pair key, the one with the lowest held-out loss is used.
    """
    def by_key(method):
        out: dict[tuple, list[list[RunRecord]]] = {}
        for g in settings_of([r for r in records if r.method == method and r.target != "base"]).values():
            k = pair_key(g[0])
            if not same_budget:
                k = k[:2] + k[4:]
            out.setdefault(k, []).append(g)
        return out

    a, b = by_key(method_a), by_key(method_b)
    pairs = []
    for k in a:
        if k in b:
            pairs.append((pick_setting(a[k]), pick_setting(b[k])))
    pairs.sort(key=lambda p: (p[0][0].rank or 0, p[0][0].density or 0.0))
    return pairs


def setting_label(g: list[RunRecord]) -> str:
    """``"SpIEL-AG r=16 (3 seeds)"``: method label, budget, and the seed count when more than one."""
    r = g[0]
    s = method_label(r.method)
    if r.rank is not None:
        s += f" r={r.rank}"
    elif r.density is not None:
        s += f" d={r.density:.3g}"
    if len(g) > 1:
        s += f" ({len(g)} seeds)"
    return s


def stat_comparisons(label: str, a: list[RunRecord], b: list[RunRecord], metrics: list[str]) -> list[Comparison]:
    """Accuracy / held-out-loss comparisons of setting A vs setting B (z is set later by the claim)."""
    out = []
    for metric in metrics:
        pa = pool_scores([r.score(metric) for r in a])
        pb = pool_scores([r.score(metric) for r in b])
        if pa is None or pb is None:
            continue
        sign = -1.0 if metric == HELDOUT else 1.0
        diff = sign * (pa.value - pb.value)
        se = None if pa.stderr is None or pb.stderr is None else math.hypot(pa.stderr, pb.stderr)
        detail = ""
        if len(a) == 1 and len(b) == 1:
            paired = paired_stderr(a[0].score(metric), b[0].score(metric))
            if paired is not None:
                se = paired
                detail = f"paired over {len(a[0].score(metric).items)} items"
        if len(pa.values) > 1 or len(pb.values) > 1:
            detail = (f"seeds A: {', '.join(f'{v:.4g}' for v in pa.values)}; "
                      f"B: {', '.join(f'{v:.4g}' for v in pb.values)}")
        out.append(Comparison(label=label, metric=metric, a=pa.value, b=pb.value, diff=diff, stderr=se,
                              kind="stat", detail=detail))
    return out


def finish_stats(claim: Claim) -> None:
    """Set the Bonferroni threshold and the outcome of every statistical comparison, then the verdict."""
    stats = [c for c in claim.comparisons if c.kind == "stat" and c.counted and c.stderr is not None]
    z = z_critical(len(stats))
    for c in claim.comparisons:
        if c.kind != "stat":
            continue
        c.z_crit = z
        c.outcome = stat_outcome(c.diff, c.stderr, z) if c.counted else "not counted"
    claim.verdict, claim.reason = decide(claim.comparisons)


def eval_metrics(records: list[RunRecord]) -> list[str]:
    """Every task with a value in any record (first-seen order), then the held-out loss."""
    tasks = []
    for r in records:
        for t, s in r.scores.items():
            if s.value is not None and t not in tasks:
                tasks.append(t)
    return tasks + [HELDOUT]


def budget_note(a: list[RunRecord], b: list[RunRecord]) -> str | None:
    """A note when two settings compared at the same rank differ by more than 1% in trainable parameters."""
    na, nb = a[0].trainable_params, b[0].trainable_params
    if na and nb and abs(na - nb) / max(na, nb) > 0.01:
        return (f"{setting_label(a)} has {na:,} and {setting_label(b)} {nb:,} trainable parameters "
                f"(not equal within 1%)")
    return None


