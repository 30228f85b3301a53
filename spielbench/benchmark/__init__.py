"""Efficiency benchmark: step time and peak memory of every method across LLaMA model sizes.

For each (size, method) a fresh Python process (so that peak-memory figures are clean) builds a
randomly initialised LLaMA-architecture model of that size directly on the device (weights do not
change time or memory), wraps it with the method from the registry (:data:`spielbench.methods.REGISTRY`:
its benchmark entries, including the benchmark-only ``floor``, ``lora-dropout0`` and ``spiel-reference``),
runs untimed warm-up and timed training steps on random token batches, and writes one JSON record
(:class:`spielbench.records.BenchmarkPoint`). SpIEL's selection steps are timed in their natural
proportion, so that one short window stands for the whole schedule.

The package, one idea a module: :mod:`~spielbench.benchmark.sizes` (model shapes),
:mod:`~spielbench.benchmark.options` (settings and checks), :mod:`~spielbench.benchmark.schedule` (driving
schedule and step weights), :mod:`~spielbench.benchmark.memory` (estimate, cap, OOM),
:mod:`~spielbench.benchmark.building` (the base model), :mod:`~spielbench.benchmark.step` (setup and one
step), :mod:`~spielbench.benchmark.worker` (one point in this process), :mod:`~spielbench.benchmark.runner`
(fresh processes, sweeps), :mod:`~spielbench.benchmark.table` (the benchmark table and its ratios) and
:mod:`~spielbench.benchmark.cli` (``python -m spielbench.benchmark``). docs/BENCHMARK.md describes the
schedule weighting, the memory figures and every field of the JSON record.
"""
from spielbench.benchmark.building import build_random_model, load_real_model
from spielbench.benchmark.cli import main
from spielbench.benchmark.memory import available_memory_bytes, estimate_memory
from spielbench.benchmark.options import VARIANTS, BenchmarkOptions, all_methods, check_pairs
from spielbench.benchmark.runner import result_path, run_one, run_sweep
from spielbench.benchmark.schedule import DrivingSchedule, driving_schedule, natural_weights, timed_steps, \
    weighted_step_stats
from spielbench.benchmark.sizes import SIZES, ModelSize
from spielbench.benchmark.table import TABLE_COLUMNS, load_records, point_rows, table_rows, write_tables
from spielbench.benchmark.worker import REPO_ROOT, run_worker

__all__ = [
    "REPO_ROOT", "SIZES", "TABLE_COLUMNS", "VARIANTS", "BenchmarkOptions", "DrivingSchedule", "ModelSize",
    "all_methods", "available_memory_bytes", "build_random_model", "check_pairs", "driving_schedule",
    "estimate_memory", "load_real_model", "load_records", "main", "natural_weights", "point_rows", "result_path",
    "run_one", "run_sweep", "run_worker", "table_rows", "timed_steps", "weighted_step_stats", "write_tables",
]
