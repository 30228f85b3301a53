# Training: one job per configured run. Outputs the adapter and the metrics JSON; checkpoints stay in
# runs/<id>/checkpoints (not a declared output), so a killed job resumes when the workflow is rerun.


rule train:
    input:
        model=MODEL_DIR,
        train=TRAIN_FILE,
        heldout=HELDOUT_FILE,
    output:
        adapter=directory(f"{RUNS_DIR}/{{run}}/adapter"),
        metrics=f"{RUNS_DIR}/{{run}}/metrics.json",
    params:
        run=lambda wc: RUNS[wc.run],
        outdir=lambda wc: f"{RUNS_DIR}/{wc.run}",
    wildcard_constraints:
        run="|".join(re.escape(r) for r in RUN_IDS) if RUN_IDS else "^$",
    log:
        f"logs/train/{{run}}.log",
    benchmark:
        f"logs/train/{{run}}.benchmark.tsv"
    threads: workflow.cores
    resources:
        gpu=1,
        mem_mb=8000,
    script:
        "../scripts/train.py"
