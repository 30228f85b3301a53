"""The paper's qualitative claims, each tested on the configured runs and benchmark points, and
``claims.md``, which shows every claim with its evidence, the rules and the verdict.

Which methods a claim compares is part of the claim (SpIEL-AG vs LoRA, SpIEL-MA vs SpIEL-AG, ...); the
4-bit twins come from the registry. No number of the paper is used (docs/METHOD.md §9: its tables are
not available; the claims are its qualitative statements).
"""
from __future__ import annotations

import math

from spielbench.aggregate.evidence import (
    MEMORY_TIE_FRACTION, RUNTIME_COMPARABLE_MAX, RUNTIME_NOT_COMPARABLE_MIN, STATE_PER_PARAM_SPREAD_MAX,
    VERDICT_RULES, Claim, Comparison, decide, eval_metrics, finish_stats, matched_pairs, setting_label,
    settings_of, stat_comparisons,
)
from spielbench.aggregate.formatting import fmt_float, task_label
from spielbench.aggregate.loading import HELDOUT, RunRecord
from spielbench.aggregate.noninferiority import claim_at_least, rules_text
from spielbench.aggregate.stats import Z95
from spielbench.aggregate.tables import ratio
from spielbench.methods import fp32_twin, method_label
from spielbench.records import BenchmarkPoint


def claim_ma_lighter(records: list[RunRecord], benchmarks: list[BenchmarkPoint]) -> Claim:
    """SpIEL-MA needs less memory than SpIEL-AG at the same budget (state bytes; peak memory)."""
    claim = Claim("ma-lighter",
                  statement="SpIEL-MA is lighter in memory than SpIEL-AG at the same number of trainable parameters.",
                  source="the paper's method: SpIEL-MA's SM3 optimizer keeps row and column statistics instead of "
                         "per-entry Adam moments and needs no gradient accumulation for regrowth",
                  how="trainable + gradient + optimizer-state bytes (exact) and measured peak memory, "
                      "SpIEL-MA vs SpIEL-AG at the same rank; benchmark points at the same model size.")
    for ma, ag in matched_pairs(records, "spiel-ma", "spiel-ag") + matched_pairs(records, "qspiel-ma", "qspiel-ag"):
        label = f"{setting_label(ma)} vs {setting_label(ag)}"
        sa, sb = ma[0].state_bytes, ag[0].state_bytes
        if sa is not None and sb is not None:
            claim.comparisons.append(Comparison(label, "state bytes", sa, sb, ratio(sa, sb), kind="bytes",
                                                outcome="supports" if sa < sb else "contradicts",
                                                detail="ratio MA ÷ AG"))
        pa, pb = ma[0].peak_memory_bytes, ag[0].peak_memory_bytes
        if pa is not None and pb is not None:
            claim.comparisons.append(_memory_comparison(label, pa, pb, ma[0].peak_memory_kind))
    claim.comparisons += _bench_memory(benchmarks, "spiel-ma", "spiel-ag")
    claim.verdict, claim.reason = decide(claim.comparisons)
    return claim


def _memory_comparison(label: str, lighter: float, heavier: float, kind: str | None) -> Comparison:
    """Measured peak memory of the lighter side vs the heavier one (ties within MEMORY_TIE_FRACTION)."""
    rel = (heavier - lighter) / max(lighter, heavier)
    outcome = "undecided" if abs(rel) < MEMORY_TIE_FRACTION else ("supports" if rel > 0 else "contradicts")
    return Comparison(label, f"peak memory ({kind or 'measured'})", lighter, heavier, ratio(lighter, heavier),
                      kind="bytes", outcome=outcome, detail="ratio")


def _bench_pairs(benchmarks: list[BenchmarkPoint], method_a: str, method_b: str):
    """Completed benchmark points of ``method_a`` and ``method_b`` at the same model size."""
    ok = [b for b in benchmarks if b.ok]
    for a in ok:
        if a.method != method_a:
            continue
        for b in ok:
            if b.method == method_b and b.size == a.size:
                yield a, b


