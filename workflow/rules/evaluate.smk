# Evaluation with lm-eval (offline) of the base model and of every trained run: one JSON per target
# with per-task scores (metric, value, stderr, n) and the held-out loss.

EVAL = config["evaluation"]


def _eval_inputs(wc):
    ins = {"model": MODEL_DIR, "manifest": f"{RESOURCES}/eval/manifest.json", "heldout": HELDOUT_FILE}
    if wc.target != "base":
        ins["adapter"] = f"{RUNS_DIR}/{wc.target}/adapter"
        ins["metrics"] = f"{RUNS_DIR}/{wc.target}/metrics.json"
    return ins


def _eval_args(wc):
    args = ["--base", MODEL_DIR] if wc.target == "base" else ["--run", f"{RUNS_DIR}/{wc.target}"]
    args += ["--tasks", ",".join(EVAL["tasks"]), "--eval-dir", f"{RESOURCES}/eval",
             "--heldout", HELDOUT_FILE, "--prompt-format", EVAL["prompt_format"], "--seed", str(EVAL["seed"]),
             "--heldout-examples", str(EVAL.get("heldout_examples") or config["training"].get(
                 "heldout_examples", RUN_DEFAULTS["heldout_examples"])),
             "--max-seq-length", str(config["training"].get("max_seq_length", RUN_DEFAULTS["max_seq_length"]))]
    if EVAL["limit"] is not None:
        args += ["--limit", str(EVAL["limit"])]
    if EVAL["dtype"] != "float32":  # only when set: the default adds no argument, so existing results stay current
        args += ["--dtype", EVAL["dtype"]]
    if EVAL["allow_code_execution"]:
        args += ["--allow-code-execution"]
    for key, flag in (("bbh_path", "--bbh-path"), ("tydiqa_path", "--tydiqa-path")):
        if EVAL[key] is not None:
            args += [flag, EVAL[key]]
    return " ".join(shlex.quote(a) for a in args)  # already quoted: the shell command uses {params.args} as is


rule evaluate:
    input:
        unpack(_eval_inputs),
    output:
        f"{RUNS_DIR}/{{target}}/eval.json",
    params:
        args=_eval_args,
    wildcard_constraints:
        target=EVAL_PATTERN,
    log:
        f"{LOGS}/evaluate/{{target}}.log",
    benchmark:
        f"{LOGS}/evaluate/{{target}}.benchmark.tsv"
    threads: GPU_JOB_THREADS
    resources:
        gpu=1,
    shell:
        "OMP_NUM_THREADS={threads} {GPU_SLOT} {resources.gpu} -- {PYTHON:q} -m spielbench.evaluate {params.args} "
        "--output {output:q} > {log:q} 2>&1"
