"""Rule body of `evaluate`: evaluate the base model or one run with lm-eval and write its JSON."""
import sys

from spielbench.workflow_glue import run_evaluate

sys.exit(run_evaluate(snakemake))  # noqa: F821 (injected by Snakemake)
