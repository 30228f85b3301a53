"""Snakemake script: split the user's instruction file (data.train) into train/held-out JSONL files."""
from spielbench.assets import logging_to
from spielbench.formats import split_instruction_file

p = snakemake.params  # noqa: F821 (snakemake injects the object)
with logging_to(snakemake.log[0]):  # noqa: F821
    n_train, n_heldout = split_instruction_file(
        snakemake.input.data, snakemake.output.train, snakemake.output.heldout,  # noqa: F821
        heldout_examples=p.heldout_examples, seed=p.seed)
    print(f"{snakemake.input.data}: {n_train} train, {n_heldout} held-out examples")  # noqa: F821