def _bench_memory(benchmarks: list[BenchmarkPoint], lighter: str, heavier: str) -> list[Comparison]:
    out = []
    for a, b in _bench_pairs(benchmarks, lighter, heavier):
        if a.peak_memory_bytes is not None and b.peak_memory_bytes is not None:
            out.append(_memory_comparison(f"benchmark {a.size}: {method_label(lighter)} vs {method_label(heavier)}",
                                          a.peak_memory_bytes, b.peak_memory_bytes, a.peak_memory_kind))
        if a.adapter_state_bytes is not None and b.adapter_state_bytes is not None:
            out.append(Comparison(f"benchmark {a.size}: {method_label(lighter)} vs {method_label(heavier)}",
                                  "state bytes", a.adapter_state_bytes, b.adapter_state_bytes,
                                  ratio(a.adapter_state_bytes, b.adapter_state_bytes), kind="bytes",
                                  outcome="supports" if a.adapter_state_bytes < b.adapter_state_bytes else "contradicts",
                                  detail="ratio MA ÷ AG"))
    return out


def _runtime_outcome(ratio: float) -> str:
    if ratio <= RUNTIME_COMPARABLE_MAX:
        return "supports"
    if ratio > RUNTIME_NOT_COMPARABLE_MIN:
        return "contradicts"
    return "undecided"


def claim_runtime(records: list[RunRecord], benchmarks: list[BenchmarkPoint]) -> Claim:
    """SpIEL's step time is comparable to LoRA's at the same budget (rule 2 of :data:`VERDICT_RULES`)."""
    claim = Claim("runtime", statement="SpIEL's run time is comparable to LoRA's.",
                  source="paper abstract (\"comparable in terms of run time\")",
                  how="mean step time of SpIEL-AG and SpIEL-MA ÷ LoRA at the same rank (training runs, and "
                      "benchmark points per model size); 4-bit variants ÷ qLoRA.")
    for ma, mb in (("spiel-ag", "lora"), ("spiel-ma", "lora"), ("qspiel-ag", "qlora"), ("qspiel-ma", "qlora")):
        for a, b in matched_pairs(records, ma, mb):
            ta = [r.step_time_mean_s for r in a if r.step_time_mean_s is not None]
            tb = [r.step_time_mean_s for r in b if r.step_time_mean_s is not None]
            if not ta or not tb:
                continue
            ratio = (sum(ta) / len(ta)) / (sum(tb) / len(tb))
            claim.comparisons.append(Comparison(f"{setting_label(a)} vs {setting_label(b)}", "step time (s)",
                                                sum(ta) / len(ta), sum(tb) / len(tb), ratio, kind="ratio",
                                                outcome=_runtime_outcome(ratio), detail="ratio SpIEL ÷ LoRA"))
        for a, b in _bench_pairs(benchmarks, ma, mb):
            sa, sb = a.step_time_mean_s, b.step_time_mean_s
            if sa is None or not sb:
                continue
            claim.comparisons.append(Comparison(
                f"benchmark {a.size}: {method_label(ma)} vs {method_label(mb)}", "step time (s)", sa, sb,
                sa / sb, kind="ratio", outcome=_runtime_outcome(sa / sb), detail="ratio SpIEL ÷ LoRA"))
    claim.verdict, claim.reason = decide(claim.comparisons)
    return claim


def claim_memory_scaling(records: list[RunRecord], benchmarks: list[BenchmarkPoint]) -> Claim:
    """SpIEL's memory overhead scales with the number of tuned parameters, not with the model size."""
    claim = Claim("memory-scaling",
                  statement="SpIEL's memory overhead scales with the number of tuned parameters rather than with "
                            "the model size.",
                  source="a third-party summary of the paper (a hint only: \"memory overhead scales with the number "
                         "of tuned params rather than model size\")",
                  how="(a) training runs: state bytes per trainable parameter across budgets of one method; "
                      "(b) benchmark: growth of peak memory above the floor across model sizes vs growth of "
                      "trainable parameters and of model parameters.")
    for method in ("spiel-ag", "spiel-ma", "qspiel-ag", "qspiel-ma"):
        groups: dict[tuple, list[RunRecord]] = {}
        for r in records:
            if r.method == method and r.state_bytes and r.trainable_params:
                k = (r.model_name, r.data_name, r.gradient_checkpointing)
                if all(x.rank != r.rank or x.density != r.density for x in groups.get(k, [])):
                    groups.setdefault(k, []).append(r)
        for k, rs in groups.items():
            if len(rs) < 2:
                continue
            per = [r.state_bytes / r.trainable_params for r in rs]
            spread = max(per) / min(per)
            budgets = ", ".join(setting_label([r]) for r in sorted(rs, key=lambda r: r.trainable_params))
            claim.comparisons.append(Comparison(
                f"{method_label(method)} budgets {budgets}", "state bytes per trainable parameter",
                min(per), max(per), spread, kind="ratio",
                outcome="supports" if spread <= STATE_PER_PARAM_SPREAD_MAX else "contradicts",
                detail=f"{min(per):.2f}–{max(per):.2f} B/param (spread max ÷ min)"))
    bench = _bench_scaling(benchmarks)
    if not any(c.counted for c in bench):
        for c in claim.comparisons:
            c.counted, c.outcome = False, "not counted"
        claim.notes.append("The model-size half of the claim needs the efficiency benchmark at two or more model "
                           "sizes (results/benchmark/, with a floor per size); without it the per-budget state bytes "
                           "above are shown but decide nothing.")
    claim.comparisons += bench
    claim.verdict, claim.reason = decide(claim.comparisons)
    return claim


