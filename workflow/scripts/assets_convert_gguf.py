"""Snakemake script: a user's local .gguf model file -> safetensors model folder with tokenizer."""
from spielbench.assets import convert_gguf, logging_to, offline_hub

offline_hub()
with logging_to(snakemake.log[0]):  # noqa: F821 (snakemake injects the object)
    convert_gguf(snakemake.input.gguf, snakemake.output.model_dir)  # noqa: F821
