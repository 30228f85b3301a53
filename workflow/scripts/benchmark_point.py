"""Snakemake script: one (size, method) point of the efficiency benchmark, measured in a fresh process."""
from spielbench.benchmark import BenchmarkOptions, run_one

options = BenchmarkOptions.from_dict(dict(snakemake.params.options))  # noqa: F821 (snakemake injects it)
record = run_one(snakemake.wildcards.size, snakemake.wildcards.method, options,  # noqa: F821
                 snakemake.output[0], log=snakemake.log[0])  # noqa: F821
if record["status"] not in ("ok", "oom", "unsupported", "timeout"):
    raise RuntimeError(f"benchmark {record['size']} {record['method']}: {record['status']}: {record.get('detail')}")
