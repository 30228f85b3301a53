# Training: one job per configured run. `run_config` writes the run's config file from the workflow
# config (so a changed setting reruns that run only); `train` calls the training entry point.
# Checkpoints stay in runs/<id>/checkpoints (not a declared output), so a job killed mid-training
# resumes from its last checkpoint when the workflow is rerun.
# A training job asks one GPU per launcher process and runs on devices of its own (gpus.smk).

import json


localrules:
    run_config,
    preflight,


# The checks of every run against the model (rank/density vs layer shapes, target modules, the chat
# template's overhead) run at parse time when the model is already built. In a fresh clone the registry
# model is built by a job, so this job repeats them once it exists, before any training job starts (every
# training job needs its output). `ancient()` below: rewriting this file never retrains a run; its
# params (every run's config) rerun it when a run changes.
rule preflight:
    input:
        model=MODEL_DIR,
    output:
        f"{RUNS_DIR}/.preflight.json",
    params:
        runs=RUNS,
    log:
        f"{LOGS}/preflight.log",
    run:
        checked = preflight_runs(log[0])
        write_text_atomic(output[0], json.dumps({"checked_runs": checked}, indent=1) + "\n")


rule run_config:
    input:
        # a run without a learning_rate trains at the one the tune stage chose (tune.smk)
        chosen=lambda wc: [CHOSEN_LR] if wc.run in TUNED_RUNS else [],
    output:
        f"{RUNS_DIR}/{{run}}/run.yaml",
    params:
        run=lambda wc: RUNS[wc.run],
    wildcard_constraints:
        run=RUN_PATTERN,
    log:
        f"{LOGS}/run_config/{{run}}.log",
    run:
        if input.chosen:
            chosen = spielbench.tuning.read_chosen(input.chosen[0])
            write_yaml_atomic(output[0], apply_chosen(params.run, chosen, tuned=True))
        else:
            write_yaml_atomic(output[0], params.run)


rule train:
    input:
        run_config=f"{RUNS_DIR}/{{run}}/run.yaml",
        preflight=ancient(f"{RUNS_DIR}/.preflight.json"),
        model=MODEL_DIR,
        train=TRAIN_FILE,
        heldout=HELDOUT_FILE,
    output:
        adapter=directory(f"{RUNS_DIR}/{{run}}/adapter"),
        metrics=f"{RUNS_DIR}/{{run}}/metrics.json",
    params:
        outdir=lambda wc: f"{RUNS_DIR}/{wc.run}",
        launch=lambda wc: train_launcher(RUNS[wc.run]["method"]),
    wildcard_constraints:
        run=RUN_PATTERN,
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{LOGS}/train/{{run}}.benchmark.tsv"
    threads: GPU_JOB_THREADS
    resources:
        gpu=lambda wc: launcher_processes(RUNS[wc.run]["method"]),
        mem_mb=8000,
    shell:
        "OMP_NUM_THREADS={threads} {GPU_SLOT} {resources.gpu} -- {PYTHON:q} {params.launch} spielbench.train "
        "{input.run_config:q} --output-dir {params.outdir:q} --restart-if-changed --record-divergence --no-progress > {log:q} 2>&1"