def _bench_scaling(benchmarks: list[BenchmarkPoint]) -> list[Comparison]:
    """Per method, growth of (peak − floor peak) from the smallest to the largest completed model size."""
    out = []
    ok = [b for b in benchmarks if b.ok]
    floors = {b.size: b for b in ok if b.method == "floor"}
    for method in ("spiel-ag", "spiel-ma", "qspiel-ag", "full"):
        pts = []
        for b in ok:
            f = floors.get(b.size)
            if b.method != method or f is None:
                continue
            if None in (b.peak_memory_bytes, f.peak_memory_bytes, b.trainable_params, b.n_params_model):
                continue
            if b.peak_memory_bytes <= f.peak_memory_bytes or not b.trainable_params:
                continue
            pts.append((b.n_params_model, b.trainable_params, b.peak_memory_bytes - f.peak_memory_bytes, b.size))
        if len(pts) < 2:
            continue
        pts.sort()
        (p0, n0, o0, s0), (p1, n1, o1, s1) = pts[0], pts[-1]
        g_over, g_n, g_p = o1 / o0, n1 / n0, p1 / p0
        closer_n = abs(math.log(g_over / g_n)) < abs(math.log(g_over / g_p))
        c = Comparison(f"benchmark {method_label(method)} {s0} → {s1}", "peak memory above the floor",
                       o0, o1, g_over, kind="ratio",
                       outcome="supports" if closer_n else "contradicts",
                       detail=f"overhead ×{g_over:.2f}; trainable params ×{g_n:.2f}; model params ×{g_p:.2f}")
        if method == "full":  # full FT tunes every parameter: a reference line, not evidence
            c.counted, c.outcome = False, "not counted"
        out.append(c)
    return out


def _base_for(base: list[RunRecord], run: RunRecord) -> list[RunRecord]:
    """The base-model record(s) of ``run``'s model (the one evaluated with the same data, if several)."""
    same = [b for b in base if b.model_name == run.model_name and b.data_name == run.data_name]
    return same[:1] or [b for b in base if b.model_name == run.model_name][:1]


def claim_quantized(records: list[RunRecord]) -> Claim:
    """SpIEL trains over a 4-bit (NF4) base: qSpIEL improves over the base model."""
    metrics = eval_metrics(records)
    claim = Claim("4bit", statement="SpIEL works with 4-bit quantized base weights (qSpIEL).",
                  source="paper abstract (\"compatible with both quantization and efficient optimizers\")",
                  how="every qSpIEL-AG/-MA setting vs the base model (counted: fine-tuning must improve on the "
                      "base model); vs qLoRA and vs the fp32 SpIEL run at the same rank (shown, not counted).")
    base = [r for r in records if r.target == "base"]
    for method in ("qspiel-ag", "qspiel-ma"):
        for g in settings_of([r for r in records if r.method == method]).values():
            mb = _base_for(base, g[0])
            if mb:
                claim.comparisons += stat_comparisons(f"{setting_label(g)} vs base model", g, mb, metrics)
        for q, f in matched_pairs(records, method, "qlora") + matched_pairs(
                [r for r in records if r.method in (method, fp32_twin(method))],
                method, fp32_twin(method)):
            for c in stat_comparisons(f"{setting_label(q)} vs {setting_label(f)}", q, f, metrics):
                c.counted = False
                claim.comparisons.append(c)
        for q in [r for r in records if r.method == method]:
            f = [r for r in records if r.method == fp32_twin(method) and r.rank == q.rank
                 and r.model_name == q.model_name]
            if f and f[0].steps != q.steps:
                claim.notes.append(f"{q.target} trained {q.steps} steps, {f[0].target} {f[0].steps}: "
                                   "the fp32 comparison is not like for like (not matched, so not shown).")
    finish_stats(claim)
    return claim


