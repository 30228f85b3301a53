"""Aggregation: the per-run JSON files of a pipeline run -> tables, claims with verdicts, raw copies.

Inputs (docs/DESIGN.md), each read through its typed record (:mod:`spielbench.records`):
``<runs_dir>/<run_id>/metrics.json`` (one per training run, ``spielbench.train``),
``<runs_dir>/<target>/eval.json`` (one per evaluated model, ``target`` = ``base`` or a run id,
``spielbench.evaluate``), optionally ``results/benchmark/<size>__<method>.json`` (the efficiency benchmark,
``spielbench.benchmark``), and the resolved run table of the config (``spielbench.pipeline``). Method
labels, table order, 4-bit twins and LoRA references come from the registry (``spielbench.methods``).

Outputs (under ``results_dir``):

- ``tables/main.{md,csv,tex}``: rows = base model and one row per run, columns = tasks (+ held-out loss),
  grouped by model and training data, value ± stderr, trainable parameters.
- ``tables/quantized.{md,csv,tex}``: 4-bit runs next to their fp32 twins at the same rank.
- ``tables/efficiency.{md,csv,tex}``: step time, tokens/s, peak memory and optimizer-state bytes per
  run and per benchmark (model size, method), with ratios to LoRA at the same rank and to the floor.
- ``claims.md``: each qualitative claim of the paper with the measured numbers, an interval and a
  verdict computed by the rules in :data:`VERDICT_RULES` (also printed in the file).
- ``runs/index.json`` and ``runs/<target>/{metrics,eval}.json``: copies of the per-run files, so that a
  reader (and ``analysis/figures.ipynb``) needs nothing but ``results/``.

The package, one idea per module, in data-flow order: :mod:`~spielbench.aggregate.loading` (files ->
records), :mod:`~spielbench.aggregate.stats` (standard errors, pooling, significance),
:mod:`~spielbench.aggregate.formatting` and :mod:`~spielbench.aggregate.tables` (md/csv/tex),
:mod:`~spielbench.aggregate.evidence` and :mod:`~spielbench.aggregate.claims` (verdicts),
:mod:`~spielbench.aggregate.publish` (raw copies, HTML), :mod:`~spielbench.aggregate.cli` (the stage and
``python -m spielbench.aggregate``). This module re-exports the names its users call.
"""
from spielbench.aggregate.claims import claims_markdown, evaluate_claims
from spielbench.aggregate.cli import aggregate, main, write_results
from spielbench.aggregate.evidence import (
    INCONCLUSIVE, MIXED, NOT_MEASURED, NOT_REPRODUCED, REPRODUCED, VERDICT_RULES, Claim, Comparison, decide,
    matched_pairs, pick_setting, settings_of,
)
from spielbench.aggregate.formatting import fmt_bytes, fmt_count, fmt_float, fmt_score, task_label
from spielbench.aggregate.loading import (
    HELDOUT, Reselection, RunRecord, Score, load_benchmarks, load_records, make_record, parse_benchmark,
    parse_heldout, parse_score, read_json,
)
from spielbench.aggregate.publish import (
    FIGURE_FILES, TABLE_FORMATS, TABLE_STEMS, copy_raw, load_results_dir, markdown_html, output_paths,
    results_tasks, write_html_pages,
)
from spielbench.aggregate.stats import (
    SettingScore, paired_stderr, pool_scores, proportion_stderr_floor, ratio_stderr, stat_outcome, z_critical,
)
from spielbench.aggregate.tables import Table, efficiency_table, main_table, quantized_table, score_table, write_table
from spielbench.methods import method_label

__all__ = [
    "Claim", "Comparison", "FIGURE_FILES", "HELDOUT", "INCONCLUSIVE", "MIXED", "NOT_MEASURED",
    "NOT_REPRODUCED", "REPRODUCED", "Reselection", "RunRecord", "Score", "SettingScore", "TABLE_FORMATS",
    "TABLE_STEMS", "Table", "VERDICT_RULES", "aggregate", "claims_markdown", "copy_raw", "decide",
    "efficiency_table", "evaluate_claims", "fmt_bytes", "fmt_count", "fmt_float", "fmt_score", "load_benchmarks",
    "load_records", "load_results_dir", "main", "main_table", "make_record", "markdown_html", "matched_pairs",
    "method_label", "output_paths", "paired_stderr", "parse_benchmark", "parse_heldout", "parse_score",
    "pick_setting", "pool_scores", "proportion_stderr_floor", "quantized_table", "ratio_stderr", "read_json",
    "results_tasks", "score_table", "settings_of", "stat_outcome", "task_label", "write_html_pages",
    "write_results", "write_table", "z_critical",
]
