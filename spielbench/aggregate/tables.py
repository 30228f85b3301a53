"""Tables: the main results, the 4-bit comparison and the efficiency table, each as numbers (CSV) and as
formatted text (markdown, LaTeX).

Rows follow the registry's table order (:func:`spielbench.methods.table_order`) within each model/data
group, base model first; 4-bit runs are paired with their fp32 twins and efficiency ratios are taken to
each method's LoRA reference, both from the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spielbench.aggregate.formatting import fmt_bytes, fmt_count, fmt_float, fmt_score, tex_escape, task_label
from spielbench.aggregate.loading import HELDOUT, RunRecord
from spielbench.benchmark.table import point_rows
from spielbench.fsio import write_text_atomic
from spielbench.methods import REGISTRY, fp32_twin, lora_reference, method_label, table_order
from spielbench.records import BenchmarkPoint


@dataclass
class Table:
    """A table in two forms: ``data`` (numbers, for CSV) and ``display`` (formatted strings, for md/tex).

    Both are pandas DataFrames with one row per record, in the same order. ``group_cols`` are the
    display columns that define sections (each section becomes a heading in markdown and a block in
    LaTeX); ``title`` and ``notes`` are printed around the table.
    """

    data: Any
    display: Any
    title: str
    group_cols: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def sorted_records(records: list[RunRecord]) -> list[RunRecord]:
    """``records`` per (model, data) group in first-seen order; within a group base first, fp32 before
    4-bit, then table order, rank, density, seed and target."""
    groups: dict[tuple, int] = {}
    for r in records:
        groups.setdefault((r.model_name, r.data_name), len(groups))
    return sorted(records, key=lambda r: (
        groups[(r.model_name, r.data_name)], r.target != "base", r.quantized,
        table_order(r.method), r.rank or 0, r.density or 0.0,
        r.seed if r.seed is not None else -1, r.target))


def task_columns(records: list[RunRecord], tasks: list[str] | None = None) -> list[str]:
    """Tasks to tabulate: ``tasks`` (config order) if given, else every task in any record, first-seen order."""
    if tasks:
        return list(tasks)
    seen: list[str] = []
    for r in records:
        for t in r.scores:
            if t not in seen:
                seen.append(t)
    return seen


def _metric_names(records: list[RunRecord], task: str) -> str:
    names = sorted({r.scores[task].metric for r in records if task in r.scores and r.scores[task].metric})
    return "/".join(names)


def _skip_notes(records: list[RunRecord], tasks: list[str]) -> list[str]:
    notes = []
    for t in tasks:
        reasons = sorted({r.scores[t].note for r in records if t in r.scores and r.scores[t].value is None
                          and r.scores[t].note and r.status is None})
        for why in reasons:
            notes.append(f"{task_label(t)} shows — (not evaluated): {why}")
    diverged = [r.target for r in records if r.status == "diverged"]
    if diverged:
        notes.append("Diverged in training (non-finite loss; no values, shown —): " + ", ".join(diverged) + ".")
    return notes


def _int_columns(df, cols: list[str]):
    """Give integer columns pandas' nullable Int64 dtype, so CSV shows ``16``, not ``16.0``, next to blanks."""
    for c in cols:
        if c in df.columns:
            df[c] = df[c].astype("Int64")
    return df


