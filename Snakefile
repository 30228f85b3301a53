# SpIEL reproduction and benchmark suite. Thin top level: config, validation, includes, the final target.
# Data flows one way: config -> assets -> tune (learning-rate selection) -> train -> evaluate -> aggregate
# (tables, claims, figures),
# with the efficiency benchmark beside it feeding the efficiency table and figures.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"

# validated against workflow/schemas/config.schema.yaml in common.smk (spielbench.pipeline: one-line errors)

include: "workflow/rules/common.smk"
include: "workflow/rules/gpus.smk"
include: "workflow/rules/assets.smk"
include: "workflow/rules/tune.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.assets.input,
        TUNING_OUTPUTS,
        # the per-run files are targets too, so deleting one run's outputs reruns that run (and the aggregates)
        expand(f"{RUNS_DIR}/{{run}}/metrics.json", run=RUN_IDS),
        expand(f"{RUNS_DIR}/{{target}}/eval.json", target=EVAL_TARGETS),
        AGGREGATE_OUTPUTS,
        BENCHMARK_OUTPUTS,
        REPORT_OUTPUTS,
    default_target: True
