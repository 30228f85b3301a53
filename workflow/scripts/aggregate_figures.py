"""Rule body of `figures`: execute analysis/figures.ipynb on results/ (it writes every figure)."""
import logging
import os

from spielbench.notebook import execute_notebook

smk = snakemake  # noqa: F821 (injected by Snakemake)
logging.basicConfig(filename=smk.log[0], filemode="w", level=logging.INFO, format="%(asctime)s %(message)s")
try:
    execute_notebook(smk.input.notebook, smk.output.notebook, cwd=os.getcwd(),
                     parameters={"results_dir": smk.params.results_dir, "figures_dir": smk.params.figures_dir})
    logging.info("executed %s -> %s", smk.input.notebook, smk.output.notebook)
except Exception:
    logging.exception("figures notebook failed")
    raise
