# Aggregation: every run's metrics.json and eval.json (and the efficiency benchmark's JSONs, when the
# benchmark rules define BENCHMARK_FILES) -> results/ tables, claims, raw copies; then the figures,
# drawn by executing analysis/figures.ipynb on results/ (spielbench.notebook), so they never go stale.
import os
from pathlib import Path

import spielbench.aggregate
from spielbench.aggregate import FIGURE_FILES, TABLE_FORMATS, TABLE_STEMS

# The code that computes the tables and draws the figures is an input too: changing it reruns the stage.
# That is the aggregate package, the records it reads the files with, and the registry (labels, order).
_SPIELBENCH = os.path.relpath(os.path.dirname(os.path.dirname(spielbench.aggregate.__file__)))
AGGREGATE_CODE = sorted(str(p) for package in ("aggregate", "records") for p in Path(_SPIELBENCH, package).glob("*.py"))
AGGREGATE_CODE.append(os.path.join(_SPIELBENCH, "methods.py"))
FIGURES_CODE = os.path.join(_SPIELBENCH, "figures.py")

AGGREGATE_TABLES = [f"{RESULTS}/tables/{stem}.{fmt}" for stem in TABLE_STEMS for fmt in TABLE_FORMATS]
AGGREGATE_CLAIMS = f"{RESULTS}/claims.md"
AGGREGATE_RAW = (
    [f"{RESULTS}/runs/index.json"]
    + [f"{RESULTS}/runs/{t}/eval.json" for t in EVAL_TARGETS]
    + [f"{RESULTS}/runs/{r}/metrics.json" for r in RUN_IDS]
)
FIGURE_PNGS = [f"{RESULTS}/figures/{name}" for name in FIGURE_FILES]
FIGURES_NOTEBOOK = f"{RESULTS}/figures/figures.ipynb"

#: Every file the aggregation stage writes (tables, claims, raw copies, figures, executed notebook).
AGGREGATE_OUTPUTS = AGGREGATE_TABLES + [AGGREGATE_CLAIMS] + AGGREGATE_RAW + FIGURE_PNGS + [FIGURES_NOTEBOOK]


def _benchmark_files(wildcards):
    """The benchmark JSONs, when a benchmark rule file (included anywhere) defines BENCHMARK_FILES."""
    return list(globals().get("BENCHMARK_FILES", []))


def _table_report(path):
    stem, fmt = path.rsplit("/", 1)[1].split(".")
    if fmt != "csv":
        return path
    return report(path, caption=f"../report/{stem}.rst", category="Tables", labels={"table": stem, "format": "csv"})


rule aggregate:
    input:
        metrics=[f"{RUNS_DIR}/{r}/metrics.json" for r in RUN_IDS],
        evals=[f"{RUNS_DIR}/{t}/eval.json" for t in EVAL_TARGETS],
        benchmarks=_benchmark_files,
        code=AGGREGATE_CODE,
    output:
        tables=[_table_report(p) for p in AGGREGATE_TABLES],
        claims=AGGREGATE_CLAIMS,
        raw=AGGREGATE_RAW,
    params:
        runs_dir=RUNS_DIR,
        results_dir=RESULTS,
        runs=RUNS,
        model_name=config["model"]["name"],
        data_name=config["data"]["name"],
        tasks=config["evaluation"]["tasks"],
        margins=(config.get("claims") or {}).get("margins"),
    log:
        f"{LOGS}/aggregate/aggregate.log",
    script:
        "../scripts/aggregate_tables.py"


rule figures:
    input:
        notebook="analysis/figures.ipynb",
        raw=AGGREGATE_RAW,
        benchmarks=_benchmark_files,
        code=[*AGGREGATE_CODE, FIGURES_CODE],
    output:
        figures=[
            report(p, caption=f"../report/{Path(p).stem}.rst", category="Figures", labels={"figure": Path(p).stem})
            for p in FIGURE_PNGS
        ],
        notebook=FIGURES_NOTEBOOK,
    params:
        results_dir=RESULTS,
        figures_dir=f"{RESULTS}/figures",
    log:
        f"{LOGS}/aggregate/figures.log",
    script:
        "../scripts/aggregate_figures.py"
