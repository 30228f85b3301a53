"""Snakemake script: a random tiny LLaMA with SmolLM2's tokenizer (model.source: tiny-random, smoke runs)."""
from spielbench.assets import logging_to, offline_hub
from spielbench.tiny import build_tiny_random

offline_hub()
with logging_to(snakemake.log[0]):  # noqa: F821 (snakemake injects the object)
    build_tiny_random(snakemake.input.tokenizer_dir, snakemake.output.model_dir, seed=snakemake.params.seed)  # noqa: F821
