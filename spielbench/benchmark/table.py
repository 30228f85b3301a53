"""The benchmark table: one row per benchmark point with its ratios to the LoRA reference, to LoRA without
dropout and to the floor of the same size. The one home of these ratios: the efficiency benchmark's own
table (``efficiency_benchmark.{md,csv}``) and the aggregation's efficiency table
(:func:`spielbench.aggregate.efficiency_table`) both read them here."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable, Sequence

from spielbench.benchmark.sizes import SIZES
from spielbench.fsio import write_text_atomic
from spielbench.methods import is_quantized, lora_reference, table_order
from spielbench.records import BenchmarkPoint, read_json

#: Columns of the efficiency_benchmark table (CSV header).
TABLE_COLUMNS = ("size", "method", "status", "step_time_mean_s", "step_time_p50_s", "tokens_per_s",
                 "step_cpu_time_mean_s", "step_cpu_time_vs_lora",
                 "peak_memory_bytes", "trainable_params", "adapter_state_bytes",
                 "adapter_state_bytes_per_trainable_param", "adapter_state_bytes_vs_lora",
                 "step_time_vs_lora", "step_time_vs_lora_dropout0",
                 "step_time_vs_floor", "peak_memory_vs_lora_dropout0",
                 "peak_memory_vs_lora", "peak_memory_vs_floor", "peak_memory_over_floor_bytes",
                 "n_params_model", "device", "threads", "batch_size", "seq_len", "steps", "detail")


def load_records(paths: Iterable[str | Path]) -> list[BenchmarkPoint]:
    """Read benchmark JSONs as :class:`~spielbench.records.BenchmarkPoint` records (``source`` = the file name).

    Raises InputError naming a file that is missing, not JSON, or not a benchmark record.
    """
    return [BenchmarkPoint.from_json(read_json(p), Path(p).name) for p in paths]


def as_points(records: Iterable[BenchmarkPoint | dict[str, Any]]) -> list[BenchmarkPoint]:
    """``records`` as :class:`~spielbench.records.BenchmarkPoint` (a dict, as the worker returns it, is
    validated). Raises InputError naming the record and field that do not match the record's schema."""
    return [r if isinstance(r, BenchmarkPoint) else BenchmarkPoint.from_json(r, f"benchmark record {i}")
            for i, r in enumerate(records)]


def _value(point: BenchmarkPoint, name: str):
    """A field of ``point``: a modelled one, else from ``extra`` (None when absent)."""
    return getattr(point, name) if name in BenchmarkPoint._fields() else point.extra.get(name)


def _ratio(a, b):
    return a / b if a is not None and b else None


