# Efficiency benchmark (spielbench.benchmark): for every (size, method) of config["benchmark"], one job
# that measures step time and peak memory in a fresh worker process and writes
# results/benchmark/<size>__<method>.json; then the table results/tables/efficiency_benchmark.{md,csv}
# with absolute figures and ratios to LoRA and to the frozen-weight floor.
# Each job takes every core (threads: workflow.cores) so that no other job disturbs its timing.
# Exports for the Snakefile / aggregation: BENCHMARK_FILES (the per-pair JSONs) and BENCHMARK_OUTPUTS
# (the JSONs plus the two table files; add to `rule all`).
import re

from spielbench.benchmark import SIZES, BenchmarkOptions, all_methods, check_pairs
from spielbench.errors import InputError

BENCH = dict(config.get("benchmark") or {})
BENCHMARK_SIZES = list(BENCH["sizes"])      # defaults: the schema's (filled in by spielbench.pipeline)
BENCHMARK_METHODS = list(BENCH["methods"])
_bench_option_keys = ("rank", "batch_size", "seq_len", "warmup_steps", "steps", "dtype", "threads")
BENCHMARK_OPTIONS = {k: BENCH[k] for k in _bench_option_keys if k in BENCH}
try:
    # unknown sizes/methods or bad values stop the workflow at parse time, naming the config key
    check_pairs(BENCHMARK_SIZES, BENCHMARK_METHODS, BenchmarkOptions.from_dict(BENCHMARK_OPTIONS))
except InputError as err:
    raise WorkflowError(f"config error: benchmark.{err}") from None

BENCHMARK_DIR = f"{RESULTS}/benchmark"
BENCHMARK_FILES = [f"{BENCHMARK_DIR}/{s}__{m}.json" for s in BENCHMARK_SIZES for m in BENCHMARK_METHODS]
BENCHMARK_TABLES = [f"{RESULTS}/tables/efficiency_benchmark.md", f"{RESULTS}/tables/efficiency_benchmark.csv"]
BENCHMARK_OUTPUTS = BENCHMARK_FILES + BENCHMARK_TABLES


rule benchmark_point:
    output:
        f"{BENCHMARK_DIR}/{{size}}__{{method}}.json",
    params:
        options=BENCHMARK_OPTIONS,
    wildcard_constraints:
        size="|".join(re.escape(s) for s in BENCHMARK_SIZES),
        method="|".join(re.escape(m) for m in BENCHMARK_METHODS),
    log:
        f"{LOGS}/benchmark/{{size}}__{{method}}.log",
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/benchmark_point.py"


rule benchmark_table:
    input:
        BENCHMARK_FILES,
    output:
        md=BENCHMARK_TABLES[0],
        csv=BENCHMARK_TABLES[1],
    log:
        f"{LOGS}/benchmark/table.log",
    script:
        "../scripts/benchmark_table.py"
