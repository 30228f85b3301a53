# The Snakemake report (`snakemake --report report.html`): the workflow description, the tables and
# claims rendered to HTML pages (the report shows HTML and images inline), and the figures (marked in
# aggregate.smk). The pages are regenerated whenever the markdown they render changes.
from spielbench.aggregate import TABLE_STEMS


report: "../report/workflow.rst"


REPORT_PAGES = [f"{RESULTS}/report/{name}.html" for name in (*TABLE_STEMS, "claims")]
#: Every file the report stage writes.
REPORT_OUTPUTS = REPORT_PAGES


rule report_pages:
    input:
        tables=[f"{RESULTS}/tables/{stem}.md" for stem in TABLE_STEMS],
        claims=AGGREGATE_CLAIMS,
    output:
        [
            report(f"{RESULTS}/report/{stem}.html", caption=f"../report/{stem}.rst", category="Tables",
                   labels={"table": stem})
            for stem in TABLE_STEMS
        ]
        + [report(f"{RESULTS}/report/claims.html", caption="../report/claims.rst", category="Claims",
                  labels={"page": "claims"})],
    log:
        f"{LOGS}/aggregate/report_pages.log",
    script:
        "../scripts/aggregate_report.py"