def score_table(records: list[RunRecord], tasks: list[str] | None = None, title: str = "Main results",
                extra: dict[str, tuple] | None = None):
    """Rows = records (sorted: per model/data group, base first, then the paper's method order).

    Columns: Model, Data, Method, Run, Rank, Trainable params, Steps, one column per task (percent,
    value ± stderr), held-out loss (nats/token, value ± stderr), then ``extra`` columns given as
    ``{header: (csv_column, numeric_fn(record), display_fn(record))}``. CSV columns per task: ``<task>``,
    ``<task>_stderr``, ``<task>_n`` (fractions, not percent).
    """
    import pandas as pd

    records = sorted_records(records)
    tasks = task_columns(records, tasks)
    data_rows, disp_rows = [], []
    for r in records:
        d = {"model": r.model_name, "data": r.data_name,
             "method": r.method, "run": r.target, "rank": r.rank, "density": r.density, "seed": r.seed,
             "learning_rate": r.learning_rate, "trainable_params": r.trainable_params, "steps": r.steps}
        s = {"Model": r.model_name, "Data": r.data_name,
             "Method": method_label(r.method), "Run": r.target + (f" ({r.status})" if r.status else ""),
             "Rank": "—" if r.rank is None else str(r.rank),
             "Trainable params": fmt_count(r.trainable_params),
             "Steps": "—" if r.steps is None else str(r.steps)}
        for t in tasks:
            sc = r.scores.get(t)
            d[t] = None if sc is None else sc.value
            d[f"{t}_stderr"] = None if sc is None else sc.stderr
            d[f"{t}_n"] = None if sc is None else sc.n
            metric = _metric_names(records, t)
            s[f"{task_label(t)} {metric} (%)".replace("  ", " ")] = fmt_score(sc, percent=True)
        d[HELDOUT] = None if r.heldout is None else r.heldout.value
        d[f"{HELDOUT}_stderr"] = None if r.heldout is None else r.heldout.stderr
        d[f"{HELDOUT}_n"] = None if r.heldout is None else r.heldout.n
        s["Held-out loss"] = fmt_score(r.heldout, percent=False)
        for header, (csv_name, num_fn, disp_fn) in (extra or {}).items():
            d[csv_name] = num_fn(r)
            s[header] = disp_fn(r)
        data_rows.append(d)
        disp_rows.append(s)
    data = _int_columns(pd.DataFrame(data_rows), ["rank", "seed", "trainable_params", "steps"]
                        + [f"{t}_n" for t in tasks] + [f"{HELDOUT}_n"])
    display = pd.DataFrame(disp_rows)
    notes = ["Task scores in percent (value ± standard error over the evaluated items, from lm-eval); "
             "held-out loss = mean cross-entropy in nats per target token on the held-out split "
             "(± standard error over examples); lower is better."]
    notes += _skip_notes(records, tasks)
    return Table(data=data, display=display, title=title, group_cols=["Model", "Data"], notes=notes)


def main_table(records: list[RunRecord], tasks: list[str] | None = None) -> Table:
    """The paper's main-table layout: every record (base + one row per run), grouped by model and data."""
    t = score_table(records, tasks, title="Main results: accuracy and held-out loss per method")
    steps = {r.steps for r in records if r.target != "base"}
    if len(steps) > 1:
        t.notes.append("Runs differ in their number of training steps (Steps column); compare within equal steps.")
    return t


def quantized_table(records: list[RunRecord], tasks: list[str] | None = None) -> Table:
    """4-bit runs (qLoRA, qSpIEL-AG, qSpIEL-MA) and their fp32 counterparts at the same rank and group.

    Extra columns: peak memory (GiB) and step time (s). Empty (zero rows, one note) when no 4-bit run
    is configured.
    """
    quant = [r for r in records if r.quantized]
    keep = list(quant)
    for q in quant:
        base_method = fp32_twin(q.method)
        keep += [r for r in records if r.method == base_method and r.rank == q.rank
                 and (r.model_name, r.data_name) == (q.model_name, q.data_name) and r not in keep]
    extra = {
        "Peak memory (GiB)": ("peak_memory_bytes", lambda r: r.peak_memory_bytes,
                              lambda r: fmt_bytes(r.peak_memory_bytes)),
        "Step time (s)": ("step_time_mean_s", lambda r: r.step_time_mean_s, lambda r: fmt_float(r.step_time_mean_s)),
    }
    t = score_table(keep, tasks, title="4-bit (NF4) training vs fp32 at the same rank", extra=extra)
    if not quant:
        names = ", ".join(sorted((n for n, s in REGISTRY.items() if s.quantized), key=table_order))
        t.notes.insert(0, f"No 4-bit run ({names}) is configured.")
    if len({r.steps for r in keep}) > 1:
        t.notes.append("4-bit runs and fp32 runs differ in their number of training steps (Steps column).")
    return t


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; None when either is unknown or ``b`` is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def _cost_row(x, source: str, model: str, run: str, state_bytes: int | None, ref_state_bytes: int | None, ref,
              floor=None, steps: int | None = None, gradient_checkpointing: bool = False, status: str = "ok") -> dict:
    """One numeric row of the efficiency table for a run or a benchmark point ``x``, with its ratios to the
    LoRA reference ``ref`` and to the ``floor`` (either may be None: no ratio)."""
    return {"source": source, "model": model, "method": x.method, "run": run, "rank": x.rank,
            "trainable_params": x.trainable_params, "steps": steps, "gradient_checkpointing": gradient_checkpointing,
            "step_time_mean_s": x.step_time_mean_s, "step_time_p50_s": x.step_time_p50_s,
            "tokens_per_s": x.tokens_per_s, "peak_memory_bytes": x.peak_memory_bytes,
            "peak_memory_kind": x.peak_memory_kind, "state_bytes": state_bytes,
            "step_time_vs_lora": ratio(x.step_time_mean_s, ref and ref.step_time_mean_s),
            "peak_memory_vs_lora": ratio(x.peak_memory_bytes, ref and ref.peak_memory_bytes),
            "state_bytes_vs_lora": ratio(state_bytes, ref_state_bytes),
            "step_time_vs_floor": ratio(x.step_time_mean_s, floor and floor.step_time_mean_s),
            "peak_memory_vs_floor": ratio(x.peak_memory_bytes, floor and floor.peak_memory_bytes),
            "status": status}


