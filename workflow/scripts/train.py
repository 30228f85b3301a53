"""Rule body of `train`: write the run config and call the training entry point."""
import sys

from spielbench.workflow_glue import run_train

sys.exit(run_train(snakemake))  # noqa: F821 (injected by Snakemake)
