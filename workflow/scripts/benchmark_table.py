"""Snakemake script: the efficiency_benchmark table (markdown + CSV) from the per-point JSONs."""
from spielbench.benchmark import load_records, write_tables

with open(snakemake.log[0], "w") as log:  # noqa: F821 (snakemake injects it)
    rows = write_tables(load_records(snakemake.input), snakemake.output.md, snakemake.output.csv)  # noqa: F821
    log.write(f"wrote {len(rows)} rows to {snakemake.output.md} and {snakemake.output.csv}\n")  # noqa: F821
