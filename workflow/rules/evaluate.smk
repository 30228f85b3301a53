# Evaluation with lm-eval (offline) of the base model and of every trained run.


def _eval_inputs(wc):
    ins = {"model": MODEL_DIR, "eval_data": f"{RESOURCES}/eval/manifest.json", "heldout": HELDOUT_FILE}
    if wc.target != "base":
        ins["adapter"] = f"{RUNS_DIR}/{wc.target}/adapter"
        ins["metrics"] = f"{RUNS_DIR}/{wc.target}/metrics.json"
    return ins


rule evaluate:
    input:
        unpack(_eval_inputs),
    output:
        f"{RUNS_DIR}/{{target}}/eval.json",
    params:
        evaluation=config["evaluation"],
        target=lambda wc: wc.target,
        run_dir=lambda wc: f"{RUNS_DIR}/{wc.target}",
        heldout_examples=config["training"].get("heldout_examples", 96),
        max_seq_length=config["training"].get("max_seq_length", 512),
    wildcard_constraints:
        target="|".join(re.escape(r) for r in EVAL_TARGETS),
    log:
        f"logs/evaluate/{{target}}.log",
    benchmark:
        f"logs/evaluate/{{target}}.benchmark.tsv"
    threads: workflow.cores
    resources:
        gpu=1,
    script:
        "../scripts/evaluate.py"
