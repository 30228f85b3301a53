"""Rule body of `aggregate`: tables, claims and raw copies from every run's metrics.json and eval.json."""
import logging

from spielbench.aggregate import aggregate

smk = snakemake  # noqa: F821 (injected by Snakemake)
logging.basicConfig(filename=smk.log[0], filemode="w", level=logging.INFO, format="%(asctime)s %(message)s")
try:
    aggregate(smk.params.runs_dir, smk.params.runs, smk.params.results_dir, smk.params.model_name,
              smk.params.data_name, tasks=smk.params.tasks, benchmark_files=smk.input.benchmarks,
              margins=smk.params.margins)
except Exception:
    logging.exception("aggregate failed")
    raise
