"""Rule body of `report_pages`: render the markdown tables and claims to HTML for the Snakemake report."""
import logging

from spielbench.aggregate import write_html_pages

smk = snakemake  # noqa: F821 (injected by Snakemake)
logging.basicConfig(filename=smk.log[0], filemode="w", level=logging.INFO, format="%(asctime)s %(message)s")
try:
    pages = write_html_pages(zip([*smk.input.tables, smk.input.claims], smk.output))
    logging.info("wrote %s", ", ".join(map(str, pages)))
except Exception:
    logging.exception("report pages failed")
    raise
