"""Snakemake script: split the user's instruction file (data.train) into train/held-out/validation JSONL files, after
dropping the examples training cannot use (spielbench.data.split_user_data); the drops go to the log and
to the report beside the split."""
from spielbench.assets import logging_to
from spielbench.data import describe_drops, split_user_data
from spielbench.preflight import load_model_info

p = snakemake.params  # noqa: F821 (snakemake injects the object)
with logging_to(snakemake.log[0]):  # noqa: F821
    tokenizer = load_model_info(snakemake.input.model).tokenizer  # noqa: F821
    report = split_user_data(
        snakemake.input.data, tokenizer, p.max_seq_length, snakemake.output.train,  # noqa: F821
        snakemake.output.heldout, snakemake.output.report, heldout_examples=p.heldout_examples,  # noqa: F821
        seed=p.seed, on_malformed=p.on_malformed, validation_out=snakemake.output.validation,  # noqa: F821
        validation_examples=p.validation_examples)
    print(f"{report['source']}: {report['train']} train, {report['heldout']} held-out, "
          f"{report['validation']} validation examples")
    line = describe_drops(report["dropped"], report["source"], report["read"])
    if line:
        print(f"note: {line}")