def point_rows(records: Sequence[BenchmarkPoint | dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per point, in input order, with :data:`TABLE_COLUMNS`.

    Ratios divide by the first completed point of the same size of: the method's LoRA reference (registry
    :func:`~spielbench.methods.lora_reference`: qLoRA for 4-bit methods), ``lora-dropout0`` (float methods
    only) and the ``floor``; None where the point or its reference is not ok (state bytes: where either
    is unknown). ``detail`` is cut to its first line (200 characters).
    """
    points = as_points(records)

    def ok(size: str, method: str, name: str):
        ref = next((p for p in points if p.size == size and p.method == method and p.ok), None)
        return None if ref is None else _value(ref, name)

    rows = []
    for p in points:
        s = p.size
        step, mem = (p.step_time_mean_s, p.peak_memory_bytes) if p.ok else (None, None)
        floor_mem = ok(s, "floor", "peak_memory_bytes")
        lora = lora_reference(p.method)
        float_method = not is_quantized(p.method)
        row = {c: _value(p, c) for c in TABLE_COLUMNS}
        row.update(
            adapter_state_bytes_vs_lora=_ratio(p.adapter_state_bytes, ok(s, lora, "adapter_state_bytes")),
            step_time_vs_lora=_ratio(step, ok(s, lora, "step_time_mean_s")),
            step_time_vs_floor=_ratio(step, ok(s, "floor", "step_time_mean_s")),
            step_time_vs_lora_dropout0=(_ratio(step, ok(s, "lora-dropout0", "step_time_mean_s"))
                                        if float_method else None),
            peak_memory_vs_lora_dropout0=(_ratio(mem, ok(s, "lora-dropout0", "peak_memory_bytes"))
                                          if float_method else None),
            step_cpu_time_vs_lora=_ratio(_value(p, "step_cpu_time_mean_s") if step is not None else None,
                                         ok(s, lora, "step_cpu_time_mean_s")),
            peak_memory_vs_lora=_ratio(mem, ok(s, lora, "peak_memory_bytes")),
            peak_memory_vs_floor=_ratio(mem, floor_mem),
            peak_memory_over_floor_bytes=(mem - floor_mem) if mem is not None and floor_mem is not None else None,
            detail=(str(p.detail).splitlines()[0][:200] if p.detail else None),
        )
        rows.append(row)
    return rows


def table_rows(records: Sequence[BenchmarkPoint | dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`point_rows` sorted by size (:data:`~spielbench.benchmark.sizes.SIZES` order, unknown sizes
    after, by name) then method (registry table order)."""
    size_order = list(SIZES)
    return sorted(point_rows(records), key=lambda x: (
        size_order.index(x["size"]) if x["size"] in size_order else len(size_order), x["size"],
        table_order(x["method"])))


#: How a table cell of each kind is written: seconds, a ratio, GiB, MiB, a count, 0 or 1 decimals.
_FORMATS = {"s": "{:.3f}".format, "x": "{:.2f}×".format, "gib": lambda v: f"{v / 2**30:.2f}",
            "mib": lambda v: f"{v / 2**20:.1f}", "int": lambda v: f"{int(v):,d}", "f0": "{:.0f}".format,
            "f1": "{:.1f}".format}


def _fmt(value, kind: str) -> str:
    """``value`` as a table cell of ``kind`` (:data:`_FORMATS`; another kind: ``str``), "–" when None."""
    return "–" if value is None else _FORMATS.get(kind, str)(value)


def render_markdown(rows: Sequence[dict[str, Any]], records: Sequence[BenchmarkPoint | dict[str, Any]]) -> str:
    """The markdown table of ``rows`` (absolute figures and ratios) with a header naming the machine and the
    settings of ``records`` (the points the rows were made from)."""
    points = as_points(records)
    ok = [p for p in points if p.ok]
    first_point = ok[0] if ok else (points[0] if points else None)
    first = {} if first_point is None else first_point.to_json()
    loads = [v for p in points for k in ("load_avg_start", "load_avg_end") if (v := _value(p, k)) is not None]
    lines = [
        "# Efficiency benchmark: step time and peak memory per method and model size",
        "",
        f"Device: {first.get('device')} ({first.get('device_name')}), {first.get('threads')} threads; "
        f"batch {first.get('batch_size')} × {first.get('seq_len')} tokens, dtype {first.get('dtype')}, "
        f"rank {next((p.rank for p in points if p.rank), None)}; "
        f"{first.get('warmup_steps')} warm-up + {min((_value(p, 'steps') or 0) for p in points)}–"
        f"{max((_value(p, 'steps') or 0) for p in points)} timed steps per run (SpIEL-AG at least 6 when γ ≥ 3, SpIEL-MA at "
        f"least 3), each run in a fresh process; weights: {first.get('model_source')}.",
        f"1-minute load average during the runs: {min(loads):.2f}–{max(loads):.2f} (other work on the machine "
        "disturbs timings)." if loads else "",
        "Step time: schedule-weighted mean/median (SpIEL selection phases in their natural proportion, "
        "S=20, γ=5; see docs/BENCHMARK.md). Peak memory: CUDA max allocated, else peak RSS of the worker "
        "after model build. Ratios \"/LoRA\" divide by LoRA of the same size (dropout 0.1 as the reference; 4-bit "
        "methods: by qLoRA), \"/LoRA-d0\" by LoRA without dropout (`lora-dropout0`, the fastest LoRA); "
        "\"/floor\" by the frozen-weight float floor. "
        "Adapter state: trainable parameters + gradients + optimizer state + SpIEL indices and fused-forward cache. "
        "CPU-time/LoRA: ratio of process CPU time per step (steadier than wall time when other work shares "
        "the machine).",
        "",
        "| size | method | status | step [s] | p50 [s] | tokens/s | peak [GiB] | trainable | state [MiB] | "
        "B/param | step/LoRA | step/LoRA-d0 | step/floor | CPU-time/LoRA | mem/LoRA | mem/LoRA-d0 | mem/floor | "
        "mem over floor [GiB] |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r.get('detail') or '')[:80]}"
        lines.append("| " + " | ".join([
            r["size"], r["method"], status, _fmt(r["step_time_mean_s"], "s"), _fmt(r["step_time_p50_s"], "s"),
            _fmt(r["tokens_per_s"], "f0"), _fmt(r["peak_memory_bytes"], "gib"), _fmt(r["trainable_params"], "int"),
            _fmt(r["adapter_state_bytes"], "mib"), _fmt(r["adapter_state_bytes_per_trainable_param"], "f1"),
            _fmt(r["step_time_vs_lora"], "x"), _fmt(r["step_time_vs_lora_dropout0"], "x"),
            _fmt(r["step_time_vs_floor"], "x"), _fmt(r["step_cpu_time_vs_lora"], "x"),
            _fmt(r["peak_memory_vs_lora"], "x"), _fmt(r["peak_memory_vs_lora_dropout0"], "x"),
            _fmt(r["peak_memory_vs_floor"], "x"),
            _fmt(r["peak_memory_over_floor_bytes"], "gib"),
        ]) + " |")
    return "\n".join(line for line in lines) + "\n"


def write_tables(records: Sequence[BenchmarkPoint | dict[str, Any]], md_path: str | Path,
                 csv_path: str | Path) -> list[dict[str, Any]]:
    """Write the markdown and CSV tables of ``records`` (each atomically). Returns the rows (:func:`table_rows`).

    Raises InputError (before writing anything) when a record does not match the benchmark record's schema.
    """
    records = as_points(records)
    rows = table_rows(records)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    for path, text in ((md_path, render_markdown(rows, records)), (csv_path, buf.getvalue())):
        write_text_atomic(path, text)
    return rows