def efficiency_table(records: list[RunRecord], benchmarks: list[BenchmarkPoint] | None = None) -> Table:
    """Training cost per run (from metrics.json) and per benchmark point (from results/benchmark).

    Columns: source ("run"/"benchmark"), model/size, method, rank, trainable params, steps, mean and
    median step time [s], tokens/s, peak memory [GiB] and what it measures (CUDA max allocated or CPU
    peak RSS), trainable + gradient + optimizer-state bytes [MiB], and ratios of step time, peak memory
    and state bytes to LoRA at the same rank (4-bit methods: to qLoRA) and, for benchmark points, to the
    floor (frozen weights, gradient to the inputs only) of the same size.
    """
    import pandas as pd

    rows_d, rows_s = [], []
    runs = [r for r in sorted_records(records) if r.target != "base"]

    def lora_of(r):
        ref = lora_reference(r.method)
        cands = [x for x in runs if x.method == ref and x.rank == r.rank and r.rank is not None
                 and (x.model_name, x.data_name) == (r.model_name, r.data_name)
                 and x.gradient_checkpointing == r.gradient_checkpointing]
        same_seed = [x for x in cands if x.seed == r.seed]
        return (same_seed or cands or [None])[0]

    for r in runs:
        ref = lora_of(r)
        rows_d.append(_cost_row(r, "run", r.model_name, r.target, r.state_bytes, ref and ref.state_bytes, ref,
                                steps=r.steps, gradient_checkpointing=r.gradient_checkpointing))
    bench = benchmarks or []
    for b, ratios in zip(bench, point_rows(bench)):  # the benchmark's ratios have one home: its table
        row = _cost_row(b, "benchmark", b.size, b.source, b.adapter_state_bytes, None, None, status=b.status)
        row.update({k: ratios[k] for k in ("step_time_vs_lora", "peak_memory_vs_lora", "step_time_vs_floor",
                                           "peak_memory_vs_floor")},
                   state_bytes_vs_lora=ratios["adapter_state_bytes_vs_lora"])
        rows_d.append(row)
    for d in rows_d:
        rows_s.append({
            "Source": "training runs" if d["source"] == "run" else "benchmark", "Model": d["model"],
            "Method": method_label(d["method"]), "Run": d["run"],
            "Rank": "—" if d["rank"] is None else str(d["rank"]),
            "Trainable params": fmt_count(d["trainable_params"]),
            "Step time (s)": fmt_float(d["step_time_mean_s"]) if d["status"] == "ok" else d["status"].upper(),
            "Tokens/s": fmt_float(d["tokens_per_s"], 1),
            "Step p50 (s)": fmt_float(d["step_time_p50_s"]),
            "Peak memory (GiB)": fmt_bytes(d["peak_memory_bytes"]),
            "State (MiB)": fmt_bytes(d["state_bytes"], "MiB"),
            "Step ÷ LoRA": fmt_float(d["step_time_vs_lora"]),
            "Memory ÷ LoRA": fmt_float(d["peak_memory_vs_lora"]),
            "State ÷ LoRA": fmt_float(d["state_bytes_vs_lora"]),
            "Step ÷ floor": fmt_float(d["step_time_vs_floor"]),
            "Memory ÷ floor": fmt_float(d["peak_memory_vs_floor"]),
        })
    cols_d = ["source", "model", "method", "run", "rank", "trainable_params", "steps", "gradient_checkpointing",
              "step_time_mean_s", "step_time_p50_s", "tokens_per_s", "peak_memory_bytes", "peak_memory_kind",
              "state_bytes", "step_time_vs_lora", "peak_memory_vs_lora", "state_bytes_vs_lora",
              "step_time_vs_floor", "peak_memory_vs_floor", "status"]
    data = _int_columns(pd.DataFrame(rows_d, columns=cols_d),
                        ["rank", "trainable_params", "steps", "peak_memory_bytes", "state_bytes"])
    display = pd.DataFrame(rows_s, columns=["Source", "Model", "Method", "Run", "Rank", "Trainable params",
                                            "Step time (s)", "Step p50 (s)", "Tokens/s", "Peak memory (GiB)",
                                            "State (MiB)", "Step ÷ LoRA", "Memory ÷ LoRA", "State ÷ LoRA",
                                            "Step ÷ floor", "Memory ÷ floor"])
    kinds = sorted({d["peak_memory_kind"] for d in rows_d if d["peak_memory_kind"]})
    notes = [
        "Step time: mean wall time of one optimizer step (all its micro-batches), in seconds (benchmark: "
        "weighted by the natural share of SpIEL's selection steps). State: bytes of trainable parameters + "
        "their gradients + optimizer state (benchmark: + SpIEL's index buffers).",
        "Peak memory measures: " + (", ".join(kinds) if kinds else "none recorded") +
        ". CPU peak RSS includes the Python process and the frozen model, so ratios are closer to 1 than "
        "ratios of state bytes.",
        "÷ LoRA: ratio to the LoRA run (4-bit methods: qLoRA) with the same rank, model and data; "
        "÷ floor: ratio to the benchmark's frozen-weight floor of the same size.",
    ]
    if not bench:
        notes.append("No efficiency benchmark results (results/benchmark/*.json) were found; "
                     "only the training runs are listed.")
    if any(d["status"] != "ok" for d in rows_d):
        notes.append("OOM / UNSUPPORTED / ERROR / TIMEOUT: the benchmark point did not complete (no timing or "
                     "peak memory); its JSON file says why (detail).")
    return Table(data=data, display=display, title="Efficiency: step time, throughput and memory",
                 group_cols=["Source", "Model"], notes=notes)