def claim_checkpointing(records: list[RunRecord]) -> Claim:
    """SpIEL trains with activation (gradient) checkpointing: runs with it improve over the base model."""
    metrics = eval_metrics(records)
    claim = Claim("checkpointing", statement="SpIEL works with activation checkpointing.",
                  source="a third-party summary of the paper (a hint only: \"compatible with 4-bit quantized "
                         "weights and activation checkpointing\")",
                  how="every SpIEL setting trained with gradient_checkpointing: true vs the base model (counted); "
                      "vs the same setting without checkpointing (shown, not counted).")
    base = [r for r in records if r.target == "base"]
    spiel = [r for r in records if r.method in ("spiel-ag", "spiel-ma", "qspiel-ag", "qspiel-ma")]
    for g in settings_of([r for r in spiel if r.gradient_checkpointing]).values():
        mb = _base_for(base, g[0])
        if mb:
            claim.comparisons += stat_comparisons(f"{setting_label(g)} (checkpointing) vs base model", g, mb,
                                                  metrics)
        twin = [r for r in spiel if not r.gradient_checkpointing and r.method == g[0].method
                and r.rank == g[0].rank and r.density == g[0].density and r.model_name == g[0].model_name
                and r.config.get("max_steps") == g[0].config.get("max_steps")]
        if twin:
            for c in stat_comparisons(f"{setting_label(g)} with vs without checkpointing", g, twin, metrics):
                c.counted = False
                claim.comparisons.append(c)
            pa, pb = g[0].peak_memory_bytes, twin[0].peak_memory_bytes
            if pa is not None and pb is not None:
                c = _memory_comparison(f"{setting_label(g)} with vs without checkpointing", pa, pb,
                                       g[0].peak_memory_kind)
                c.counted, c.outcome = False, "not counted"
                claim.comparisons.append(c)
    if not any(r.gradient_checkpointing for r in spiel):
        claim.notes.append("No SpIEL run has gradient_checkpointing: true; add one to the config to test this claim, "
                           "e.g. {method: spiel-ag, rank: 16, gradient_checkpointing: true, id: spiel-ag-r16-gc}.")
    finish_stats(claim)
    return claim


def evaluate_claims(records: list[RunRecord], benchmarks: list[BenchmarkPoint] | None = None,
                    margins: dict[str, float] | None = None, tasks: list[str] | None = None) -> list[Claim]:
    """All claims of the paper checked by this suite, in the order of ``results/claims.md``.

    ``margins``: the non-inferiority margins (``{"heldout_loss": nats, "accuracy": fraction}``, config
    ``claims.margins``; defaults ``noninferiority.DEFAULT_MARGINS``); ``tasks``: the order of the
    secondary task comparisons (None: as found).
    """
    benchmarks = benchmarks or []
    return [
        claim_at_least("ag-vs-lora",
                       "SpIEL-AG performs at least as well as LoRA at an equal number of trainable parameters.",
                       "paper abstract (\"often superior to popular parameter-efficient fine-tuning methods like "
                       "LoRA\")", records, "spiel-ag", ["lora"], margins, tasks),
        claim_at_least("ag-vs-ma", "SpIEL-AG performs at least as well as SpIEL-MA.",
                       "the paper's method: SpIEL-MA approximates SpIEL-AG's accumulated gradients to save memory",
                       records, "spiel-ag", ["spiel-ma"], margins, tasks),
        claim_ma_lighter(records, benchmarks),
        claim_runtime(records, benchmarks),
        claim_memory_scaling(records, benchmarks),
        claim_quantized(records),
        claim_checkpointing(records),
        claim_at_least("regrowth", "Regrowth (dynamic index reselection) beats a static sparse mask of the same size.",
                       "the paper's method: indices are dropped and regrown during training (tested here against "
                       "fixed masks of the same size)", records, "spiel-ag", ["spiel-static", "shira"], margins, tasks),
    ]


def _fmt_value(metric: str, x: float | None, kind: str) -> str:
    if x is None:
        return "—"
    if kind == "bytes" or "bytes" in metric and "per" not in metric or "memory" in metric:
        return f"{x / 2**20:,.1f} MiB"
    if metric == HELDOUT:
        return f"{x:.4f}"
    if kind == "stat":
        return f"{100 * x:.1f}%"
    return f"{x:.3g}"


