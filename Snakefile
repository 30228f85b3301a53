# SpIEL reproduction and benchmark suite. Thin top level: config, validation, includes, the final target.
# Data flows one way: config -> assets -> train -> evaluate -> aggregate (tables, claims, figures).
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/assets.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        rules.assets.input,
        expand(f"{RUNS_DIR}/{{target}}/eval.json", target=EVAL_TARGETS),
    default_target: True