def table_markdown(table: Table) -> str:
    """Markdown: a title, one sub-table per group (heading ``Model · Data``), then the notes."""
    lines = [f"# {table.title}", ""]
    disp = table.display
    if len(disp) == 0:
        lines += ["(no rows)", ""]
    else:
        groups = list(dict.fromkeys(tuple(row) for row in disp[table.group_cols].itertuples(index=False)))
        for g in groups:
            mask = (disp[table.group_cols] == list(g)).all(axis=1)
            sub = disp[mask].drop(columns=table.group_cols)
            lines += [f"## {' · '.join(str(x) for x in g if str(x) not in ('', '—'))}", "",
                      sub.to_markdown(index=False, disable_numparse=True), ""]
    lines += [f"- {n}" for n in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def table_latex(table: Table) -> str:
    """A LaTeX ``tabular`` (booktabs) with a bold row per group, then the notes as a comment block."""
    disp = table.display
    cols = [c for c in disp.columns if c not in table.group_cols]
    out = [f"% {table.title}", "% generated by spielbench.aggregate; needs \\usepackage{booktabs}"]
    out += [f"% {n}" for n in table.notes]
    out += ["\\begin{tabular}{" + "l" * len(cols) + "}", "\\toprule",
            " & ".join(tex_escape(c) for c in cols) + " \\\\", "\\midrule"]
    if len(disp):
        groups = list(dict.fromkeys(tuple(row) for row in disp[table.group_cols].itertuples(index=False)))
        for gi, g in enumerate(groups):
            if gi:
                out.append("\\midrule")
            head = " / ".join(str(x) for x in g if str(x) not in ("", "—"))
            out.append(f"\\multicolumn{{{len(cols)}}}{{l}}{{\\textbf{{{tex_escape(head)}}}}} \\\\")
            mask = (disp[table.group_cols] == list(g)).all(axis=1)
            for row in disp[mask][cols].itertuples(index=False):
                out.append(" & ".join(tex_escape(v) for v in row) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(out)


def write_table(table: Table, stem: str | Path) -> list[Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` (numbers) and ``<stem>.tex``; returns the paths."""
    stem = Path(stem)
    paths = [stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".tex")]
    write_text_atomic(paths[0], table_markdown(table))
    write_text_atomic(paths[1], table.data.to_csv(index=False))
    write_text_atomic(paths[2], table_latex(table))
    return paths