def _ni_lines(rows: list[Comparison]) -> list[str]:
    """The evidence table of the non-inferiority comparisons (primary rows first, then secondary)."""
    lines = ["Held-out loss in nats/token, accuracy in percentage points; d > 0 favours the claim's side A; "
             "the interval is the bootstrap interval at the coverage shown; δ is the margin.", "",
             "| comparison | role | metric | A | B | d | interval | δ | verdict | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in sorted(rows, key=lambda x: x.role != "primary"):
        scale, dig = (1.0, 4) if x.metric == HELDOUT else (100.0, 1)
        metric = "held-out loss" if x.metric == HELDOUT else task_label(x.metric)

        def num(v, signed=False):
            return "—" if v is None else (f"{scale * v:+.{dig}f}" if signed else f"{scale * v:.{dig}f}")

        ci = "—" if x.low is None else f"[{num(x.low, True)}, {num(x.high, True)}] ({100 * x.level:.1f}%)"
        out = x.outcome + ("" if x.counted or x.role == "secondary" else " (not counted)")
        lines.append(f"| {x.label} | {x.role} | {metric} | {num(x.a)} | {num(x.b)} | {num(x.diff, True)} | {ci} | "
                     f"{num(x.margin)} | {out} | {x.detail} |")
    return lines + [""]


def claims_markdown(claims: list[Claim], context: str = "", margins: dict[str, float] | None = None) -> str:
    """The text of ``results/claims.md``: a summary table, then per claim its evidence and verdict.

    ``margins``: the non-inferiority margins the claims were judged with (printed in rule 0).
    """
    lines = ["# The paper's claims, checked on this run", ""]
    if context:
        lines += [context, ""]
    lines += ["No number from the paper is used: its result tables were not available to this suite; each claim "
              "is a qualitative statement of the paper, tested on the runs configured here.", "",
              "| # | claim | verdict | evidence |", "|---|---|---|---|"]
    for i, c in enumerate(claims, 1):
        lines.append(f"| {i} | {c.statement} | **{c.verdict}** | {c.reason} |")
    lines += ["", "How the verdicts are computed (spielbench/aggregate/; every threshold is a constant there or "
              "a key of the config):", "", rules_text(margins) + VERDICT_RULES]
    for i, c in enumerate(claims, 1):
        lines += [f"## {i}. {c.statement}", "", f"- Source: {c.source}", f"- Test: {c.how}",
                  f"- **Verdict: {c.verdict}**: {c.reason}", ""]
        ni = [x for x in c.comparisons if x.kind == "ni"]
        if ni:
            lines += _ni_lines(ni)
        stats = [x for x in c.comparisons if x.kind == "stat"]
        if stats:
            z = stats[0].z_crit
            lines += [f"Accuracy (percentage points) and held-out loss (nats/token); d > 0 favours the claim; "
                      f"significance threshold |d| > {z:.2f}·s." if z else "", "",
                      "| comparison | metric | A | B | d | 95% CI | d/s | outcome | note |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for x in stats:
                scale = 1.0 if x.metric == HELDOUT else 100.0
                dig = 4 if x.metric == HELDOUT else 1
                ci = ("—" if x.stderr is None else
                      f"[{scale * (x.diff - Z95 * x.stderr):+.{dig}f}, {scale * (x.diff + Z95 * x.stderr):+.{dig}f}]")
                zs = "—" if not x.stderr else f"{x.diff / x.stderr:+.2f}"
                metric = "held-out loss" if x.metric == HELDOUT else task_label(x.metric)
                out = x.outcome + ("" if x.counted else " (shown only)")
                lines.append(f"| {x.label} | {metric} | {scale * x.a:.{dig}f} | {scale * x.b:.{dig}f} | "
                             f"{scale * x.diff:+.{dig}f} | {ci} | {zs} | {out} | {x.detail} |")
            lines.append("")
        other = [x for x in c.comparisons if x.kind not in ("stat", "ni")]
        if other:
            lines += ["| comparison | measure | A | B | ratio | outcome | note |", "|---|---|---|---|---|---|---|"]
            for x in other:
                out = x.outcome + ("" if x.counted else " (shown only)")
                lines.append(f"| {x.label} | {x.metric} | {_fmt_value(x.metric, x.a, x.kind)} | "
                             f"{_fmt_value(x.metric, x.b, x.kind)} | {fmt_float(x.diff, 3)} | {out} | {x.detail} |")
            lines.append("")
        if not c.comparisons:
            lines += ["No configured run tests this claim.", ""]
        lines += [f"- Note: {n}" for n in dict.fromkeys(c.notes)]
        if c.notes:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


